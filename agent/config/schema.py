"""A tiny declarative TOML → dataclass validator.

Why not a big schema library: the rules we need are few (unknown keys, types, ranges) and every error
must name the file, the dotted key and the problem in words a field technician understands.
Sections are frozen dataclasses; per-field rules live in ``field(metadata=...)`` via :func:`setting`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from agent.errors import ConfigError

T = TypeVar("T")
Check = Callable[[Any], str | None]


def setting(default: Any = dataclasses.MISSING, *, doc: str, check: Check | None = None,
            secret: bool = False, default_factory: Any = dataclasses.MISSING) -> Any:
    """Declare a config key with its documentation and an optional value check."""
    meta = {"doc": doc, "check": check, "secret": secret}
    # a secret never shows up in a repr (and so never in a log line or a traceback)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta, repr=not secret)
    return dataclasses.field(default=default, metadata=meta, repr=not secret)


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or greater"


def port(value: Any) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port between 1 and 65535"


def non_empty(value: Any) -> str | None:
    return None if len(value) > 0 else "must not be empty"


def between(low: float, high: float) -> Check:
    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"must be between {low} and {high}"
    return check


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            Path: "a path string"}.get(tp, str(tp))


class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> typing.NoReturn:
        raise ConfigError(f"{self.source}: key '{key}': {problem}")


def _convert(ctx: _Ctx, key: str, tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        for arg in args:
            try:
                return _convert(ctx, key, arg, value)
            except ConfigError:
                continue
        ctx.fail(key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            ctx.fail(key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            ctx.fail(key, f"expected {_type_name(tp)}, got {type(value).__name__}")
        (item,) = get_args(tp)
        return tuple(_convert(ctx, f"{key}[{i}]", item, v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            ctx.fail(key, f"expected a table, got {type(value).__name__}")
        _, vt = get_args(tp)
        return {str(k): _convert(ctx, f"{key}.{k}", vt, v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            ctx.fail(key, f"expected a table, got {type(value).__name__}")
        return build_section(ctx, key, tp, value)
    if tp is bool:
        if not isinstance(value, bool):
            ctx.fail(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            ctx.fail(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            ctx.fail(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            ctx.fail(key, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            ctx.fail(key, f"expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            ctx.fail(key, f"expected a path string, got {value!r}")
        return Path(value)
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def build_section(ctx: _Ctx, prefix: str, cls: type[T], raw: dict[str, Any]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in raw:
        if name not in fields:
            known = ", ".join(sorted(fields)) or "(none)"
            ctx.fail(_join(prefix, name), f"unknown key (known keys here: {known})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in raw:
            secret = bool(f.metadata.get("secret"))
            try:
                value = _convert(ctx, key, hints[name], raw[name])
            except ConfigError:
                if not secret:
                    raise
                # the usual message quotes the value: never for a secret
                ctx.fail(key, f"expected {_type_name(hints[name])} (value not shown: it is a secret)")
            check = f.metadata.get("check")
            if check is not None:
                problem = check(value)
                if problem:
                    ctx.fail(key, f"{problem} (got {'a secret value' if secret else repr(value)})")
            values[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            ctx.fail(key, "is required")
    return cls(**values)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def parse(source: str, cls: type[T], raw: dict[str, Any]) -> T:
    """Validate ``raw`` (parsed TOML) against the dataclass ``cls``; errors name ``source``."""
    return build_section(_Ctx(source), "", cls, raw)


def describe(cls: type[Any], prefix: str = "") -> list[tuple[str, str, str, Any, bool]]:
    """(key, type, doc, default, secret) for every key: used to check the example config is complete."""
    rows: list[tuple[str, str, str, Any, bool]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            rows.extend(describe(tp, key))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((key, _type_name(tp), f.metadata.get("doc", ""), default, bool(f.metadata.get("secret"))))
    return rows
