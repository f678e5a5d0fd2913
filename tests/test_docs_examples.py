"""The release predicate examples in docs/ are read by the agent's real parsers, so docs and code
cannot drift apart: the predicate parser (trust) and the module runtime's spec parser."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.runtime.spec import parse_spec
from agent.trust.predicate import parse_predicate
from agent_devkit import REPO

FLEET = (REPO / "docs" / "fleet.md").read_text()
AUTHORING = (REPO / "docs" / "authoring.md").read_text()


def section(text: str, title: str) -> str:
    """From the heading ``title`` to the next heading of any level."""
    start = text.index(title)
    nxt = re.search(r"^#{1,6} ", text[start + len(title):], re.M)
    return text[start:start + len(title) + nxt.start()] if nxt else text[start:]


def json_blocks(text: str) -> list[Any]:
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", text, flags=re.S)]


def test_release_section_examples_parse_with_the_real_parsers() -> None:
    policy_meta, module_meta = json_blocks(section(FLEET, "### The predicate `urn:edge-agent:release:v1`"))
    policy = parse_predicate({"kind": "policy", "name": "line1-safety", "version": 7, **policy_meta})
    assert policy.entrypoints == ("factory/allow",) and policy.trigger is None
    module = parse_predicate({"kind": "module", "name": "thermostat", "version": 1, **module_meta})
    spec = parse_spec(module.raw)  # the exact object the module runtime reads at load and at install
    assert spec.trigger_type == "mixed" and spec.schedule is not None and spec.schedule.interval_s == 10
    assert spec.topics == ("factory/+/+/temp",) and spec.batch_window_ms == 200
    assert spec.readings is not None and spec.readings.window_s == 300
    assert (spec.memory_mb, spec.deadline_ms) == (16, 50)


def test_release_table_trigger_examples_parse_with_the_spec_parser() -> None:
    """Every inline ``{"type": …}`` trigger example in the predicate table is a valid runtime trigger."""
    row = next(line for line in section(FLEET, "### The predicate `urn:edge-agent:release:v1`").splitlines()
               if line.startswith("| `trigger` |"))
    examples = [json.loads(m) for m in re.findall(r"`(\{\"type\".*?\})`", row)]
    assert len(examples) >= 2
    for trigger in examples:
        assert parse_spec({"trigger": trigger}).trigger_type == trigger["type"]


def test_workload_module_example_parses_with_the_spec_parser() -> None:
    meta = next(b for b in json_blocks(AUTHORING) if isinstance(b, dict) and "trigger" in b and "config" in b
                and b["trigger"].get("type") == "topic")
    spec = parse_spec(parse_predicate({"kind": "module", "name": "thermostat", "version": 1, **meta}).raw)
    assert spec.topics == ("factory/+/+/temp",) and spec.config["metric"] == "temp"


DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_json_block_in_the_docs_is_json() -> None:
    bad = []
    for doc in DOC_FILES:
        for block in re.findall(r"```json\n(.*?)\n```", doc.read_text(), flags=re.S):
            try:
                json.loads(block)
            except ValueError as exc:
                bad.append(f"{doc.name}: {exc}: {block[:80]!r}")
    assert not bad, "\n".join(bad)


def test_every_toml_block_in_the_docs_is_a_valid_agent_config(tmp_path: Path) -> None:
    blocks = [(doc.name, b) for doc in DOC_FILES
              for b in re.findall(r"```toml\n(.*?)```", doc.read_text(), flags=re.S)]
    assert blocks
    for i, (name, block) in enumerate(blocks):
        path = tmp_path / f"{i}-{name}.toml"
        path.write_text(block)
        load_config(path)  # raises ConfigError naming the key if the docs drifted from the schema
