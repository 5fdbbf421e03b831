"""The C capture callback, called directly as PortAudio would, against the Python reader."""

from __future__ import annotations

import os
import threading
import time
from types import ModuleType

import numpy as np
import pytest

from monitor.capture import native_capture
from monitor.capture.ringbuffer import SpscRingBuffer

REQUIRE_BUILT = os.environ.get("AUDIO_MONITOR_REQUIRE_AOT") == "1"  # CI: never skip


def require_native_capture() -> ModuleType:
    module = native_capture.load()
    if module is None:
        if REQUIRE_BUILT:
            pytest.fail("the C capture callback is missing or stale: run "
                        "`python -m monitor.capture.native_capture` (scripts/setup.sh does)")
        pytest.skip("C capture callback not built (`python -m monitor.capture.native_capture`)")
    return module


class CWriter:
    """Calls the compiled callback with a block of interleaved float32 frames."""

    def __init__(self, ring: SpscRingBuffer, channels: int) -> None:
        self.module = require_native_capture()
        capture = ring.native_capture(channels)
        assert capture is not None
        self.capture = capture
        self.channels = channels

    def write(self, frames: np.ndarray, flags: int = 0) -> None:
        block = np.ascontiguousarray(frames, dtype=np.float32)
        ffi, lib = self.module.ffi, self.module.lib
        result = lib.am_capture_callback(ffi.cast("void *", block.ctypes.data), ffi.NULL,
                                         block.shape[0] // self.channels, ffi.NULL, flags,
                                         self.capture.userdata)
        assert result == 0  # paContinue


def test_c_writer_hands_a_ramp_to_the_python_reader_intact() -> None:
    """Real threads: the C callback (GIL released during the call) writes a ramp in random
    blocks, the Python reader drains in other random sizes: in order, nothing lost."""
    ring = SpscRingBuffer(4096)
    writer = CWriter(ring, channels=2)
    total = 400_000
    ramp = np.arange(total, dtype=np.float32)
    received = np.zeros(total, dtype=np.float32)

    def write_all() -> None:
        rng = np.random.default_rng(1)
        pos = 0
        while pos < total:
            n = min(2 * int(rng.integers(1, 350)), total - pos)
            while ring.free_space() < n:
                time.sleep(0.0002)
            writer.write(ramp[pos:pos + n])
            pos += n

    thread = threading.Thread(target=write_all, name="test-c-writer")
    thread.start()
    count, rng = 0, np.random.default_rng(2)
    deadline = time.monotonic() + 60
    while count < total and time.monotonic() < deadline:
        n = ring.readinto(received[count:count + int(rng.integers(2, 1024))], multiple_of=2)
        count += n
        if n == 0:
            time.sleep(0.0001)
    thread.join(10)
    assert count == total
    np.testing.assert_array_equal(received, ramp)
    assert ring.overrun_samples == 0
    callbacks, overflows, underflows = writer.capture.counts()
    assert callbacks > 100 and overflows == underflows == 0


def test_c_writer_drops_what_does_not_fit_and_counts_flags() -> None:
    ring = SpscRingBuffer(16)
    writer = CWriter(ring, channels=1)
    writer.write(np.arange(10, dtype=np.float32))
    writer.write(np.arange(10, 20, dtype=np.float32), flags=0x2)  # paInputOverflow
    writer.write(np.arange(20, 24, dtype=np.float32), flags=0x1)  # paInputUnderflow
    assert ring.written_total == 16
    assert ring.overrun_samples == 4 + 4 and ring.overrun_events == 2
    assert writer.capture.counts() == (3, 1, 1)
    out = np.zeros(16, dtype=np.float32)
    assert ring.readinto(out) == 16
    np.testing.assert_array_equal(out, np.arange(16, dtype=np.float32))  # the tail was dropped
    writer.write(np.arange(30, 50, dtype=np.float32))  # wraps around the end of the ring
    assert ring.readinto(out) == 16
    np.testing.assert_array_equal(out, np.arange(30, 46, dtype=np.float32))


def test_a_stale_build_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """An extension built from other C source is ignored (the Python callback runs)."""
    require_native_capture()
    native_capture._fresh_module.cache_clear()
    monkeypatch.setattr(native_capture, "source_digest", lambda: "0" * 64)
    try:
        assert native_capture.load() is None
        assert SpscRingBuffer(16).native_capture(1) is None
    finally:
        native_capture._fresh_module.cache_clear()


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    require_native_capture()
    monkeypatch.setenv(native_capture.PYTHON_CAPTURE_ENV, "1")
    assert native_capture.load() is None
