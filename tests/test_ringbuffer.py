"""SpscRingBuffer: wrap-around, overrun accounting, and a real two-thread hand-off."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_native_capture import CWriter

from monitor.capture.ringbuffer import SpscRingBuffer


def test_capacity_must_be_power_of_two() -> None:
    for bad in (0, 3, 6, 1000, -8):
        with pytest.raises(ValueError, match=str(bad)):
            SpscRingBuffer(bad)
    with pytest.raises(ValueError):
        SpscRingBuffer(8.0)  # type: ignore[arg-type]
    assert SpscRingBuffer(1024).capacity == 1024


def test_for_duration_rounds_up_to_power_of_two() -> None:
    ring = SpscRingBuffer.for_duration(seconds=2.0, sample_rate=48000, channels=2)
    assert ring.capacity == 262144  # 192000 -> 2**18
    assert SpscRingBuffer.for_duration(seconds=1.0, sample_rate=16384, channels=1).capacity == 16384


def test_wrap_around_keeps_order() -> None:
    ring = SpscRingBuffer(8)
    out = np.zeros(8, dtype=np.float32)
    assert ring.write(np.arange(6, dtype=np.float32)) == 6
    assert ring.readinto(out[:5]) == 5
    np.testing.assert_array_equal(out[:5], [0, 1, 2, 3, 4])
    # Write index at 6: the next 7 samples wrap past the end of the storage.
    assert ring.write(np.arange(6, 13, dtype=np.float32)) == 7
    assert ring.available() == 8 and ring.free_space() == 0
    assert ring.readinto(out) == 8
    np.testing.assert_array_equal(out, np.arange(5, 13))
    assert ring.written_total == 13 and ring.read_total == 13
    assert ring.overrun_samples == 0 and ring.overrun_events == 0


def test_overrun_drops_tail_and_counts() -> None:
    ring = SpscRingBuffer(8)
    assert ring.write(np.arange(5, dtype=np.float32)) == 5
    assert ring.write(np.arange(5, 10, dtype=np.float32)) == 3
    assert ring.write(np.ones(4, dtype=np.float32)) == 0
    assert ring.overrun_samples == 2 + 4
    assert ring.overrun_events == 2
    out = np.zeros(16, dtype=np.float32)
    assert ring.readinto(out) == 8
    np.testing.assert_array_equal(out[:8], np.arange(8))
    assert ring.written_total == 8


def test_readinto_multiple_of_never_splits_frames() -> None:
    ring = SpscRingBuffer(16)
    ring.write(np.arange(7, dtype=np.float32))  # 3.5 stereo frames
    out = np.zeros(16, dtype=np.float32)
    assert ring.readinto(out, multiple_of=2) == 6
    assert ring.available() == 1
    assert ring.readinto(out, multiple_of=2) == 0
    ring.write(np.array([7.0], dtype=np.float32))
    assert ring.readinto(out, multiple_of=2) == 2
    np.testing.assert_array_equal(out[:2], [6, 7])
    # A small `out` is also rounded down to whole frames.
    ring.write(np.arange(6, dtype=np.float32))
    assert ring.readinto(out[:5], multiple_of=3) == 3


def _run_threads(
    total: int, capacity: int, reader_pause: float, seed: int
) -> tuple[SpscRingBuffer, np.ndarray, int]:
    """Writer offers a ramp 0..total-1 in random chunks; reader drains in other random chunks."""
    ring = SpscRingBuffer(capacity)
    ramp = np.arange(total, dtype=np.float32)  # exact in float32 below 2**24
    received = np.full(total, -1.0, dtype=np.float32)
    count = [0]
    offered = [0]
    done = threading.Event()

    def writer() -> None:
        rng = np.random.default_rng(seed)
        pos = 0
        while pos < total:
            n = min(int(rng.integers(1, 700)), total - pos)
            ring.write(ramp[pos : pos + n])
            offered[0] += n
            pos += n
            if reader_pause == 0.0 and ring.free_space() < 700:
                # Keep-up case: let the reader drain instead of overrunning.
                while ring.free_space() < 700:
                    threading.Event().wait(0.0005)
        done.set()

    def reader() -> None:
        rng = np.random.default_rng(seed + 1)
        buf = np.zeros(1024, dtype=np.float32)
        while True:
            finished = done.is_set()
            m = int(rng.integers(1, 1024))
            n = ring.readinto(buf[:m])
            received[count[0] : count[0] + n] = buf[:n]
            count[0] += n
            if n == 0:
                if finished and ring.available() == 0:
                    return
                threading.Event().wait(reader_pause or 0.0001)
            elif reader_pause:
                threading.Event().wait(reader_pause)

    tw = threading.Thread(target=writer, name="test-writer")
    tr = threading.Thread(target=reader, name="test-reader")
    tr.start()
    tw.start()
    tw.join(30)
    tr.join(30)
    assert not tw.is_alive() and not tr.is_alive()
    assert offered[0] == total
    return ring, received[: count[0]], total


def test_two_threads_reader_keeps_up_sequence_intact() -> None:
    ring, received, total = _run_threads(200_000, 4096, reader_pause=0.0, seed=1)
    assert ring.overrun_samples == 0
    np.testing.assert_array_equal(received, np.arange(total, dtype=np.float32))


def test_two_threads_writer_overruns_gives_in_order_subsequence() -> None:
    ring, received, total = _run_threads(200_000, 1024, reader_pause=0.0005, seed=2)
    assert ring.overrun_events > 0, "reader was not slow enough to cause an overrun"
    # Whatever arrived is strictly increasing (in order, no duplicates) and was offered.
    assert np.all(np.diff(received) > 0)
    assert received[0] >= 0 and received[-1] < total
    # Everything stored was read, and stored + dropped == offered.
    assert received.shape[0] == ring.written_total
    assert ring.written_total + ring.overrun_samples == total


@pytest.mark.parametrize("writer", ["Python", "C"])
def test_wait_for_sleeps_until_the_writer_crosses_the_mark(writer: str) -> None:
    """The reader is woken by the write that completes what it waits for, not before (a
    premature wake returns False) and not by its timeout. The writer is `write` or the C
    capture callback."""
    ring = SpscRingBuffer(1024)
    write = ring.write if writer == "Python" else CWriter(ring, channels=1).write
    assert not ring.wait_for(10, timeout=0.01)  # nothing written: times out
    result: list[bool] = []
    reader = threading.Thread(target=lambda: result.append(ring.wait_for(100, timeout=60)))
    started = time.monotonic()
    reader.start()
    write(np.zeros(60, dtype=np.float32))  # below the mark
    time.sleep(0.1)
    assert not result, "woke before the mark was reached"
    write(np.zeros(60, dtype=np.float32))  # crosses it
    reader.join(60)
    assert result == [True]
    assert time.monotonic() - started < 30, "woken by the timeout, not by the write"
    assert ring.wait_for(100, timeout=0)  # already readable: no wait at all
    ring.readinto(np.zeros(120, dtype=np.float32))
    assert not ring.wait_for(1, timeout=0)
