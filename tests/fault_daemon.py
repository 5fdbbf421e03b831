"""`audio-monitor` with a fault switch, for tests only (`python tests/fault_daemon.py run ...`):
SIGUSR2 freezes the processing stage and a second SIGUSR2 thaws it. While frozen the
daemon's loop, its watchdog and the capture go on, but no audio is read from the ring, as
if the chain hung; the production code carries no switch for this."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.capture.ringbuffer import SpscRingBuffer
from monitor.cli import main

IDLE_WAIT_S = 0.005  # while frozen the loop would spin: sleep this long a turn instead
frozen = threading.Event()
_readinto = SpscRingBuffer.readinto
_wait_for = SpscRingBuffer.wait_for


def readinto(self: SpscRingBuffer, out: Any, **kwargs: Any) -> int:
    return 0 if frozen.is_set() else _readinto(self, out, **kwargs)


def wait_for(self: SpscRingBuffer, count: int, timeout: float) -> bool:
    if frozen.is_set():
        time.sleep(IDLE_WAIT_S)
        return False
    return _wait_for(self, count, timeout)


def toggle(*_: Any) -> None:
    if frozen.is_set():
        frozen.clear()
    else:
        frozen.set()


if __name__ == "__main__":
    SpscRingBuffer.readinto = readinto  # type: ignore[method-assign]
    SpscRingBuffer.wait_for = wait_for  # type: ignore[method-assign]
    signal.signal(signal.SIGUSR2, toggle)
    sys.exit(main(sys.argv[1:]))
