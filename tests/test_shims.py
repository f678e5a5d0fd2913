"""The private-API shims: each works under the pinned version, falls back (and says so) under another,
runs nothing at import, and is the only code that reaches into the library it shims.

- ``agent.wasm.calls`` (fast guest calls, the host-exception slot) and ``agent.wasm.wasi_io`` (stdin
  bytes, memory-file output) over wasmtime-py internals, pinned by ``agent.wasm.pinned``;
- ``agent.policy.regex_screen`` over the stdlib's ``re._parser``, pinned to the tested Pythons;
- ``agent.policy.json_encoder`` over ``json.encoder.c_make_encoder``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import wasmtime

from agent import logs as agent_logs
from agent.policy import json_encoder, regex_screen
from agent.policy.builtins import default_builtins
from agent.policy.errors import BuiltinError
from agent.policy.registry_builtins import BuiltinContext
from agent.wasm import calls, pinned, wasi_io
from agent_devkit import REPO

SHIM_CACHES: list[Any] = [pinned.wasmtime_problem, calls.fast_path, calls.last_exception_slot,
                          wasi_io.stdin_bytes_setter, wasi_io.memfd_native, regex_screen.internals,
                          json_encoder.c_encoder]


@pytest.fixture
def fresh_shims() -> Iterator[None]:
    """Each shim resolves again (and logs again) inside the test, and again after it; every level is
    logged (an earlier test in this process may have configured the CLI's quieter level)."""
    agent_logs.configure(level="debug", fmt="json")
    for cached in SHIM_CACHES:
        cached.cache_clear()
    try:
        yield
    finally:
        for cached in SHIM_CACHES:
            cached.cache_clear()


def test_under_the_pinned_wasmtime_every_wasm_shim_is_used(fresh_shims: None) -> None:
    from importlib.metadata import version

    assert version("wasmtime") == pinned.WASMTIME_PINNED  # pyproject.toml pins the same version
    with structlog.testing.capture_logs() as logs:
        assert pinned.wasmtime_problem() is None
        assert calls.fast_path() is not None and calls.last_exception_slot() is not None
        assert wasi_io.stdin_bytes_setter() is not None
        if sys.platform == "linux":
            assert wasi_io.memfd_native() is not None  # proven with a real guest
    assert not [e for e in logs if e["event"] == "wasm_shim_fallback"]


def test_under_another_wasmtime_every_wasm_shim_falls_back_and_says_so(fresh_shims: None,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pinned, "version", lambda _name: "51.0.0")
    with structlog.testing.capture_logs() as logs:
        assert calls.fast_path() is None and calls.last_exception_slot() is None
        assert wasi_io.stdin_bytes_setter() is None and wasi_io.memfd_native() is None
        assert calls.fast_path() is None  # resolved once: logged once
    fallbacks = {e["shim"]: e for e in logs if e["event"] == "wasm_shim_fallback"}
    assert set(fallbacks) == {"fast_calls", "host_exception_slot", "stdin_bytes", "memfd_output"}
    assert all("51.0.0" in e["reason"] and "50.0.1" in e["reason"] and e["instead"] for e in fallbacks.values())
    assert len([e for e in logs if e["event"] == "wasm_shim_fallback"]) == 4
    # and the runtimes still work, through the public API
    from agent.runtime.runner import Limits, ModuleRunner
    from agent.wasm.engine import shared_engine

    engine = shared_engine()
    runner = ModuleRunner(engine)
    assert runner.native is None
    echo = engine.compile(bytes(wasmtime.wat2wasm(ECHO_WAT)))
    run = runner.execute(echo, b"stdin-bytes", Limits(deadline_s=5.0, memory_bytes=16 << 20, stdout_bytes=100))
    assert (run.outcome, run.stdout) == ("ok", b"stdin-bytes")


# a WASI command that copies up to 64 bytes of stdin to stdout
ECHO_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const 64))
    (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 4) (i32.load (i32.const 8)))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))))"""


def test_the_regex_screen_is_pinned_to_the_tested_pythons_and_logs_when_it_is_off(
        fresh_shims: None, monkeypatch: pytest.MonkeyPatch) -> None:
    split = default_builtins().get("regex.split")
    assert split is not None
    assert sys.version_info[:2] in regex_screen.TESTED_PYTHONS
    with pytest.raises(BuiltinError, match="quantifier inside a repeating quantifier"):
        split(BuiltinContext(now_ns=0), "(a+)+b", "aaa")
    regex_screen.internals.cache_clear()
    monkeypatch.setattr(regex_screen, "TESTED_PYTHONS", ((3, 99),))
    with structlog.testing.capture_logs() as logs:
        # disabled: only the size caps are left, and the agent says so
        assert split(BuiltinContext(now_ns=0), "(a+)+b", "aab") == ["", ""]
    (event,) = [e for e in logs if e["event"] == "regex_screen_disabled"]
    assert "not among the tested" in event["reason"] and "size caps" in event["effect"]


def test_the_json_encoder_shim_gives_the_public_encoders_bytes_and_logs_its_fallback(
        fresh_shims: None, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = {"kind": "actuation", "v": [1, 2.5, None, True], "s": "é\u2028"}
    fast = json_encoder.encode(doc)
    assert json_encoder.c_encoder() is not None
    json_encoder.c_encoder.cache_clear()
    monkeypatch.setattr("json.encoder.c_make_encoder", None)  # a Python built without the C accelerator
    with structlog.testing.capture_logs() as logs:
        assert json_encoder.encode(doc) == fast
    assert [e["event"] for e in logs] == ["json_c_encoder_unavailable"]


def test_nothing_runs_at_import() -> None:
    """Importing the runtimes resolves no shim: the memfd proof runs when the first runner is built."""
    code = ("import agent.policy.engine, agent.runtime.runner, agent.policy.builtins\n"
            "from agent.wasm import calls, wasi_io\n"
            "from agent.policy import regex_screen, json_encoder\n"
            "caches = [calls.fast_path, wasi_io.memfd_native, wasi_io.stdin_bytes_setter,\n"
            "          regex_screen.internals, json_encoder.c_encoder]\n"
            "print(sum(c.cache_info().currsize for c in caches))\n"
            "from agent.runtime.runner import ModuleRunner\n"
            "from agent.wasm.engine import WasmEngine\n"
            "ModuleRunner(WasmEngine())\n"
            "print(wasi_io.memfd_native.cache_info().currsize)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["0", "1"], out.stderr


def _imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


def test_only_the_shims_reach_into_private_modules_and_no_private_name_crosses_a_module() -> None:
    shims = {"agent/wasm/calls.py", "agent/wasm/wasi_io.py"}
    problems = []
    for root in ("agent", "agent_devkit", "scripts"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            for line, name in _imports(path):
                parts = name.split(".")
                if name.startswith("wasmtime._") and rel not in shims:
                    problems.append(f"{rel}:{line}: imports {name} (only {sorted(shims)} may)")
                elif parts[0] in ("agent", "agent_devkit") and parts[-1].startswith("_") \
                        and not parts[-1].startswith("__"):
                    problems.append(f"{rel}:{line}: imports the private name {name}")
    assert not problems, "\n".join(problems)
