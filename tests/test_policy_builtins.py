"""Host builtins: Go/OPA semantics for the functions real policies call."""

from __future__ import annotations

from typing import Any

import pytest

from agent.policy.builtins import default_builtins
from agent.policy.errors import BuiltinError
from agent.policy.registry_builtins import UNDEFINED, BuiltinContext

B = default_builtins()


def call(name: str, *args: Any, ctx: BuiltinContext | None = None) -> Any:
    fn = B.get(name)
    assert fn is not None, name
    return fn(ctx or BuiltinContext(now_ns=1_700_000_000_123_456_789), *args)


@pytest.mark.parametrize(("fmt", "args", "want"), [
    ("%s=%d", ["a", 5], "a=5"),
    ("%v|%v|%v|%v", [1, 1.5, True, None], "1|1.5|true|null"),
    ("%v", [["a", 1]], '["a", 1]'),
    ("%v", [{"b": 1, "a": "x"}], '{"a": "x", "b": 1}'),
    ("%.2f%%", [12.345], "12.35%"),
    ("%5d|%-5d|%05d", [42, 42, -42], "   42|42   |-0042"),
    ("%x %X %o %b", [255, 255, 8, 5], "ff FF 10 101"),
    ("%q", ["hi \"x\""], '"hi \\"x\\""'),
    ("%t", [False], "false"),
    ("%e", [123456.789], "1.234568e+05"),
    ("%g", [0.000012], "1.2e-05"),
    ("%d", ["str"], "%!d(string=str)"),
    ("%s %s", ["only"], "only %!s(MISSING)"),
    ("%s", ["a", "b"], "a%!(EXTRA string=b)"),
    ("%v", [1e21], "1e+21"),
    ("%v", [3.0], "3"),
    ("%8.3f|", [3.14159], "   3.142|"),
])
def test_sprintf_go_verbs(fmt: str, args: list[Any], want: str) -> None:
    assert call("sprintf", fmt, args) == want


def test_time_builtins() -> None:
    assert call("time.now_ns") == 1_700_000_000_123_456_789
    ns = call("time.parse_rfc3339_ns", "2024-02-29T23:59:58.123456789+01:00")
    assert ns == 1709247598123456789
    assert call("time.parse_rfc3339_ns", "1970-01-01T00:00:00Z") == 0
    with pytest.raises(BuiltinError):
        call("time.parse_rfc3339_ns", "yesterday")
    assert call("time.parse_duration_ns", "1h30m") == 5400 * 10**9
    assert call("time.parse_duration_ns", "-1.5s") == -1_500_000_000
    assert call("time.parse_duration_ns", "300ms") == 300_000_000
    assert call("time.parse_duration_ns", "2us") == 2000
    with pytest.raises(BuiltinError):
        call("time.parse_duration_ns", "5 days")
    ts = 1709247598123456789  # 2024-02-29T22:59:58Z
    assert call("time.date", ts) == [2024, 2, 29]
    assert call("time.clock", ts) == [22, 59, 58]
    assert call("time.weekday", ts) == "Thursday"
    assert call("time.date", [ts, "Asia/Tokyo"]) == [2024, 3, 1]
    oct31 = call("time.parse_rfc3339_ns", "2023-10-31T10:00:00Z")
    assert call("time.add_date", oct31, 0, 1, 0) == call("time.parse_rfc3339_ns", "2023-12-01T10:00:00Z")
    assert call("time.add_date", ts, 1, 0, 0) == call("time.parse_rfc3339_ns", "2025-03-01T22:59:58.123456789Z")


