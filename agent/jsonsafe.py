"""The one JSON dialect the agent accepts from outside: strict RFC 8259, bounded, typed rejects.

Every byte that reaches the agent from elsewhere (bus readings, KubeEdge answers, fleet envelopes,
release bundles and statements, key sets, module outputs, policy results, the outbox's own records)
is decoded here, so one set of rules holds everywhere and a new input path cannot forget one:

- UTF-8 only (no BOM, no UTF-16/32 guessing), at most ``max_bytes`` bytes, checked before decoding;
- no ``NaN``, ``Infinity`` or ``-Infinity`` tokens, and no number that only becomes infinite when
  read (``1e400``): a non-finite value cannot be stored, compared or forwarded to a strict parser;
- integers within ``INT_MIN..INT_MAX`` (SQLite's signed 64 bits): a 309-digit integer cannot
  overflow ``float()`` and a 5,000-digit one cannot trip Python's conversion limit further on.
  Rego numbers have arbitrary precision, so what a policy evaluates and returns (and the decision log
  that records it) may hold longer integers, up to ``Limits.max_int_digits`` digits;
- at most ``max_depth`` nested arrays/objects (never a ``RecursionError`` in a handler);
- no duplicate keys in an object (RFC 8259 leaves their meaning to the parser; where a signature
  covers the bytes, two parsers reading different values is an attack);
- no lone UTF-16 surrogate escapes (``"\\ud800"``): such a string cannot be encoded to UTF-8, so it
  would fail later, in SQLite or in a log line, far from the message that carried it.

A failure is a :class:`JsonRejected` whose ``code`` names the rule and whose ``path`` (``$.a[2].b``)
names the place, so callers count and report it instead of crashing. :class:`Fields` turns a decoded
object into typed values with the same kind of error, for parsers that fill dataclasses.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from agent.errors import AgentError

INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
_MAX_INT_CHARS = 20  # "-9223372036854775808": anything longer is out of range without converting it
DEFAULT_MAX_DEPTH = 64
# Rego numbers have arbitrary precision: policy results (and the records that carry them) may hold
# integers this long; Python converts them in microseconds, and far below its own 4,300-digit limit
BIG_INT_DIGITS = 1000
# a \uD800–\uDFFF escape: only these can produce a lone surrogate (strict UTF-8 decoding refuses the rest)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

T = TypeVar("T")


class JsonRejected(AgentError):
    """Input that is not JSON this agent accepts. ``code`` names the rule, ``path`` the place."""

    code = "json_invalid"

    def __init__(self, message: str, *, code: str, path: str = "$") -> None:
        super().__init__(message, code=code)
        self.path = path


@dataclass(frozen=True)
class Limits:
    """How much one document may hold. Each input path declares its own (documented where it is used)."""

    max_bytes: int
    max_depth: int = DEFAULT_MAX_DEPTH
    unique_keys: bool = True
    # None: integers within INT_MIN..INT_MAX; a number: any integer of at most that many digits
    max_int_digits: int | None = None


class _Found(Exception):
    """A token the fast decoder refuses: raised from its hooks, with what it saw."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _token(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:12]}…({len(text)} characters)"


def _int(text: str) -> int:
    if len(text) <= _MAX_INT_CHARS:
        value = int(text)
        if INT_MIN <= value <= INT_MAX:
            return value
    raise _Found("json_integer_out_of_range",
                 f"integer {_token(text)} is outside the accepted range {INT_MIN}..{INT_MAX}")


