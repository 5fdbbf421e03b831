"""Audio sources: the `Source` contract, audio file and raw PCM on stdin (the microphone is in
`monitor.capture.mic`).

Each source produces interleaved float32 at its native rate into its own
SpscRingBuffer; it is that ring's only writer. The consumer thread (the ring's
only reader) downmixes and resamples, and calls `poll(now)` about ten times a
second, which is where a source heals itself (the microphone reopens with
backoff). Nothing here blocks the consumer or raises out of `poll`.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from monitor.capture.audiofile import AudioFile
from monitor.capture.ringbuffer import SpscRingBuffer
from monitor.errors import ConfigError, SourceError, one_line

__all__ = ["FileSource", "Source", "SourceCounters", "StdinSource", "parse_source"]

logger = logging.getLogger(__name__)

SOURCE_FORMS = "'mic', 'mic:NAME-OR-INDEX', 'file:PATH', 'stdin'"
_JOIN_TIMEOUT_S = 2.0
_SPACE_WAIT_S = 0.002  # fast file / stdin: wait this long for ring space (back-pressure)


@dataclass
class SourceCounters:
    """Health counters of one source; each field has exactly one writing thread.

    The capture side (PortAudio callback or reader thread) writes `callbacks`,
    `input_overflow`, `input_underflow` and the thread's `errors`; for the
    microphone, `poll` (consumer thread) writes `errors` and `reconnects`.
    Ring overruns are counted by the ring itself (`ring.overrun_samples`).
    """

    callbacks: int = 0  # PortAudio callbacks, or blocks read by a reader thread
    input_overflow: int = 0  # PortAudio: input data lost before it reached us
    input_underflow: int = 0  # PortAudio: input not ready (gap filled by the driver)
    errors: int = 0  # run-time failures (stream died, read error, reopen failed)
    reconnects: int = 0  # successful microphone reopen after a failure


class Source(ABC):
    """Producer of interleaved float32 audio at its native rate into `ring`."""

    description: str
    sample_rate: int
    channels: int
    ring: SpscRingBuffer
    counters: SourceCounters

    def __init__(
        self, *, sample_rate: int, channels: int, ring_seconds: float, description: str
    ) -> None:
        if ring_seconds <= 0:
            raise ConfigError(f"ring_seconds must be > 0, got {ring_seconds}")
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self.description = description
        self.ring = SpscRingBuffer.for_duration(
            seconds=ring_seconds, sample_rate=self.sample_rate, channels=self.channels
        )
        self.counters = SourceCounters()
        self._exhausted = False
        self._last_error: str | None = None

    @abstractmethod
    def start(self) -> None:
        """Begin producing; raises AudioDeviceError/SourceError (one line) if it cannot."""

    @abstractmethod
    def stop(self) -> None:
        """Stop producing; idempotent; joins any thread with a timeout."""

    def poll(self, now: float) -> None:  # noqa: B027 - optional hook, default does nothing
        """Self-healing hook, called ~10x/s by the consumer with monotonic seconds `now`."""

    @property
    def live(self) -> bool:
        """True when the audio arrives as it is recorded (microphone, a pipe): its clock is
        the wall clock, and a pause in capture is a quiet device, not the end. False for a
        file, whose audio time is its own clock."""
        return True

    @property
    def exhausted(self) -> bool:
        """True once a finite source has written its last sample (end, EOF or read error)."""
        return self._exhausted

    @property
    def last_error(self) -> str | None:
        """Last run-time problem as one line, for logs and the status message."""
        return self._last_error

    @property
    def needs_restart(self) -> bool:
        """True when only a new process can recover this source (see MicSource)."""
        return False

    def stats(self) -> dict[str, int]:
        """Monotonic counters of capture and its ring, for the `status` message."""
        ring, counters = self.ring, self.counters
        return {"overrun_samples": ring.overrun_samples, "overrun_events": ring.overrun_events,
                "callbacks": counters.callbacks, "input_overflow": counters.input_overflow,
                "input_underflow": counters.input_underflow, "source_errors": counters.errors,
                "reconnects": counters.reconnects}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"


class _ThreadedSource(Source):
    """A source fed by one named daemon reader thread with its own stop event."""

    _thread_name = "source"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop_event.clear()
        self._thread = threading.Thread(
            target=self._run_guarded, name=self._thread_name, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop_event.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT_S)
            if thread.is_alive():
                logger.warning("%s: thread %s did not stop within %.1f s",
                               self.description, thread.name, _JOIN_TIMEOUT_S)
        self._close()

    def _close(self) -> None:
        """Release resources after the thread stopped (override)."""

    def _run_guarded(self) -> None:
        try:
            self._run()
        except Exception as err:  # the thread must never die with a traceback only
            self._fail(f"{type(err).__name__}: {one_line(err)}")
            logger.exception("%s: reader thread failed", self.description)
        finally:
            self._exhausted = True  # after the last write was published

    @abstractmethod
    def _run(self) -> None:
        """Read until the end or the stop event; write into the ring."""

    def _fail(self, message: str) -> None:
        self._last_error = message
        self.counters.errors += 1

    def _write_all(self, data: np.ndarray) -> bool:
        """Write all of `data`, waiting for ring space (no drops); False if stopped first."""
        ring = self.ring
        done = 0
        total = data.shape[0]
        while done < total:
            n = min(ring.free_space(), total - done)
            if n > 0:
                done += ring.write(data[done : done + n])
            elif self._stop_event.wait(_SPACE_WAIT_S):
                return False
        return True


class FileSource(_ThreadedSource):
    """WAV/FLAC/OGG file, paced like a microphone (`realtime`) or as fast as the reader drains.

    With realtime=True blocks are released on a schedule against the start
    time (no drift) and a slow consumer loses samples (counted by the ring),
    like a real device. With realtime=False nothing is lost: the thread waits
    for ring space.
    """

    _thread_name = "source-file"

    def __init__(self, path: Path, *, realtime: bool, ring_seconds: float, block_ms: float) -> None:
        self._file = AudioFile(path)
        rate, channels = self._file.sample_rate, self._file.channels
        super().__init__(
            sample_rate=rate,
            channels=channels,
            ring_seconds=ring_seconds,
            description=f"file:{self._file.path} ({rate} Hz, {channels} ch)",
        )
        self.path = self._file.path
        self.realtime = realtime
        self._block_frames = max(1, round(block_ms * rate / 1000.0))
        self._block = np.zeros((self._block_frames, channels), dtype=np.float32)

    @property
    def live(self) -> bool:
        return False

    @property
    def frames_promised(self) -> int | None:
        """Frames the file's header promises (None: it does not say)."""
        return self._file.promised

    @property
    def frames_read(self) -> int:
        """Frames read so far (written by the reader thread)."""
        return self._file.frames_read

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop_event.is_set():
            try:
                n = self._file.read_into(self._block)
            except SourceError as err:
                self._fail(str(err))
                logger.warning("%s", self._last_error)
                return
            if n == 0:
                break
            samples = self._block[:n].reshape(-1)
            self.counters.callbacks += 1
            if self.realtime:
                # Release a block when a device would have finished recording it.
                due = start + self._file.frames_read / self.sample_rate
                delay = due - time.monotonic()
                if delay > 0 and self._stop_event.wait(delay):
                    return
                self.ring.write(samples)
            elif not self._write_all(samples):
                return
        warning = self._file.truncation()
        if warning is not None and not self._stop_event.is_set():
            self._fail(warning)
            logger.warning("%s", self._last_error)

    def _close(self) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._file.close()


