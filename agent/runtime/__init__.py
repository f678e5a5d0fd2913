"""runtime package: the workload-module runtime (Wasm modules run under WASI, scheduled and triggered)."""