def _big_int(max_digits: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if len(text.lstrip("-")) <= max_digits:
            return int(text)
        raise _Found("json_integer_out_of_range", f"integer {_token(text)} has more than {max_digits} digits")
    return parse


def _float(text: str) -> float:
    value = float(text)
    if math.isfinite(value):
        return value
    raise _Found("json_non_finite", f"number {_token(text)} is too large to represent (it would be infinite)")


def _constant(text: str) -> NoReturn:
    raise _Found("json_non_finite", f"{text} is not a JSON value (RFC 8259 has no NaN or Infinity)")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Found("json_duplicate_key", f"key {key[:40]!r} appears twice in one object")
            seen.add(key)
    return obj


_Decode = Callable[[str], Any]
_decoders: dict[tuple[bool, int | None], tuple[_Decode, _Decode]] = {}


def _decoders_for(limits: Limits) -> tuple[_Decode, _Decode]:
    """(fast, diagnostic) decoders for ``limits``: built once per kind of limits (few), then shared
    (they hold no state, so threads can share them)."""
    key = (limits.unique_keys, limits.max_int_digits)
    found = _decoders.get(key)
    if found is None:
        ints = _int if limits.max_int_digits is None else _big_int(limits.max_int_digits)
        unique = limits.unique_keys
        fast = json.JSONDecoder(parse_int=ints, parse_float=_float, parse_constant=_constant,
                                object_pairs_hook=_pairs if unique else None).decode
        diagnose = json.JSONDecoder(parse_int=_marking(ints), parse_float=_marking(_float),
                                    parse_constant=_marking(_constant),
                                    object_pairs_hook=_marking_pairs if unique else None).decode
        found = _decoders[key] = (fast, diagnose)
    return found


class _Bad:
    """What the diagnostic decoder puts where a refused token was, so the walk can name its path."""

    __slots__ = ("code", "message")

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message


def _marking(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    def hook(text: str) -> Any:
        try:
            return fn(text)
        except _Found as found:
            return _Bad(found.code, str(found))
    return hook


def _marking_pairs(pairs: list[tuple[str, Any]]) -> Any:
    try:
        return _pairs(pairs)
    except _Found as found:
        return _Bad(found.code, str(found))


MAX_PATH_CHARS = 160


def _key_path(path: str, key: str) -> str:
    if len(path) > MAX_PATH_CHARS:  # a path is for humans: past this, deeper levels add nothing
        return path
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{json.dumps(key[:40])}]"


def _index_path(path: str, index: int) -> str:
    return path if len(path) > MAX_PATH_CHARS else f"{path}[{index}]"


def _locate(text: str, diagnose: _Decode) -> str:
    """The path of the first refused token in ``text`` (which the fast decoder already refused)."""
    try:
        doc = diagnose(text)
    except (ValueError, RecursionError):
        return "$"
    stack: list[tuple[Any, str]] = [(doc, "$")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _Bad):
            return path
        if isinstance(value, dict):
            stack.extend((v, _key_path(path, k)) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, _index_path(path, i)) for i, v in reversed(list(enumerate(value))))
    return "$"


def _walk(doc: Any, max_depth: int, surrogates: bool) -> None:
    """Depth (and, when the text had surrogate escapes, lone surrogates) of a decoded document."""
    stack: list[tuple[Any, int, str]] = [(doc, 0, "$")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, dict):
            if depth >= max_depth:
                raise JsonRejected(f"nested deeper than {max_depth} levels at {path}", code="json_too_deep",
                                   path=path)
            for key, item in value.items():
                if surrogates:
                    _check_text(key, path)
                stack.append((item, depth + 1, _key_path(path, key)))
        elif isinstance(value, list):
            if depth >= max_depth:
                raise JsonRejected(f"nested deeper than {max_depth} levels at {path}", code="json_too_deep",
                                   path=path)
            stack.extend((item, depth + 1, _index_path(path, i)) for i, item in enumerate(value))
        elif surrogates and isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonRejected(f"a string at {path} holds a lone UTF-16 surrogate escape, which is not text",
                           code="json_lone_surrogate", path=path) from None