class StdinSource(_ThreadedSource):
    """Raw signed 16-bit little-endian PCM from a pipe (default: this process's stdin).

    The pipe gives back-pressure, so the thread waits for ring space instead
    of dropping. A read split in the middle of a sample is carried over; a
    lone trailing byte at EOF is dropped with a warning.
    """

    _thread_name = "source-stdin"
    _POLL_S = 0.1  # how often a blocked read checks the stop event

    def __init__(
        self,
        *,
        sample_rate: int,
        channels: int = 1,
        stream: BinaryIO | None = None,
        ring_seconds: float,
        block_ms: float,
    ) -> None:
        if sample_rate <= 0:
            raise ConfigError(f"stdin sample_rate must be > 0 Hz, got {sample_rate}")
        if channels < 1:
            raise ConfigError(f"stdin channels must be >= 1, got {channels}")
        super().__init__(
            sample_rate=sample_rate,
            channels=channels,
            ring_seconds=ring_seconds,
            description=f"stdin:s16le ({sample_rate} Hz, {channels} ch)",
        )
        self._stream = stream if stream is not None else sys.stdin.buffer
        try:
            self._fd: int | None = self._stream.fileno()
        except (OSError, AttributeError, ValueError):
            self._fd = None  # e.g. io.BytesIO: plain blocking readinto
        block_samples = max(1, round(block_ms * sample_rate / 1000.0)) * channels
        self._raw = bytearray(2 * block_samples)
        self._raw_view = memoryview(self._raw)
        self._pcm = np.frombuffer(self._raw, dtype="<i2")
        self._samples = np.zeros(block_samples, dtype=np.float32)
        self._scale = np.float32(1.0 / 32768.0)
        self.bytes_read = 0  # written by the reader thread

    def _read_some(self, pending: int) -> int:
        """Read into the raw buffer after `pending` bytes; 0 means EOF, -1 means try again."""
        view = self._raw_view[pending:]
        if self._fd is None:
            got = self._stream.readinto(view)  # type: ignore[union-attr]
            return -1 if got is None else int(got)
        ready, _, _ = select.select([self._fd], [], [], self._POLL_S)
        if not ready:
            return -1
        return os.readv(self._fd, [view])

    def _run(self) -> None:
        pending = 0  # bytes in the raw buffer not yet converted (0 or 1 between reads)
        while not self._stop_event.is_set():
            try:
                got = self._read_some(pending)
            except OSError as err:
                self._fail(f"stdin: read error after {self.bytes_read} bytes: {one_line(err)}")
                logger.warning("%s", self._last_error)
                return
            if got < 0:
                continue
            if got == 0:
                if pending:
                    logger.warning("stdin: dropped a trailing odd byte at EOF "
                                   "(s16le needs 2 bytes a sample)")
                return
            self.bytes_read += got
            pending += got
            n = pending // 2
            np.multiply(self._pcm[:n], self._scale, out=self._samples[:n])
            if pending % 2:
                self._raw[0] = self._raw[2 * n]
            pending %= 2
            self.counters.callbacks += 1
            if not self._write_all(self._samples[:n]):
                return


def parse_source(spec: str) -> tuple[str, str | None]:
    """Split a spec into (kind, argument): 'mic', 'mic:NAME-OR-INDEX', 'file:PATH', 'stdin'."""
    text = spec.strip() if isinstance(spec, str) else ""
    kind, sep, arg = text.partition(":")
    if kind == "mic" and not sep:
        return "mic", None
    if kind == "mic" and arg.strip():
        return "mic", arg.strip()
    if kind == "file" and arg.strip():
        return "file", arg.strip()
    if kind == "stdin" and not sep:
        return "stdin", None
    raise ConfigError(f"source {spec!r} is not one of {SOURCE_FORMS}")
