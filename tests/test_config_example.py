"""configs/agent.example.toml documents every key of the schema; the demo config is valid.

When this fails after you added a setting: document it in configs/agent.example.toml under its table,
as ``key = <default>`` with a comment above it (meaning, "Valid: …", "Default: …").
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, load_config
from agent.config.schema import describe

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "agent.example.toml"
DEMO = REPO / "configs" / "demo.toml"


def _lookup(raw: dict[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _table_block(text: str, table: str) -> str:
    """The lines of ``[table]`` up to the next table header (sub-tables of it included)."""
    match = re.search(rf"^\[{re.escape(table)}\]\s*$", text, re.M)
    if match is None:
        return ""
    nxt = re.search(r"^\[(?!" + re.escape(table) + r"\.)[^\]]+\]\s*$", text[match.end():], re.M)
    return text[match.end(): match.end() + nxt.start()] if nxt else text[match.end():]


def test_example_config_parses_with_the_real_loader() -> None:
    config = load_config(EXAMPLE)
    assert config.state_dir == Path("/var/lib/edge-agent")  # what install.sh puts on a gateway


def test_every_schema_key_is_documented_in_the_example() -> None:
    text = EXAMPLE.read_text()
    raw = tomllib.loads(text)
    lines = text.splitlines()
    missing: list[str] = []
    undocumented: list[str] = []
    for key, tp, _doc, _default, _secret in describe(AgentConfig):
        table, leaf = key.rsplit(".", 1)
        present, _ = _lookup(raw, key)
        block = _table_block(text, table)
        commented = re.search(rf"^#\s*{re.escape(leaf)}\s*=", block, re.M) is not None
        if not present and not (tp == "a table" and commented):
            missing.append(key)
            continue
        # the comment right above the key says what it is, what is valid and the default
        idx = next((i for i, line in enumerate(lines)
                    if re.match(rf"^#?\s*{re.escape(leaf)}\s*=", line) and line in block.splitlines()), None)
        above: list[str] = []
        j = (idx or 0) - 1
        while idx is not None and j >= 0 and lines[j].startswith("#"):
            above.append(lines[j])
            j -= 1
        comment = "\n".join(above)
        if "Valid:" not in comment or "Default:" not in comment or len(above) < 2:
            undocumented.append(key)
    assert not missing, (f"keys missing from {EXAMPLE.name} (add `key = <default>` under their table): "
                         f"{missing}")
    assert not undocumented, (f"keys in {EXAMPLE.name} without a comment above them giving the meaning, "
                              f"'Valid: …' and 'Default: …': {undocumented}")


def test_example_has_no_keys_the_schema_does_not_know() -> None:
    # the loader refuses unknown keys; this makes the failure point at the example file
    raw = tomllib.loads(EXAMPLE.read_text())
    known = {k for k, *_ in describe(AgentConfig)}

    def walk(node: dict[str, Any], prefix: str) -> list[str]:
        out: list[str] = []
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict) and key not in known:
                out.extend(walk(v, key))
            elif key not in known:
                out.append(key)
        return out

    assert walk(raw, "") == []


def test_demo_config_keeps_state_in_the_repo_and_uses_the_local_broker() -> None:
    config = load_config(DEMO)
    assert config.state_dir == REPO / "var" / "demo" / "state"
    assert (config.local_broker.host, config.local_broker.port) == ("127.0.0.1", 1883)
