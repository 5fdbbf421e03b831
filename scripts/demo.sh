#!/usr/bin/env bash
# Set up (if needed) and run the demo: real recordings through the whole pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh run
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.cache/numba}"
exec .venv/bin/audio-monitor demo "$@"
