"""The one JSON dialect: what it accepts, what it refuses (with which code and where), and properties
that hold for any input Hypothesis can think of."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import jsonsafe
from agent.jsonsafe import Fields, JsonRejected, Limits
from agent_devkit.hostile import deep, duplicate_key_doc, json_values, render, with_hostile_leaf

L = Limits(1 << 20)


@pytest.mark.parametrize(("text", "code", "path"), [
    (b'{"a": NaN}', "json_non_finite", "$.a"),
    (b"[1, -Infinity]", "json_non_finite", "$[1]"),
    (b'{"x": {"y": [0, 1e400]}}', "json_non_finite", "$.x.y[1]"),
    (b'{"value": ' + b"9" * 309 + b"}", "json_integer_out_of_range", "$.value"),
    (b"1" * 5000, "json_integer_out_of_range", "$"),
    (str(2**63).encode(), "json_integer_out_of_range", "$"),
    (str(-(2**63) - 1).encode(), "json_integer_out_of_range", "$"),
    (deep(5000).encode(), "json_too_deep", "$"),
    (deep(65).encode(), "json_too_deep", None),
    (deep(65, "{").encode(), "json_too_deep", None),
    (duplicate_key_doc().encode(), "json_duplicate_key", "$"),
    (b'{"a": {"sha256": "x", "sha256": "y"}}', "json_duplicate_key", "$.a"),
    (b'{"\\ud800": 1}', "json_lone_surrogate", "$"),
    (b'["ok", "a\\udfffb"]', "json_lone_surrogate", "$[1]"),
    (b"\xff", "json_not_utf8", "$"),
    (b"\xef\xbb\xbf1", "json_syntax", "$"),
    ('"utf-16"'.encode("utf-16"), "json_not_utf8", "$"),
    (b"{", "json_syntax", "$"),
    (b"1 2", "json_syntax", "$"),
    (b"01", "json_syntax", "$"),
])
def test_refuses_each_rule_with_its_code_and_path(text: bytes, code: str, path: str | None) -> None:
    with pytest.raises(JsonRejected) as info:
        jsonsafe.loads(text, L)
    assert info.value.code == code
    if path is not None:
        assert info.value.path == path


def test_accepts_the_edges_of_each_rule() -> None:
    assert jsonsafe.loads(str(2**63 - 1).encode(), L) == 2**63 - 1
    assert jsonsafe.loads(str(-(2**63)).encode(), L) == -(2**63)
    assert jsonsafe.loads(b"1.7976931348623157e308", L) == 1.7976931348623157e308
    assert jsonsafe.loads(b"1e-400", L) == 0.0  # underflow is a finite zero, not an error
    assert jsonsafe.loads(deep(64).encode(), L) is not None
    assert jsonsafe.loads(b'"\\ud83d\\ude00"', L) == "\U0001f600"  # a surrogate *pair* is one character
    assert jsonsafe.loads(duplicate_key_doc().encode(), Limits(100, unique_keys=False)) == {"value": 2}
    assert jsonsafe.loads(b" \t\r\n[1] ", L) == [1]


def test_size_is_checked_before_decoding() -> None:
    with pytest.raises(JsonRejected) as info:
        jsonsafe.loads(b"[" + b"1," * 100 + b"1]", Limits(100))
    assert info.value.code == "json_too_large"


def test_fields_read_typed_values_and_name_the_wrong_one() -> None:
    f = Fields({"name": "x", "n": 3, "items": [{"a": 1}, {"a": "no"}]})
    assert f.text("name") == "x" and f.integer("n", lo=0, hi=5) == 3 and f.text("missing", "d") == "d"
    with pytest.raises(JsonRejected, match=r"\$\.n = 3 is outside 4\.\.5"):
        f.integer("n", lo=4, hi=5)
    with pytest.raises(JsonRejected, match=r"\$\.items\[1\]\.a must be an integer, got a string") as info:
        f.each("items", lambda item: item.integer("a"))
    assert info.value.code == "json_shape"
    with pytest.raises(JsonRejected, match=r"\$ must be a JSON object, got an array"):
        Fields([1])


# ---- properties ---------------------------------------------------------------------------------

@given(json_values())
def test_every_strict_json_value_round_trips(value: Any) -> None:
    assert jsonsafe.loads(jsonsafe.dumps(value).encode(), L) == value


@given(with_hostile_leaf())
def test_a_hostile_token_anywhere_is_refused_with_a_code(tree: Any) -> None:
    text = render(tree).encode()
    with pytest.raises(JsonRejected) as info:
        jsonsafe.loads(text, L)
    assert info.value.code in ("json_non_finite", "json_integer_out_of_range", "json_lone_surrogate",
                               "json_duplicate_key")


@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_json_rejected_only(data: bytes) -> None:
    try:
        doc = jsonsafe.loads(data, Limits(200))
    except JsonRejected as exc:
        assert exc.code.startswith("json_")
        return
    # whatever is accepted can be stored and sent on: encodable, finite, strict again
    text = jsonsafe.dumps(doc)
    sqlite3.connect(":memory:").execute("SELECT ?", (text,))
    assert jsonsafe.loads(text.encode(), L) == doc


@given(st.text(max_size=60))
def test_text_near_json_agrees_with_pythons_parser_when_both_accept(text: str) -> None:
    try:
        ours = jsonsafe.loads(text.encode("utf-8", "surrogatepass"), L)
    except JsonRejected:
        return
    assert ours == json.loads(text)
