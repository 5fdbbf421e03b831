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
from collections.abc import Callable

import numpy as np

from monitor.capture.native_capture import STATE_FIELDS, Capture
from monitor.capture.native_capture import load as load_native

(WRITE_INDEX, READ_INDEX, WAKE_AT, WAIT_NUMBER, RUNG_NUMBER, DOORBELL_FD, OVERRUN_SAMPLES,
 OVERRUN_EVENTS) = range(len(STATE_FIELDS))

__all__ = ["SpscRingBuffer"]


class SpscRingBuffer:
    """Power-of-2 ring of float32 samples for exactly one writer and one reader thread.

    It relies on there being exactly one writer thread (calls `write`, or the C capture
    callback of `monitor.capture.native_capture`) and one reader thread (calls `readinto` and
    `wait_for`); anything else is a data race. Safety comes from ownership, not locks:

    - The write and read indices increase monotonically (they never wrap; positions are
      `index & mask`). Each is written only by its owner: the writer owns the write
      index, the reader the read index.
    - The writer copies the samples first and publishes its new index after the copy,
      so the reader never sees an index covering samples not yet copied. The reader
      likewise publishes the read index only after copying out, so the writer never
      overwrites samples still being read.
    - The indices and counters live in one int64 array (`_state`, slots named by
      `STATE_FIELDS`) that the C callback shares. Between Python threads the GIL orders
      the stores; with the C writer, its C11 acquire/release pairs with fences here.

    What does not fit is dropped (never blocks) and counted in `overrun_samples` /
    `overrun_events`, which only the writer updates.

    The reader can sleep until a given amount is readable (`wait_for`): it sets a mark,
    and the writer rings a doorbell (one byte into a non-blocking pipe, never a lock)
    once when its index crosses it. The mark and its number are written by the reader
    only, the number of the mark last rung by the writer only.
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
        self._state = np.zeros(len(STATE_FIELDS), dtype=np.int64)
        self._state[DOORBELL_FD] = -1
        self._doorbell: tuple[int, int] | None = None  # (read fd, write fd), made by the reader
        self._native = native = load_native()  # the C capture callback's extension, if built
        self._acquire: Callable[[], None] = native.lib.am_acquire_fence if native else _no_fence
        self._release: Callable[[], None] = native.lib.am_release_fence if native else _no_fence
        self._full: Callable[[], None] = native.lib.am_full_fence if native else _no_fence

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
        return int(self._state[WRITE_INDEX])

    @property
    def read_total(self) -> int:
        """Samples ever read out: the reader's audio clock."""
        return int(self._state[READ_INDEX])

    @property
    def overrun_samples(self) -> int:
        """Samples offered to a full ring and dropped."""
        return int(self._state[OVERRUN_SAMPLES])

    @property
    def overrun_events(self) -> int:
        """Writes that dropped anything."""
        return int(self._state[OVERRUN_EVENTS])

    def free_space(self) -> int:
        """Samples the writer can store now without dropping (exact for the writer thread)."""
        return self._capacity - int(self._state[WRITE_INDEX] - self._state[READ_INDEX])

    def available(self) -> int:
        """Samples the reader can read now (exact for the reader thread)."""
        return int(self._state[WRITE_INDEX] - self._state[READ_INDEX])

    def write(self, data: np.ndarray) -> int:
        """Copy as much of 1-D `data` as fits; drop and count the rest. Writer thread only.

        At most two slice copies, no allocation. Returns the samples stored.
        """
        state = self._state
        offered = data.shape[0]
        w = int(state[WRITE_INDEX])
        n = min(offered, self._capacity - (w - int(state[READ_INDEX])))
        self._acquire()
        if n > 0:
            start = w & self._mask
            first = min(n, self._capacity - start)
            self._buf[start : start + first] = data[:first]
            if n > first:
                self._buf[: n - first] = data[first:n]
            w += n
            self._release()
            state[WRITE_INDEX] = w  # publish after the copy
        if n < offered:
            state[OVERRUN_SAMPLES] += offered - n
            state[OVERRUN_EVENTS] += 1
        wait = state[WAIT_NUMBER]
        if wait != state[RUNG_NUMBER] and w >= state[WAKE_AT]:
            state[RUNG_NUMBER] = wait
            with contextlib.suppress(BlockingIOError):  # pipe full: wake-ups are pending anyway
                os.write(int(state[DOORBELL_FD]), b"\0")
        return n

    def wait_for(self, count: int, timeout: float) -> bool:
        """Sleep until `count` samples are readable or `timeout` seconds pass; True if they
        are. Reader thread only.

        Lets the reader wake once when the data it needs has landed instead of polling
        (each wake-up costs CPU); `count` is capped at the capacity.
        """
        state = self._state
        target = int(state[READ_INDEX]) + min(count, self._capacity)
        if state[WRITE_INDEX] >= target:
            return True
        if self._doorbell is None:
            self._doorbell = os.pipe()
            for fd in self._doorbell:
                os.set_blocking(fd, False)
            weakref.finalize(self, _close_all, self._doorbell)
            state[DOORBELL_FD] = self._doorbell[1]
        state[WAKE_AT] = target
        self._release()
        state[WAIT_NUMBER] += 1  # publish after the mark
        self._full()  # store number, load index; the writer stores index, loads number
        if state[WRITE_INDEX] < target:  # else the writer crossed it before seeing the mark
            ready, _, _ = select.select([self._doorbell[0]], [], [], max(timeout, 0.0))
            if ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._doorbell[0], 4096)
        return bool(state[WRITE_INDEX] >= target)

    def readinto(self, out: np.ndarray, *, multiple_of: int = 1) -> int:
        """Copy up to `len(out)` available samples into `out`; return the count. Reader only.

        With `multiple_of=k` the count is rounded down to a multiple of k, so
        interleaved frames of k channels are never split across reads.
        """
        state = self._state
        r = int(state[READ_INDEX])
        n = min(int(state[WRITE_INDEX]) - r, out.shape[0])
        if multiple_of > 1:
            n -= n % multiple_of
        if n <= 0:
            return 0
        self._acquire()
        start = r & self._mask
        first = min(n, self._capacity - start)
        out[:first] = self._buf[start : start + first]
        if n > first:
            out[first:n] = self._buf[: n - first]
        self._release()
        state[READ_INDEX] = r + n  # publish after the copy
        return n

    def native_capture(self, channels: int) -> Capture | None:
        """The C capture callback bound to this ring (None: not built; use `write`)."""
        if self._native is None:
            return None
        return Capture(self._native, buf=self._buf, state=self._state, channels=channels)


def _no_fence() -> None:
    """Python threads need no fence: the GIL orders their loads and stores."""


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)
