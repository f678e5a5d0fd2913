"""Hostile and broken input, generated: Hypothesis strategies and a deterministic corpus.

The strategies build JSON *text* (not Python values) so they can hold what Python's own encoder
never writes: NaN/Infinity tokens, numbers that overflow a float, integers of hundreds or thousands
of digits, lone surrogate escapes, duplicate keys, nesting far past any limit. The property tests
feed them to the real parsers; the bus test publishes :func:`corpus` to a real broker.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class Raw:
    """A token written verbatim into the JSON text."""

    text: str


# tokens a strict RFC 8259 parser with a 64-bit integer range must refuse wherever they appear
HOSTILE_TOKENS = ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E999", "9" * 20, "9" * 309,
                  "-" + "9" * 309, "1" * 5000, str(2**63), str(-(2**63) - 1))
LONE_SURROGATES = ('"\\ud800"', '"\\udfff"', '"a\\ud83d"', '"\\ude00b"')


def render(node: Any) -> str:
    """JSON text of a tree whose leaves may be :class:`Raw` tokens (dict keys may be Raw too)."""
    if isinstance(node, Raw):
        return node.text
    if isinstance(node, dict):
        return "{" + ",".join(f"{render(k) if isinstance(k, Raw) else json.dumps(k)}:{render(v)}"
                              for k, v in node.items()) + "}"
    if isinstance(node, list):
        return "[" + ",".join(render(v) for v in node) + "]"
    return json.dumps(node)


def text_without_surrogates(max_size: int = 12) -> st.SearchStrategy[str]:
    return st.text(st.characters(exclude_categories=["Cs"]), max_size=max_size)


def json_scalars() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), st.integers(*INT64),
                     st.floats(allow_nan=False, allow_infinity=False), text_without_surrogates())


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Values every strict parser must accept (and round-trip)."""
    return st.recursive(json_scalars(), lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(text_without_surrogates(8), children, max_size=4)),
        max_leaves=max_leaves)


def hostile_leaf() -> st.SearchStrategy[Raw]:
    return st.sampled_from([Raw(t) for t in HOSTILE_TOKENS + LONE_SURROGATES])


def with_hostile_leaf(base: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[Any]:
    """A tree that holds at least one hostile token somewhere (as a value, or a lone-surrogate key)."""
    inner = base if base is not None else json_values(8)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        tree = draw(inner)
        bad = draw(hostile_leaf())
        return _plant(draw, tree, bad)
    return build()


def _plant(draw: st.DrawFn, tree: Any, bad: Raw) -> Any:
    """Put ``bad`` at a random place of ``tree`` (replacing a leaf or adding an item)."""
    if isinstance(tree, dict) and tree and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(tree)))
        return {**tree, key: _plant(draw, tree[key], bad)}
    if isinstance(tree, list) and tree and draw(st.booleans()):
        i = draw(st.integers(0, len(tree) - 1))
        return [*tree[:i], _plant(draw, tree[i], bad), *tree[i + 1:]]
    if isinstance(tree, dict):
        if bad.text.startswith('"') and draw(st.booleans()):
            return {**tree, bad: 1}  # a lone surrogate as a key
        return {**tree, "x" * (len(tree) + 1): bad}
    if isinstance(tree, list):
        return [*tree, bad]
    return bad


def deep(depth: int, opener: str = "[") -> str:
    closer = "]" if opener == "[" else "}"
    if opener == "{":
        return '{"a":' * depth + "1" + closer * depth
    return opener * depth + closer * depth


def duplicate_key_doc(key: str = "value") -> str:
    return f'{{"{key}": 1, "{key}": 2}}'


# ---- a deterministic hostile corpus for sensor topics (bus tests, fuzz script) -------------------

def corpus(seed: int = 11, size: int = 400) -> list[tuple[str, bytes]]:
    """(topic suffix under ``<root>/``, payload) pairs that are NOT valid readings, one of each class
    first, then random mixes. Every one must be refused, acknowledged and counted."""
    rng = random.Random(seed)
    fixed: list[bytes] = [
        b"", b"   ", b"hot", b"\xff\xfe", b"\xef\xbb\xbf21.5", b"NaN", b"Infinity", b"-Infinity", b"1e400",
        b"9" * 309, b"1" * 5000, b'{"value": ' + b"9" * 309 + b"}", b'{"value": 1, "x": NaN}',
        b'{"value": 1e400}', b'{"value": 1, "extra": [1, 2, {"deep": -Infinity}]}', b'{"v": 2}', b"null",
        b"[]", b"[[1]]", deep(5000).encode(), deep(64, "{").encode(), duplicate_key_doc().encode(),
        b'{"value": "\\ud800"}', b"{", b"[1,", b'"unterminated', b"\x00", b'{"value": 1}\x00',
        b"1 2", b"01", b"1.", b".5", b"+1", b"0x10", b"true false",
    ]
    items: list[tuple[str, bytes]] = [("l1/sensor/temp", p) for p in fixed]
    # the object shape (<root>/<line>/<sensor>): metric names that are not topic levels, hostile values
    items += [("l1/sensor", p) for p in (
        b'{"\\ud800": 1}', b'{"a/b": 1}', b'{"+": 1}', b'{"#": 1}', b'{"": 1}', b'{"t": NaN}',
        b'{"t": 1, "t": 2}', b'{"t": ' + b"9" * 400 + b"}", b"5", b"[1]", b"{}")]
    while len(items) < size:
        base = rng.choice([*fixed, b'{"value": %d}' % rng.randint(0, 99), b"%f" % rng.random()])
        bad = rng.choice(HOSTILE_TOKENS + LONE_SURROGATES).encode()
        cut = rng.randint(0, len(base))
        mixed = base[:cut] + bad + base[cut:]
        try:
            json.loads(mixed)
        except ValueError:
            items.append(("l1/fuzz/m", mixed))
            continue
        # Python's json accepted it: still hostile for a strict parser (NaN, huge numbers): keep it
        # only if it holds one of the refused tokens
        if any(t.encode() in mixed for t in HOSTILE_TOKENS + LONE_SURROGATES):
            items.append(("l1/fuzz/m", mixed))
    return items[:size]
