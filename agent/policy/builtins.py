"""Host implementations of the OPA builtins that ``opa build -t wasm`` leaves to the host.

Semantics follow OPA's Go topdown implementations (``sprintf`` = Go ``fmt`` for the common verbs;
``time.*`` in nanoseconds since the epoch, UTC unless a timezone is given). Every function takes the
per-evaluation :class:`BuiltinContext` first; bad arguments raise :class:`BuiltinError`.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import math
import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from agent.policy import regex_screen
from agent.policy.errors import BuiltinError
from agent.policy.registry_builtins import UNDEFINED, BuiltinContext, Builtins

# -- sprintf (Go fmt) ------------------------------------------------------------------------------

_VERB = re.compile(r"%([-+# 0]*)(\*|\d+)?(?:\.(\*|\d*))?([a-zA-Z%])")


def _rego_str(value: Any) -> str:
    """Rego's term syntax, which OPA's sprintf uses for composite values."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(_rego_str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_rego_str(k)}: {_rego_str(v)}" for k, v in sorted(value.items())) + "}"
    return _num_str(value)


def _num_str(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return _go_g(float(value), -1)


def _go_g(value: float, prec: int) -> str:
    """Go's %g / %v for floats: shortest repr, exponent when exp < -4 || exp >= 21 (for %v)."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if prec < 0:
        text = repr(value)
        if "e" in text or "E" in text:
            mant, exp = text.split("e")
            e = int(exp)
            if -4 <= e < 21:
                return format(Decimal(text), "f")
            return f"{mant}e{'+' if e >= 0 else '-'}{abs(e):02d}"
        f = float(text)
        e = math.floor(math.log10(abs(f))) if f else 0
        if e < -4 or e >= 21:
            m = f"{f:e}"
            mant, exp = m.split("e")
            mant = mant.rstrip("0").rstrip(".")
            return f"{mant}e{exp[0]}{abs(int(exp)):02d}"
        return text[:-2] if text.endswith(".0") else text
    text = f"{value:.{max(prec, 1)}g}"
    if "e" in text:
        mant, exp = text.split("e")
        return f"{mant}e{exp[0]}{abs(int(exp)):02d}"
    return text


def _bad(verb: str, arg: Any) -> str:
    kind = ("string" if isinstance(arg, str) else "bool" if isinstance(arg, bool) else
            "int" if isinstance(arg, int) else "float64" if isinstance(arg, float) else "string")
    shown = arg if isinstance(arg, str) else _rego_str(arg)
    return f"%!{verb}({kind}={shown})"


def _pad(text: str, flags: str, width: int | None, numeric: bool = False) -> str:
    if width is None or len(text) >= width:
        return text
    if "-" in flags:
        return text.ljust(width)
    if "0" in flags and numeric:
        sign = text[0] if text[:1] in "+-" else ""
        body = text[len(sign):]
        return sign + body.rjust(width - len(sign), "0")
    return text.rjust(width)


def _fmt_one(flags: str, width: int | None, prec: int | None, verb: str, arg: Any) -> str:
    is_num = isinstance(arg, int | float) and not isinstance(arg, bool)
    if verb == "v":
        text = arg if isinstance(arg, str) else _rego_str(arg)
        return _pad(text, flags, width)
    if verb == "s":
        if isinstance(arg, str) or not is_num:
            text = arg if isinstance(arg, str) else _rego_str(arg)
            if prec is not None:
                text = text[:prec]
            return _pad(text, flags, width)
        return _bad(verb, arg)
    if verb == "q":
        if isinstance(arg, str):
            return _pad(json.dumps(arg, ensure_ascii=False), flags, width)
        return _bad(verb, arg)
    if verb == "t":
        return _pad(("true" if arg else "false"), flags, width) if isinstance(arg, bool) else _bad(verb, arg)
    if verb in "dboxXc":
        if isinstance(arg, float) and arg.is_integer():
            arg = int(arg)
        if verb in "xX" and isinstance(arg, str):
            text = arg.encode().hex()
            return _pad(text.upper() if verb == "X" else text, flags, width)
        if not isinstance(arg, int) or isinstance(arg, bool):
            if verb in "xX" and isinstance(arg, float):
                return _bad(verb, arg)
            return _bad(verb, arg)
        if verb == "c":
            return _pad(chr(arg), flags, width)
        base = {"d": "d", "b": "b", "o": "o", "x": "x", "X": "X"}[verb]
        text = format(abs(arg), base)
        if "#" in flags and verb in "xXo":
            text = {"x": "0x", "X": "0X", "o": "0"}[verb] + text
        sign = "-" if arg < 0 else ("+" if "+" in flags else (" " if " " in flags else ""))
        return _pad(sign + text, flags, width, numeric=True)
    if verb in "feEgG":
        if not is_num:
            return _bad(verb, arg)
        f = float(arg)
        if verb in "gG":
            text = _go_g(f, -1 if prec is None else prec)
            text = text.upper() if verb == "G" else text
        else:
            text = f"{f:.{6 if prec is None else prec}{verb}}"
            if verb in "eE":
                mant, exp = text.split(verb)
                text = f"{mant}{verb}{exp[0]}{abs(int(exp)):02d}"
        if "+" in flags and f >= 0:
            text = "+" + text
        return _pad(text, flags, width, numeric=True)
    return f"%!{verb}({_rego_str(arg)})"


def sprintf(_ctx: BuiltinContext, fmt: Any, args: Any) -> Any:
    if not isinstance(fmt, str) or not isinstance(args, list):
        raise BuiltinError("sprintf: expects a format string and an array of values")
    out: list[str] = []
    pos = 0
    argi = 0
    for m in _VERB.finditer(fmt):
        out.append(fmt[pos:m.start()])
        pos = m.end()
        flags, width_s, prec_s, verb = m.groups()
        if verb == "%":
            out.append("%")
            continue
        width = prec = None
        if width_s == "*":
            width = int(args[argi]) if argi < len(args) else None
            argi += 1
        elif width_s:
            width = int(width_s)
        if prec_s == "*":
            prec = int(args[argi]) if argi < len(args) else None
            argi += 1
        elif prec_s is not None:
            prec = int(prec_s) if prec_s else 0
        if argi >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        out.append(_fmt_one(flags, width, prec, verb, args[argi]))
        argi += 1
    out.append(fmt[pos:])
    if argi < len(args):
        out.append("%!(EXTRA " + ", ".join(f"{_go_type(a)}={_v(a)}" for a in args[argi:]) + ")")
    return "".join(out)


def _go_type(a: Any) -> str:
    if isinstance(a, bool) or a is None or isinstance(a, list | dict):
        return "string"
    return "string" if isinstance(a, str) else "int" if isinstance(a, int) else "float64"


def _v(a: Any) -> str:
    return a if isinstance(a, str) else _rego_str(a)


# -- time ------------------------------------------------------------------------------------------

_RFC3339 = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_DUR = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DUR_UNIT = {"ns": 1, "us": 1000, "µs": 1000, "μs": 1000, "ms": 10**6, "s": 10**9, "m": 60 * 10**9,
             "h": 3600 * 10**9}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _str(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise BuiltinError(f"{name}: operand must be a string, got {type(v).__name__}")
    return v


def _int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not v.is_integer()):
        raise BuiltinError(f"{name}: operand must be an integer number, got {v!r}")
    return int(v)


def parse_rfc3339_ns(_ctx: BuiltinContext, value: Any) -> Any:
    text = _str("time.parse_rfc3339_ns", value)
    m = _RFC3339.match(text)
    if not m:
        raise BuiltinError(f"time.parse_rfc3339_ns: {text!r} is not an RFC 3339 timestamp")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=UTC)
    except ValueError as exc:
        raise BuiltinError(f"time.parse_rfc3339_ns: {text!r}: {exc}") from exc
    offset = 0
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        offset = sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    secs = calendar.timegm(dt.timetuple()) - offset
    ns = int((frac[1:] + "000000000")[:9]) if frac else 0
    return secs * 10**9 + ns


def parse_duration_ns(_ctx: BuiltinContext, value: Any) -> Any:
    text = _str("time.parse_duration_ns", value)
    body = text
    sign = 1
    if body[:1] in "+-":
        sign = -1 if body[0] == "-" else 1
        body = body[1:]
    if body == "0":
        return 0
    total = Decimal(0)
    pos = 0
    for m in _DUR.finditer(body):
        if m.start() != pos:
            break
        total += Decimal(m.group(1)) * _DUR_UNIT[m.group(2)]
        pos = m.end()
    if pos != len(body) or not body:
        raise BuiltinError(f"time.parse_duration_ns: time: invalid duration {text!r}")
    return sign * int(total)


def _ns_tz(name: str, x: Any) -> datetime:
    tz: Any = UTC
    if isinstance(x, list):
        if len(x) != 2:
            raise BuiltinError(f"{name}: expects a number or [ns, timezone]")
        ns, tzname = _int(name, x[0]), _str(name, x[1])
        if tzname not in ("", "UTC"):
            try:
                tz = ZoneInfo(tzname)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise BuiltinError(f"{name}: unknown time zone {tzname!r}") from exc
    else:
        ns = _int(name, x)
    return (_EPOCH + timedelta(microseconds=ns // 1000)).astimezone(tz)


def time_date(_ctx: BuiltinContext, x: Any) -> Any:
    dt = _ns_tz("time.date", x)
    return [dt.year, dt.month, dt.day]


def time_clock(_ctx: BuiltinContext, x: Any) -> Any:
    dt = _ns_tz("time.clock", x)
    return [dt.hour, dt.minute, dt.second]


def time_weekday(_ctx: BuiltinContext, x: Any) -> Any:
    return _ns_tz("time.weekday", x).strftime("%A")


def time_add_date(_ctx: BuiltinContext, ns: Any, years: Any, months: Any, days: Any) -> Any:
    """Go's Time.AddDate: add, then normalise (Oct 31 + 1 month = Dec 1)."""
    n = _int("time.add_date", ns)
    base = _EPOCH + timedelta(microseconds=n // 1000)
    sub_us = n % 1000
    y = base.year + _int("time.add_date", years)
    m0 = base.month - 1 + _int("time.add_date", months)
    y += m0 // 12
    m = m0 % 12 + 1
    first = datetime(y, m, 1, base.hour, base.minute, base.second, base.microsecond, tzinfo=UTC)
    dt = first + timedelta(days=base.day - 1 + _int("time.add_date", days))
    delta = dt - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000 + sub_us


# -- encoding, crypto, units, semver, strings -------------------------------------------------------

def hex_decode(_ctx: BuiltinContext, s: Any) -> Any:
    try:
        return bytes.fromhex(_str("hex.decode", s)).decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BuiltinError(f"hex.decode: {exc}") from exc


_UNITS: dict[str, Any] = {"": 1, "m": Decimal("0.001"), "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "P": 10**15, "E": 10**18, "ki": 2**10, "Ki": 2**10, "mi": 2**20, "Mi": 2**20, "gi": 2**30, "Gi": 2**30,
          "ti": 2**40, "Ti": 2**40, "pi": 2**50, "Pi": 2**50, "ei": 2**60, "Ei": 2**60}
_NUM_UNIT = re.compile(r"^([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)([a-zA-Z]*)$")


def _num_out(value: Decimal) -> Any:
    return int(value) if value == value.to_integral_value() else float(value)


def units_parse(_ctx: BuiltinContext, s: Any) -> Any:
    text = _str("units.parse", s).replace(" ", "").strip('"')
    m = _NUM_UNIT.match(text)
    if not m:
        raise BuiltinError(f"units.parse: could not parse {s!r}: no amount provided")
    unit = m.group(2)
    if unit not in _UNITS:
        low = unit.lower()
        if low in ("mi", "ki", "gi", "ti", "pi", "ei"):
            unit = low
        else:
            raise BuiltinError(f"units.parse: unknown unit {m.group(2)!r} in {s!r}")
    return _num_out(Decimal(m.group(1)) * Decimal(_UNITS[unit]))


_BYTES = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mi": 2**20, "mib": 2**20, "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30, "t": 10**12,
          "tb": 10**12, "ti": 2**40, "tib": 2**40, "p": 10**15, "pb": 10**15, "pi": 2**50, "pib": 2**50,
          "e": 10**18, "eb": 10**18, "ei": 2**60, "eib": 2**60}


def units_parse_bytes(_ctx: BuiltinContext, s: Any) -> Any:
    text = _str("units.parse_bytes", s).replace(" ", "").strip('"').lower()
    m = _NUM_UNIT.match(text)
    if not m or m.group(2) not in _BYTES:
        raise BuiltinError(f"units.parse_bytes: could not parse byte amount {s!r}")
    return int(Decimal(m.group(1)) * _BYTES[m.group(2)])


_SEMVER = re.compile(r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                     r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
                     r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$")


def _semver(name: str, v: Any) -> tuple[int, int, int, list[str]]:
    m = _SEMVER.match(_str(name, v))
    if not m or v.startswith("v"):
        raise BuiltinError(f"{name}: {v!r} is not a valid SemVer string")
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), (m.group(4).split(".") if m.group(4) else [])


def semver_is_valid(_ctx: BuiltinContext, v: Any) -> Any:
    return isinstance(v, str) and not v.startswith("v") and bool(_SEMVER.match(v))


def semver_compare(_ctx: BuiltinContext, a: Any, b: Any) -> Any:
    x, y = _semver("semver.compare", a), _semver("semver.compare", b)
    if x[:3] != y[:3]:
        return -1 if x[:3] < y[:3] else 1
    pa, pb = x[3], y[3]
    if not pa or not pb:
        return 0 if pa == pb else (1 if not pa else -1)
    for ia, ib in zip(pa, pb, strict=False):
        if ia == ib:
            continue
        na, nb = ia.isdigit(), ib.isdigit()
        if na and nb:
            return -1 if int(ia) < int(ib) else 1
        if na != nb:
            return -1 if na else 1
        return -1 if ia < ib else 1
    return 0 if len(pa) == len(pb) else (-1 if len(pa) < len(pb) else 1)


# -- regex.split: bounded work on Python's backtracking ``re`` ------------------------------------
# OPA runs Go's RE2 (linear time). Python's ``re`` backtracks, has no timeout and holds the GIL while
# matching, so a pathological pattern stalls the whole agent (the evaluation deadline can only fail it
# afterwards). Measured on the 2-vCPU dev VM: (a+)+b on 22 chars 0.24 s; a*a*b on 4 000 chars 6.9 s;
# even a*b over 65 536 chars 1.3 s (finditer retries at every position: quadratic). So regex.split
# accepts only patterns whose backtracking is at most quadratic, on a capped input:
#   * RE2 syntax only: no backreferences, lookaround or conditionals (Go's regexp refuses them too);
#   * no repeating quantifier (*, +, {m,n} with n > 1) over something that itself has a quantifier or
#     an alternation ((a+)+, (a?a?)*, (a|ab)*; a character class like [ab]* is fine);
#   * several repeating quantifiers only in the top-level sequence, each pair separated by a required
#     literal the earlier one cannot match (\s*,\s* is fine; a*a*b and .*,.*b are not);
#   * at most REGEX_MAX_QUANTIFIERS quantifiers, and pattern and input within the size caps.
# With REGEX_MAX_TEXT the worst accepted case (a*b over 8 KiB of "a") takes ~20 ms here.
REGEX_MAX_PATTERN = 1024
REGEX_MAX_TEXT = 8 * 1024
REGEX_MAX_QUANTIFIERS = 8  # each ambiguous ? can double the work: a?a?a?…aaa is the textbook case

def _regex_compile(pattern: str) -> re.Pattern[str]:
    if len(pattern) > REGEX_MAX_PATTERN:
        raise BuiltinError(f"regex.split: pattern is {len(pattern)} characters, over the "
                           f"{REGEX_MAX_PATTERN}-character limit")
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise BuiltinError(f"regex.split: invalid pattern: {exc}") from exc
    why = regex_screen.refusal(pattern, max_quantifiers=REGEX_MAX_QUANTIFIERS)
    if why is not None:
        raise BuiltinError(f"regex.split: pattern refused: {why} (Python's regex engine backtracks; "
                           "rewrite the pattern, e.g. split on a literal and trim)")
    return rx


def regex_split(ctx: BuiltinContext, pattern: Any, s: Any) -> Any:
    """OPA's ``regex.split``; patterns are screened and the input capped (see above)."""
    pat = _str("regex.split", pattern)
    key = ("regex.split", pat)
    rx = ctx.cache.get(key)
    if rx is None:
        rx = ctx.cache[key] = _regex_compile(pat)
    text = _str("regex.split", s)
    if len(text) > REGEX_MAX_TEXT:
        raise BuiltinError(f"regex.split: input is {len(text)} characters, over the {REGEX_MAX_TEXT}-character "
                           "limit (Python's regex engine backtracks: a bigger input could stall the agent)")
    out: list[str] = []
    pos = 0
    for m in rx.finditer(text):
        if m.end() == 0 and m.start() == 0:
            continue
        out.append(text[pos:m.start()])
        pos = m.end()
    out.append(text[pos:])
    return out


def json_is_valid(_ctx: BuiltinContext, s: Any) -> Any:
    if not isinstance(s, str):
        return False
    try:
        json.loads(s)
        return True
    except ValueError:
        return False


def yaml_marshal(_ctx: BuiltinContext, v: Any) -> Any:
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True, allow_unicode=True)


