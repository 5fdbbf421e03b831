#!/usr/bin/env bash
# Idempotent set-up on Debian: system packages, a virtual environment, pinned Python
# packages, and the pretrained models. Usage: scripts/setup.sh [run|dev]
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-run}"

# gcc, libc6-dev and python3-dev build the ahead-of-time kernels (monitor/dsp/jit.py) and the
# C capture callback (monitor/capture/native_capture.py).
packages=(libportaudio2 libsndfile1 python3-venv gcc libc6-dev python3-dev)
# qemu-user runs the detector on an emulated AVX2-only CPU (tests/test_detector.py).
[ "$profile" = dev ] && packages+=(jackd2 tmux systemd mosquitto espeak-ng qemu-user)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
requirements=requirements.txt
[ "$profile" = dev ] && requirements=requirements-dev.txt
stamp=".venv/.installed-$profile-$(sha256sum "$requirements" requirements.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$requirements"
  .venv/bin/python -m pip install -q --no-deps -e .
  touch "$stamp"
fi

export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.cache/numba}"
# Kernels compiled ahead of time keep Numba and LLVM out of the daemon; if the build fails
# they are compiled just in time instead, so it is not fatal.
.venv/bin/python -m monitor.dsp.jit --if-stale || echo "setup: kernels will be compiled just in time"
# The C capture callback keeps the audio thread out of Python (and off the GIL); without it
# the Python callback captures instead.
.venv/bin/python -m monitor.capture.native_capture --if-stale || echo "setup: capture will use the Python callback"
.venv/bin/audio-monitor fetch-models
