#!/usr/bin/env bash
# Prove every runtime dependency resolves to an aarch64 wheel or pure Python for CPython 3.11+:
# pip resolves the full dependency tree for a manylinux aarch64 target with binary wheels only.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-.venv/bin/python}
deps=$("$py" - <<'PY'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY
)
status=0
for pyver in 3.11 3.12 3.13; do
  dest=$(mktemp -d)
  mapfile -t reqs <<<"$deps"
  if ! "$py" -m pip download -q --disable-pip-version-check --only-binary=:all: \
      --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
      --implementation cp --python-version "$pyver" -d "$dest" "${reqs[@]}" >"$dest.log" 2>&1; then
    echo "check-arm64: CPython $pyver: dependencies do not all resolve to aarch64 wheels:" >&2
    tail -5 "$dest.log" >&2
    status=1
  else
    bad=$(ls "$dest" | grep -vE '(aarch64|-none-any)\.whl$' || true)
    n=$(ls "$dest" | wc -l)
    if [ -n "$bad" ]; then
      echo "check-arm64: CPython $pyver: not aarch64 or pure Python: $bad" >&2
      status=1
    else
      echo "check-arm64: CPython $pyver aarch64: $n wheels, all aarch64 or pure Python"
    fi
  fi
  rm -rf "$dest" "$dest.log"
done
exit $status