def yaml_unmarshal(_ctx: BuiltinContext, s: Any) -> Any:
    try:
        value = yaml.safe_load(_str("yaml.unmarshal", s))
        json.dumps(value)
        return value
    except (yaml.YAMLError, TypeError, ValueError) as exc:
        raise BuiltinError(f"yaml.unmarshal: {exc}") from exc


def yaml_is_valid(_ctx: BuiltinContext, s: Any) -> Any:
    if not isinstance(s, str):
        return False
    try:
        yaml.safe_load(s)
        return True
    except yaml.YAMLError:
        return False


def uuid_rfc4122(ctx: BuiltinContext, seed: Any) -> Any:
    """A random v4 UUID, the same for the same seed within one evaluation (as OPA caches it)."""
    key = ("uuid.rfc4122", _str("uuid.rfc4122", seed))
    if key not in ctx.cache:
        ctx.cache[key] = str(uuid.uuid4())
    return ctx.cache[key]


def _strs(name: str, v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    raise BuiltinError(f"{name}: operands must be strings or arrays/sets of strings")


def any_prefix_match(_ctx: BuiltinContext, search: Any, base: Any) -> Any:
    bases = _strs("strings.any_prefix_match", base)
    return any(s.startswith(b) for s in _strs("strings.any_prefix_match", search) for b in bases)


def any_suffix_match(_ctx: BuiltinContext, search: Any, base: Any) -> Any:
    bases = _strs("strings.any_suffix_match", base)
    return any(s.endswith(b) for s in _strs("strings.any_suffix_match", search) for b in bases)


def _now_ns(ctx: BuiltinContext) -> Any:
    return ctx.now_ns


def _sha256(_ctx: BuiltinContext, s: Any) -> Any:
    return hashlib.sha256(_str("crypto.sha256", s).encode()).hexdigest()


def _hex_encode(_ctx: BuiltinContext, s: Any) -> Any:
    return _str("hex.encode", s).encode().hex()


def default_builtins() -> Builtins:
    """A fresh registry with every host builtin the agent ships (copy-safe: it is new each call)."""
    return Builtins({
        "sprintf": sprintf,
        "time.now_ns": _now_ns,
        "time.parse_rfc3339_ns": parse_rfc3339_ns,
        "time.parse_duration_ns": parse_duration_ns,
        "time.date": time_date,
        "time.clock": time_clock,
        "time.weekday": time_weekday,
        "time.add_date": time_add_date,
        "crypto.sha256": _sha256,
        "hex.encode": _hex_encode,
        "hex.decode": hex_decode,
        "units.parse": units_parse,
        "units.parse_bytes": units_parse_bytes,
        "semver.compare": semver_compare,
        "semver.is_valid": semver_is_valid,
        "regex.split": regex_split,
        "json.is_valid": json_is_valid,
        "yaml.marshal": yaml_marshal,
        "yaml.unmarshal": yaml_unmarshal,
        "yaml.is_valid": yaml_is_valid,
        "uuid.rfc4122": uuid_rfc4122,
        "strings.any_prefix_match": any_prefix_match,
        "strings.any_suffix_match": any_suffix_match,
    })


__all__ = ["UNDEFINED", "BuiltinContext", "Builtins", "default_builtins"]
