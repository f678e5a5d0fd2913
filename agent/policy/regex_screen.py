"""The screen ``regex.split`` puts patterns through before Python's backtracking ``re`` runs them.

It reads a pattern the way ``re`` itself does, with the stdlib's private parser and compiler
(``re._parser``, ``re._compiler``, ``re._constants``): a second parser of our own could disagree with
the one that runs the pattern. Those modules are internals, so the screen is pinned to the Python
versions it is tested on (``TESTED_PYTHONS``, the range ``requires-python`` allows) and resolved on
first use. Where it cannot run it is disabled — ``regex.split`` then keeps only its size caps — and
says so once, as the structlog event ``regex_screen_disabled``. What it refuses is explained in
:mod:`agent.policy.builtins` (section ``regex.split``).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any

from agent.logs import get_logger

log = get_logger("policy")

TESTED_PYTHONS = ((3, 11), (3, 12), (3, 13))


class _Refused(Exception):
    """Why a pattern is refused (caught in :func:`refusal`)."""


@dataclass(frozen=True)
class _Re:
    parser: Any
    compiler: Any
    constants: Any
    repeats: tuple[Any, ...]
    not_re2: tuple[Any, ...]
    groups: tuple[Any, ...]


def _resolve() -> _Re:
    c: Any = importlib.import_module("re._constants")
    return _Re(parser=importlib.import_module("re._parser"), compiler=importlib.import_module("re._compiler"),
               constants=c, repeats=(c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT),
               not_re2=(c.GROUPREF, c.GROUPREF_EXISTS, c.ASSERT, c.ASSERT_NOT),
               groups=(c.SUBPATTERN, c.ATOMIC_GROUP))


@cache
def internals() -> _Re | None:
    """The stdlib's regex internals, or None (logged once): an untested Python, or they are missing."""
    version = sys.version_info[:2]
    if version in TESTED_PYTHONS:
        try:
            return _resolve()
        except (ImportError, AttributeError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
    else:
        problem = (f"Python {version[0]}.{version[1]} is not among the tested "
                   f"{', '.join(f'{a}.{b}' for a, b in TESTED_PYTHONS)}")
    log.warning("regex_screen_disabled", reason=problem,
                effect="regex.split keeps only its pattern and input size caps")
    return None


def _walk(re_: _Re, items: Any, inside_repeat: bool) -> tuple[int, int]:
    """Check a parsed (sub)pattern: returns (quantifiers, repeating quantifiers, i.e. max > 1)."""
    quantifiers = repeating = 0
    for op, av in items:
        if op in re_.not_re2:
            raise _Refused("backreferences, lookaround and conditionals are not RE2 syntax")
        if op in re_.repeats:
            if inside_repeat:  # even ?: (?:a?a?)* matches a run of a's in exponentially many ways
                raise _Refused("a quantifier inside a repeating quantifier (like (a+)+ or (a?b?)*)")
            q, r = _walk(re_, av[2], av[1] > 1)
            quantifiers += 1 + q
            repeating += (av[1] > 1) + r
        elif op is re_.constants.BRANCH:
            if inside_repeat:
                raise _Refused("an alternation inside a repeating quantifier (like (a|ab)*)")
            for alt in av[1]:
                q, r = _walk(re_, alt, inside_repeat)
                quantifiers, repeating = quantifiers + q, repeating + r
        elif op in re_.groups:
            q, r = _walk(re_, av[-1], inside_repeat)
            quantifiers, repeating = quantifiers + q, repeating + r
    return quantifiers, repeating


def _check_sequence(re_: _Re, top: Any) -> None:
    """Repeating quantifiers in the top-level sequence: each later one needs a required literal,
    which the previous one cannot match, between them (else the search goes cubic or worse)."""
    prev: Any = None  # the body of the last repeating quantifier, compiled
    for op, av in top.data:
        if op in re_.repeats and av[1] > 1:
            if prev is not None:
                raise _Refused("two repeating quantifiers without a literal between them that "
                               "the first cannot match (like a*a*b or .*,.*)")
            prev = re_.compiler.compile(re_.parser.SubPattern(top.state, list(av[2])))
        elif op is re_.constants.LITERAL and prev is not None and not prev.fullmatch(chr(av)):
            prev = None


def refusal(pattern: str, *, max_quantifiers: int) -> str | None:
    """Why ``pattern`` (already compiled by ``re``: valid syntax) is refused, or None to accept it.
    Accepts everything when the screen is disabled (see :func:`internals`)."""
    re_ = internals()
    if re_ is None:
        return None
    try:
        parsed = re_.parser.parse(pattern)
        quantifiers, repeating = _walk(re_, parsed.data, False)
        if quantifiers > max_quantifiers:
            raise _Refused(f"{quantifiers} quantifiers, over the limit of {max_quantifiers}")
        if repeating > 1:
            if sum(op in re_.repeats and av[1] > 1 for op, av in parsed.data) != repeating:
                raise _Refused("several repeating quantifiers, some inside groups or alternations")
            _check_sequence(re_, parsed)
    except _Refused as exc:
        return str(exc)
    return None