def loads(data: bytes | bytearray | memoryview | str, limits: Limits) -> Any:
    """Decode one JSON document under ``limits``, or raise :class:`JsonRejected` saying why."""
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if size > limits.max_bytes:
        raise JsonRejected(f"document of {size} bytes exceeds the {limits.max_bytes}-byte limit",
                           code="json_too_large")
    if isinstance(data, str):
        text = data
    else:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonRejected(f"not UTF-8 text ({exc.reason} at byte {exc.start})", code="json_not_utf8") from None
    if text.startswith("\ufeff"):
        raise JsonRejected("starts with a byte order mark (BOM; RFC 8259 forbids one)", code="json_syntax")
    decode, diagnose = _decoders_for(limits)
    try:
        doc = decode(text)
    except _Found as found:
        path = _locate(text, diagnose)
        raise JsonRejected(f"{found} (at {path})", code=found.code, path=path) from None
    except RecursionError:
        raise JsonRejected(f"nested deeper than {limits.max_depth} levels", code="json_too_deep") from None
    except json.JSONDecodeError as exc:
        raise JsonRejected(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                           code="json_syntax") from None
    except ValueError as exc:  # anything else the decoder refuses, in its own words
        raise JsonRejected(f"not valid JSON: {exc}", code="json_syntax") from None
    surrogates = "\\" in text and _SURROGATE_ESCAPE.search(text) is not None
    if surrogates or text.count("[") + text.count("{") > limits.max_depth:
        _walk(doc, limits.max_depth, surrogates)
    return doc


_DUMPS = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_DUMPS_SORTED = json.JSONEncoder(separators=(",", ":"), allow_nan=False, sort_keys=True).encode


def dumps(value: Any, *, sort_keys: bool = False) -> str:
    """Compact, ASCII-only JSON that :func:`loads` accepts back (``ValueError`` for NaN/Infinity)."""
    return (_DUMPS_SORTED if sort_keys else _DUMPS)(value)


# ---- typed fields ------------------------------------------------------------------------------

_MISSING: Any = object()


class Fields:
    """A decoded JSON object read field by field into typed values; a wrong field is a
    :class:`JsonRejected` (``json_shape``) naming its path, like the decoder's own rejects."""

    __slots__ = ("data", "path")

    def __init__(self, value: Any, path: str = "$") -> None:
        if not isinstance(value, dict):
            _shape(path, "a JSON object", value)
        self.data: dict[str, Any] = value
        self.path = path

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise JsonRejected(f"{_key_path(self.path, key)} is missing", code="json_shape",
                               path=_key_path(self.path, key))
        return default

    def text(self, key: str, default: Any = _MISSING, *, max_len: int = 4096) -> Any:
        """A string of at most ``max_len`` characters (``default`` when absent; ``null`` counts as absent
        only when the default is None)."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if value is None and default is None:
            return None
        if not isinstance(value, str):
            _shape(_key_path(self.path, key), "a string", value)
        if len(value) > max_len:
            raise JsonRejected(f"{_key_path(self.path, key)} is {len(value)} characters long (limit {max_len})",
                               code="json_shape", path=_key_path(self.path, key))
        return value

    def integer(self, key: str, default: Any = _MISSING, *, lo: int = INT_MIN, hi: int = INT_MAX) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            _shape(_key_path(self.path, key), "an integer", value)
        if not lo <= value <= hi:
            raise JsonRejected(f"{_key_path(self.path, key)} = {value} is outside {lo}..{hi}",
                               code="json_shape", path=_key_path(self.path, key))
        return value

    def array(self, key: str, default: Any = _MISSING, *, max_items: int = 10_000) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if value is None and default is None:
            return None
        if not isinstance(value, list):
            _shape(_key_path(self.path, key), "an array", value)
        if len(value) > max_items:
            raise JsonRejected(f"{_key_path(self.path, key)} has {len(value)} items (limit {max_items})",
                               code="json_shape", path=_key_path(self.path, key))
        return value

    def each(self, key: str, parse: Callable[[Fields], T], *, max_items: int = 10_000) -> list[T]:
        """Every item of the array ``key`` (absent or null = none), each an object given to ``parse``."""
        items = self.array(key, None, max_items=max_items) or []
        base = _key_path(self.path, key)
        return [parse(Fields(item, _index_path(base, i))) for i, item in enumerate(items)]


def _shape(path: str, wanted: str, value: Any) -> NoReturn:
    got = "null" if value is None else type(value).__name__
    got = {"dict": "an object", "list": "an array", "str": "a string", "int": "an integer", "float": "a number",
           "bool": "a boolean"}.get(got, got)
    raise JsonRejected(f"{path} must be {wanted}, got {got}", code="json_shape", path=path)
