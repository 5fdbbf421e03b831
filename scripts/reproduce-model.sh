#!/usr/bin/env bash
# Retrain the event head from ../shared/data into a scratch folder (no feature cache) and
# check that it is the shipped one: the composed graph's sha256 (head weights and open-set
# bounds), the thresholds, the rules and the onset lead in models/events.json.
# Exit 0: reproduced; 1: differs on the kind of CPU the card says the model was made on
# (`training.made_on`); 3: differs on another kind of CPU (reported only).
# Usage: scripts/reproduce-model.sh   (needs requirements-train.txt installed)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/models"
cp models/yamnet.onnx models/yamnet.json "$work/models/"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.cache/numba}"
# The shipped model was made with two BLAS threads (2 cores); a thread count can change sums.
export OPENBLAS_NUM_THREADS=2 OMP_NUM_THREADS=2
# ... and with OpenBLAS's SkylakeX kernels. OpenBLAS picks kernels by CPU model, or as
# OPENBLAS_CORETYPE says (some machines set it to Haswell in their environment: measured,
# another sha256 and the same rules), so name them wherever the CPU can run them (AVX-512 F,
# CD, BW, DQ and VL), whatever the environment says.
if [ -r /proc/cpuinfo ] && grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' \
    | grep -cxE 'avx512(f|cd|bw|dq|vl)' | grep -qx 5; then
  export OPENBLAS_CORETYPE=SkylakeX
fi
start=$(date +%s)
.venv/bin/audio-monitor train --models-dir "$work/models" > "$work/train.json"
echo "reproduce-model: trained in $(( $(date +%s) - start )) s"
.venv/bin/python - "$work/models/events.json" models/events.json <<'PY'
import json
import sys

fresh, shipped = (json.load(open(path, encoding="utf-8")) for path in sys.argv[1:])
keys = ("sha256", "thresholds", "rules", "onset_lead_ms")
diff = [k for k in keys if fresh[k] != shipped[k]]
if not diff:
    print("reproduce-model: the shipped event model is what `audio-monitor train` makes")
    sys.exit(0)
for k in diff:
    print(f"reproduce-model: {k} differs: fresh {fresh[k]!r}, shipped {shipped[k]!r}")
made_on, here = shipped["training"].get("made_on"), fresh["training"].get("made_on")
if made_on is not None and made_on.get("cpu") is not None and made_on == here:
    sys.exit(f"reproduce-model: on the kind of CPU the shipped model was made on ({made_on}), "
             "`audio-monitor train` does not reproduce it")
# ONNX Runtime's int8 kernels and the BLAS under the fit differ between CPU kinds.
print(f"reproduce-model: the shipped model was made on {made_on}, this CPU is {here}: "
      "a difference here is reported, not failed")
sys.exit(3)
PY
