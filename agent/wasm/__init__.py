"""The Wasm layer under the policy and module runtimes: one wasmtime engine, the precompiled-code
cache, and the only code that touches wasmtime-py's private internals (each behind a pinned,
tested shim with a logged fallback).

Nothing is imported here on purpose: ``edge-agent status`` must start without loading wasmtime.
Import the submodules: ``agent.wasm.engine`` (:class:`WasmEngine`, :func:`shared_engine`),
``agent.wasm.codecache``, ``agent.wasm.calls`` (guest-call adapters).
"""
