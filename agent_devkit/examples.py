"""The example and test Wasm modules, built from source by ``scripts/build-examples.sh`` (needs a checkout)."""

from __future__ import annotations

import subprocess

from agent_devkit import REPO

BUILD = REPO / "examples" / "build"
TEST_BUILD = BUILD / "test-modules"
_built = False


def build_modules() -> None:
    """Run scripts/build-examples.sh once per test session (fast when up to date)."""
    global _built
    if not _built:
        subprocess.run(["bash", str(REPO / "scripts" / "build-examples.sh")], check=True, cwd=REPO,
                       capture_output=True, timeout=300)
        _built = True


def example(name: str) -> bytes:
    build_modules()
    return (BUILD / f"{name}.wasm").read_bytes()


def test_module(name: str) -> bytes:
    build_modules()
    return (TEST_BUILD / f"{name}.wasm").read_bytes()


test_module.__test__ = False  # type: ignore[attr-defined]  # pytest must not collect it
