#!/usr/bin/env bash
# False events of the event model on about 3 h of everyday sounds it never trained on: the
# recordings that Debian packages ship (spoken prompts and words in many languages, voices,
# sound effects, alert/phone/alarm sounds, music on hold). Installs the packages (as root,
# about 450 MB), then runs `analyze` on every clip (monitor/training/unseen.py) and prints a
# table per source. Paths given are read from the folder it is run in.
# Usage: scripts/unseen-sources.sh [--models-dir DIR] [--json FILE]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python="$repo/.venv/bin/python"
packages=$("$python" -c 'from monitor.training.unseen import PACKAGES; print(*PACKAGES)')
missing=$(for p in $packages; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || echo "$p"
done)
if [ -n "$missing" ]; then
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$repo/.cache/numba}"
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
exec "$python" -m monitor.training.unseen "$@"
