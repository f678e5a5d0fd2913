"""The package graph of ``agent`` is a layered DAG: a unit imports only from the layers below it.

A unit is a top-level package or module of ``agent`` (``agent/trust/``, ``agent/clock.py``). Every
import counts — at module level, inside a function, under ``TYPE_CHECKING`` — because each one is a
dependency a reader has to know about. The order, bottom to top (docs/contributing.md says why):
leaves, the input guards, config, storage, the Wasm and OCI layer, the domains (trust, policy,
messaging, runtime, control, sync, fleet — a DAG among themselves too), the daemon, the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

from agent_devkit import REPO

LAYERS: tuple[tuple[str, ...], ...] = (
    ("agent", "errors", "logs", "clock", "offload"),  # leaves ("agent" = the package root: __version__)
    ("jsonsafe", "handlers"),  # the one strict JSON decoder and the one handler guard: every input path
    ("config",),
    ("storage",),
    ("wasm", "oci"),  # what runs and fetches artifacts: the Wasm layer, the OCI registry client and layouts
    ("trust",),
    ("policy",),
    ("messaging",),
    ("runtime",),
    ("control",),
    ("sync",),
    ("fleet",),
    ("daemon",),
    ("cli",),
    ("__main__",),
)


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of ``root.name`` in ``path``, relative ones resolved."""
    package = root.name
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    here = parts if parts[-1] == "__init__" else parts[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] if node.level else [])
            module = ".".join(p for p in (base, node.module or "") if p)
            if module == package:  # from agent import clock → the unit clock; from agent import __version__
                found += [(node.lineno, f"{package}.{a.name}" if (root / a.name).exists()
                           or (root / f"{a.name}.py").exists() else package) for a in node.names]
            else:
                found.append((node.lineno, module))
    return [(line, m) for line, m in found if m == package or m.startswith(package + ".")]


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def violations(root: Path, layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[str]:
    """Every import that does not point strictly down the layers, named by file, line and target."""
    rank = {unit: i for i, layer in enumerate(layers) for unit in layer}
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        source = _unit(".".join(rel.with_suffix("").parts))
        if source.endswith("__init__"):
            source = root.name
        if source not in rank:
            found.append(f"{rel}: the unit '{source}' is in no layer (add it to LAYERS and docs/contributing.md)")
            continue
        for line, module in _imports(path, root):
            target = _unit(module)
            if target == source:
                continue
            if target not in rank:
                found.append(f"{rel}:{line}: imports {module}, whose unit '{target}' is in no layer")
            elif rank[target] >= rank[source]:
                how = "sideways (same layer)" if rank[target] == rank[source] else "upward"
                found.append(f"{rel}:{line}: {source} (layer {rank[source]}) imports {module} "
                             f"(layer {rank[target]}): {how}")
    return found


def test_no_package_imports_upward_or_sideways() -> None:
    problems = violations(REPO / "agent")
    assert not problems, "the package graph must point down the layers:\n" + "\n".join(problems)


def test_the_check_names_an_upward_import_and_an_unplaced_package(tmp_path: Path) -> None:
    """The check itself can fail: a storage module importing the daemon, and a package in no layer."""
    root = tmp_path / "agent"
    for name, text in {"__init__.py": "", "storage/__init__.py": "",
                       "storage/db.py": "import json\nfrom agent.daemon.main import run\n",
                       "daemon/__init__.py": "", "daemon/main.py": "from ..storage import db\n",
                       "gadgets/__init__.py": ""}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    problems = violations(root)
    assert "agent/storage/db.py:2: storage (layer 3) imports agent.daemon.main (layer 12): upward" in problems
    assert any(p.startswith("agent/gadgets/__init__.py: the unit 'gadgets' is in no layer") for p in problems)
    assert not any(p.startswith("agent/daemon/main.py") for p in problems)  # relative, and downward


def test_every_agent_package_has_a_layer() -> None:
    units = {p.stem if p.is_file() else p.name for p in (REPO / "agent").iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.name != "__init__.py"}
    placed = {u for layer in LAYERS for u in layer}
    assert units <= placed, sorted(units - placed)
    assert placed - units == {"agent"}, sorted(placed - units)
