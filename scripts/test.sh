#!/usr/bin/env bash
# The test command: install what is missing, then lint, type-check, check ARM64 wheels, and run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -f scripts/build-examples.sh ] && bash scripts/build-examples.sh
.venv/bin/ruff check agent agent_devkit tests scripts
.venv/bin/mypy
bash scripts/packaging/check-arm64.sh
exec .venv/bin/python -m pytest -q "$@"
