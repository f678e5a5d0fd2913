#!/usr/bin/env bash
# Build the example workload modules (and the test modules) from source, the way users would:
#   C   -> Debian clang --target=wasm32-wasi + wasi-libc + lld (libclang-rt-14-dev-wasm32 builtins)
#   WAT -> Wasm binary (wasmtime's wat2wasm, from the project venv)
# Output: examples/build/*.wasm and examples/build/test-modules/*.wasm (gitignored).
# Idempotent and fast: a target is rebuilt only when a source (or mjson.h) is newer than it.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=examples/build
TOUT=$OUT/test-modules
mkdir -p "$OUT" "$TOUT"
CLANG=${CLANG:-clang}
# Debian's wasi-libc installs its headers and libs under /usr/{include,lib}/wasm32-wasi: the
# sysroot is /usr. Override with WASI_SYSROOT for the upstream wasi-sdk layout.
SYSROOT=${WASI_SYSROOT:-/usr}
PY=${PYTHON:-.venv/bin/python}
CFLAGS=(--target=wasm32-wasi "--sysroot=$SYSROOT" -O2 -Wall -Wextra -fuse-ld=lld -Wl,--strip-all)

built=0
stale() {  # stale TARGET SOURCES...: true if TARGET is missing or older than any source
    local target=$1; shift
    [ -f "$target" ] || return 0
    local src
    for src in "$@"; do [ "$src" -nt "$target" ] && return 0; done
    return 1
}

build_c() {  # build_c SOURCE TARGET
    local src=$1 target=$2
    if stale "$target" "$src" examples/modules/mjson.h "$0"; then
        "$CLANG" "${CFLAGS[@]}" -Iexamples/modules -o "$target.tmp" "$src"
        mv -f "$target.tmp" "$target"
        built=$((built + 1))
    fi
}

build_wat() {  # build_wat SOURCE TARGET
    local src=$1 target=$2
    if stale "$target" "$src"; then
        "$PY" -c 'import sys, wasmtime; open(sys.argv[2], "wb").write(wasmtime.wat2wasm(open(sys.argv[1]).read()))' \
            "$src" "$target.tmp"
        mv -f "$target.tmp" "$target"
        built=$((built + 1))
    fi
}

for src in examples/modules/*.c; do build_c "$src" "$OUT/$(basename "${src%.c}").wasm"; done
for src in examples/modules/*.wat; do build_wat "$src" "$OUT/$(basename "${src%.wat}").wasm"; done
for src in tests/modules/*.c; do [ -e "$src" ] && build_c "$src" "$TOUT/$(basename "${src%.c}").wasm"; done
for src in tests/modules/*.wat; do [ -e "$src" ] && build_wat "$src" "$TOUT/$(basename "${src%.wat}").wasm"; done
echo "build-examples: $built module(s) rebuilt, outputs in $OUT"