def test_encoding_crypto_units_semver() -> None:
    assert call("crypto.sha256", "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert call("hex.encode", "hi") == "6869" and call("hex.decode", "6869") == "hi"
    with pytest.raises(BuiltinError):
        call("hex.decode", "zz")
    assert call("units.parse", "10K") == 10000 and call("units.parse", "1Ki") == 1024
    assert call("units.parse", "100m") == 0.1 and call("units.parse", "2M") == 2_000_000
    assert call("units.parse_bytes", "10KB") == 10000 and call("units.parse_bytes", "1 KiB") == 1024
    assert call("units.parse_bytes", "1.5gib") == 1610612736 and call("units.parse_bytes", "42") == 42
    with pytest.raises(BuiltinError):
        call("units.parse_bytes", "ten")
    assert call("semver.is_valid", "1.2.3-rc.1+build") is True
    assert call("semver.is_valid", "v1.2.3") is False and call("semver.is_valid", 5) is False
    assert call("semver.compare", "1.2.3", "1.2.4") == -1
    assert call("semver.compare", "1.0.0-alpha", "1.0.0") == -1
    assert call("semver.compare", "1.0.0-alpha.1", "1.0.0-alpha.beta") == -1
    assert call("semver.compare", "2.0.0+a", "2.0.0+b") == 0


def test_strings_regex_json_yaml_uuid() -> None:
    assert call("regex.split", "[,;]\\s*", "a, b;c") == ["a", "b", "c"]
    assert call("strings.any_prefix_match", ["sensor/a", "x"], "sensor/") is True
    assert call("strings.any_suffix_match", "tank.json", [".yaml", ".yml"]) is False
    assert call("json.is_valid", '{"a": 1}') is True and call("json.is_valid", "{") is False
    assert call("yaml.unmarshal", "a: [1, 2]\n") == {"a": [1, 2]}
    assert call("yaml.marshal", {"b": 1, "a": [True]}) == "a:\n- true\nb: 1\n"
    assert call("yaml.is_valid", "a: [") is False
    ctx = BuiltinContext(now_ns=0)
    u1 = call("uuid.rfc4122", "k", ctx=ctx)
    assert u1 == call("uuid.rfc4122", "k", ctx=ctx) != call("uuid.rfc4122", "k")
    assert len(u1) == 36 and u1[14] == "4"


def test_registry_interface_for_agent_builtins() -> None:
    reg = default_builtins().copy()
    reg.register("agent.state", lambda ctx, key: UNDEFINED if key == "missing" else {"key": key})
    assert "agent.state" in reg and "agent.state" not in default_builtins()
    fn = reg.get("agent.state")
    assert fn is not None and fn(BuiltinContext(now_ns=0), "missing") is UNDEFINED
    assert "sprintf" in list(reg)


@pytest.mark.parametrize(("pattern", "text", "want"), [
    ("[,;]\\s*", "a, b;c", ["a", "b", "c"]),
    ("\\s*,\\s*", "a , b,c  ,d", ["a", "b", "c", "d"]),  # two quantifiers, split by a literal they cannot match
    ("\\r?\\n", "l1\r\nl2\nl3", ["l1", "l2", "l3"]),
    ("\\d{1,3}\\.", "10.0.7", ["", "", "7"]),
    ("[^/]+/", "a/b/c", ["", "", "c"]),
    ("x", "", [""]),
])
def test_regex_split_accepts_linear_enough_patterns(pattern: str, text: str, want: list[str]) -> None:
    assert call("regex.split", pattern, text) == want


@pytest.mark.parametrize(("pattern", "why"), [
    ("(a+)+b", "inside a repeating quantifier"),        # exponential: nested quantifiers
    ("(?:a?a?)*b", "inside a repeating quantifier"),
    ("(a|aa)+b", "alternation inside a repeating"),      # exponential: overlapping alternatives
    ("(\\r\\n|\\n)+", "alternation inside a repeating"),
    ("a*a*b", "two repeating quantifiers"),              # cubic: adjacent overlapping quantifiers
    ("\\s*\\s*x", "two repeating quantifiers"),
    (".*,.*b", "two repeating quantifiers"),             # the separator is matched by the first .*
    ("(a*),(b*)", "inside groups"),
    ("a?" * 9 + "a" * 9, "over the limit of 8"),         # 2^n ways to place the optional a's
    ("(?=a)b", "not RE2 syntax"),                        # Go's regexp refuses these too
    ("(a)\\1", "not RE2 syntax"),
    ("x" * 1025, "over the 1024-character limit"),
])
def test_regex_split_refuses_patterns_that_backtrack_badly(pattern: str, why: str) -> None:
    """Python's re backtracks, has no timeout and holds the GIL: the pattern is screened up front."""
    with pytest.raises(BuiltinError) as err:
        call("regex.split", pattern, "a" * 16)  # short: a regression fails here, it does not hang
    assert why in str(err.value)


def test_regex_split_caps_its_input_and_caches_the_compiled_pattern() -> None:
    from agent.policy.builtins import REGEX_MAX_TEXT
    ctx = BuiltinContext(now_ns=0)
    assert call("regex.split", "a*b", "a" * REGEX_MAX_TEXT, ctx=ctx) == ["a" * REGEX_MAX_TEXT]  # worst accepted case
    with pytest.raises(BuiltinError, match="over the 8192-character limit"):
        call("regex.split", ",", "," * (REGEX_MAX_TEXT + 1), ctx=ctx)
    assert ("regex.split", "a*b") in ctx.cache and ("regex.split", ",") in ctx.cache
    with pytest.raises(BuiltinError, match="invalid pattern"):
        call("regex.split", "(", "x")
