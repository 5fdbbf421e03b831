"""Lock-free single-producer/single-consumer ring of float32 samples.

The audio callback must never block, allocate or take a lock, so the hand-off
between the capture thread and the processing thread is a ring whose two
indices are each written by exactly one thread.
"""

from __future__ import annotations

import contextlib
import os
import select
import weakref

import numpy as np

__all__ = ["SpscRingBuffer"]


class SpscRingBuffer:
    """Power-of-2 ring of float32 samples for exactly one writer and one reader thread.

    It relies on there being exactly one writer thread (calls `write`) and one
    reader thread (calls `readinto`); anything else is a data race. Safety comes
    from ownership, not locks:

    - `_write_index` and `_read_index` are monotonically increasing Python ints
      (they never wrap; positions are `index & mask`). Each is written only by
      its owner: the writer owns `_write_index`, the reader owns `_read_index`.
    - The writer copies the samples first and publishes its new index after the
      copy, so the reader never sees an index covering samples not yet copied.
      The reader likewise publishes `_read_index` only after copying out, so the
      writer never overwrites samples still being read.
    - A single attribute store is atomic under CPython, which is all the
      "publish" needs.

    What does not fit is dropped (never blocks) and counted in
    `overrun_samples` / `overrun_events`, which only the writer updates.

    The reader can sleep until a given amount is readable (`wait_for`): it sets a
    mark, and the writer rings a doorbell (one byte into a non-blocking pipe, never
    a lock) once when its index crosses it. The mark and its number are written by
    the reader only, the number of the mark last rung by the writer only.
    """

    def __init__(self, capacity: int) -> None:
        """Allocate the ring; `capacity` (samples) must be a power of 2 so positions are masks."""
        if isinstance(capacity, bool) or not isinstance(capacity, int | np.integer):
            raise ValueError(f"ring capacity must be an int power of 2, got {capacity!r}")
        capacity = int(capacity)
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError(f"ring capacity must be a power of 2 >= 1, got {capacity}")
        self._capacity = capacity
        self._mask = capacity - 1
        self._buf = np.zeros(capacity, dtype=np.float32)
        self._write_index = 0  # written only by the writer thread
        self._read_index = 0  # written only by the reader thread
        self.overrun_samples = 0  # writer-only: samples offered but dropped
        self.overrun_events = 0  # writer-only: write() calls that dropped anything
        self._doorbell: tuple[int, int] | None = None  # (read fd, write fd), made by the reader
        self._wake_at = 0  # reader-only: ring the doorbell when _write_index reaches this
        self._wait_number = 0  # reader-only: +1 per wait, published after _wake_at
        self._rung_number = 0  # writer-only: the wait the doorbell was rung for

    @classmethod
    def for_duration(cls, *, seconds: float, sample_rate: int, channels: int) -> SpscRingBuffer:
        """Ring holding at least `seconds` of interleaved audio (capacity rounded up to 2**k)."""
        need = max(1, int(np.ceil(seconds * sample_rate * channels)))
        return cls(1 << (need - 1).bit_length())

    @property
    def capacity(self) -> int:
        """Size of the ring in samples (a power of 2)."""
        return self._capacity

    @property
    def written_total(self) -> int:
        """Samples ever stored (dropped ones excluded): the writer's audio clock."""
        return self._write_index

    @property
    def read_total(self) -> int:
        """Samples ever read out: the reader's audio clock."""
        return self._read_index

    def free_space(self) -> int:
        """Samples the writer can store now without dropping (exact for the writer thread)."""
        return self._capacity - (self._write_index - self._read_index)

    def available(self) -> int:
        """Samples the reader can read now (exact for the reader thread)."""
        return self._write_index - self._read_index

    def write(self, data: np.ndarray) -> int:
        """Copy as much of 1-D `data` as fits; drop and count the rest. Writer thread only.

        At most two slice copies, no allocation. Returns the samples stored.
        """
        offered = data.shape[0]
        w = self._write_index
        n = min(offered, self._capacity - (w - self._read_index))
        if n > 0:
            start = w & self._mask
            first = min(n, self._capacity - start)
            self._buf[start : start + first] = data[:first]
            if n > first:
                self._buf[: n - first] = data[first:n]
            self._write_index = w + n  # publish after the copy
        if n < offered:
            self.overrun_samples += offered - n
            self.overrun_events += 1
        if self._wait_number != self._rung_number and self._write_index >= self._wake_at:
            self._rung_number = self._wait_number
            self._ring_doorbell()
        return n

    def _ring_doorbell(self) -> None:
        assert self._doorbell is not None  # made before the first wait was published
        with contextlib.suppress(BlockingIOError):  # pipe full: wake-ups are pending anyway
            os.write(self._doorbell[1], b"\0")

    def wait_for(self, count: int, timeout: float) -> bool:
        """Sleep until `count` samples are readable or `timeout` seconds pass; True if they
        are. Reader thread only.

        Lets the reader wake once when the data it needs has landed instead of polling
        (each wake-up costs CPU); `count` is capped at the capacity.
        """
        target = self._read_index + min(count, self._capacity)
        if self._write_index >= target:
            return True
        if self._doorbell is None:
            self._doorbell = os.pipe()
            for fd in self._doorbell:
                os.set_blocking(fd, False)
            weakref.finalize(self, _close_all, self._doorbell)
        self._wake_at = target
        self._wait_number += 1  # publish after the mark
        if self._write_index < target:  # else the writer crossed it before seeing the mark
            ready, _, _ = select.select([self._doorbell[0]], [], [], max(timeout, 0.0))
            if ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._doorbell[0], 4096)
        return self._write_index >= target

    def readinto(self, out: np.ndarray, *, multiple_of: int = 1) -> int:
        """Copy up to `len(out)` available samples into `out`; return the count. Reader only.

        With `multiple_of=k` the count is rounded down to a multiple of k, so
        interleaved frames of k channels are never split across reads.
        """
        r = self._read_index
        n = min(self._write_index - r, out.shape[0])
        if multiple_of > 1:
            n -= n % multiple_of
        if n <= 0:
            return 0
        start = r & self._mask
        first = min(n, self._capacity - start)
        out[:first] = self._buf[start : start + first]
        if n > first:
            out[first:n] = self._buf[: n - first]
        self._read_index = r + n  # publish after the copy
        return n


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)
