#!/usr/bin/env bash
# Set up (if needed), then lint, type-check and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.cache/numba}"
.venv/bin/ruff check monitor tests benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
