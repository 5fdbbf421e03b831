"""Audio sources: microphone (PortAudio), audio file, raw PCM on stdin.

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
import sounddevice as sd
import soundfile as sf

from monitor.capture.ringbuffer import SpscRingBuffer
from monitor.errors import AudioDeviceError, ConfigError, DeviceAbsentError, SourceError

__all__ = [
    "FileSource",
    "MicSource",
    "Source",
    "SourceCounters",
    "StdinSource",
    "list_input_devices",
    "parse_source",
    "promised_frames",
    "truncation_warning",
]

logger = logging.getLogger(__name__)

SOURCE_FORMS = "'mic', 'mic:NAME-OR-INDEX', 'file:PATH', 'stdin'"
_JOIN_TIMEOUT_S = 2.0
_SPACE_WAIT_S = 0.002  # fast file / stdin: wait this long for ring space (back-pressure)
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 30.0
_CLOSE_WARN_S = 5.0  # report a stream PortAudio has not closed after this long


def _one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split())


def promised_frames(path: Path, handle: sf.SoundFile) -> int | None:
    """Frames the file's header promises, or None when it does not say.

    libsndfile reports how many frames a WAV really holds, not what its header promised,
    so a WAV cut short in transfer would look whole: its `data` chunk size is read here.
    Other formats: libsndfile's count (a FLAC's STREAMINFO), when the file is seekable.
    """
    if handle.format in ("WAV", "WAVEX", "RF64"):
        return _wav_data_frames(path)
    return handle.frames if handle.seekable() else None


def _wav_data_frames(path: Path) -> int | None:
    """Frames promised by a RIFF/RF64 WAV header (`data` size / block align); None when the
    header gives no size (streamed WAVs write 0 or 0xFFFFFFFF) or cannot be read."""
    try:
        with path.open("rb") as handle:
            riff = handle.read(12)
            if len(riff) < 12 or riff[:4] not in (b"RIFF", b"RF64") or riff[8:12] != b"WAVE":
                return None
            size64 = None
            block_align = 0
            while True:
                header = handle.read(8)
                if len(header) < 8:
                    return None
                chunk, size = header[:4], int.from_bytes(header[4:], "little")
                if chunk == b"ds64":
                    body = handle.read(size)
                    size64 = int.from_bytes(body[8:16], "little") if len(body) >= 16 else None
                    size -= len(body)
                elif chunk == b"fmt ":
                    body = handle.read(size)
                    block_align = int.from_bytes(body[12:14], "little") if len(body) >= 14 else 0
                    size -= len(body)
                elif chunk == b"data":
                    if riff[:4] == b"RF64" and size == 0xFFFFFFFF:
                        size = size64 if size64 is not None else 0
                    if size in (0, 0xFFFFFFFF) or block_align <= 0:
                        return None
                    return size // block_align
                handle.seek(size + (size & 1), os.SEEK_CUR)
    except OSError:
        return None


def truncation_warning(path: Path, read: int, promised: int | None,
                       error: BaseException | None = None) -> str | None:
    """The one line that names a file cut short or damaged: how much was read of how much
    its header promised, and the decoder's error if one stopped it; None if it is whole."""
    cause = "" if error is None else f" ({_one_line(error)})"
    if promised is not None and (read < promised or error is not None):
        return f"{path}: ended after {read} of {promised} frames the header promised{cause}"
    if error is not None:
        return f"{path}: read error after {read} frames{cause}"
    return None


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
            self._fail(f"{type(err).__name__}: {_one_line(err)}")
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
        path = Path(path)
        if not path.is_file():
            raise SourceError(f"cannot open audio file {path}: no such file")
        try:
            self._file = sf.SoundFile(path)
        except (sf.SoundFileError, OSError) as err:
            raise SourceError(f"cannot open audio file {path}: {_one_line(err)}") from err
        rate, channels = self._file.samplerate, self._file.channels
        super().__init__(
            sample_rate=rate,
            channels=channels,
            ring_seconds=ring_seconds,
            description=f"file:{path} ({rate} Hz, {channels} ch)",
        )
        self.path = path
        self.realtime = realtime
        self._block_frames = max(1, round(block_ms * rate / 1000.0))
        self._block = np.zeros((self._block_frames, channels), dtype=np.float32)
        self._declared_frames = promised_frames(path, self._file)
        self.frames_read = 0  # written by the reader thread

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop_event.is_set():
            try:
                got = self._file.read(
                    self._block_frames, dtype="float32", always_2d=True, out=self._block
                )
            except (sf.SoundFileError, OSError, RuntimeError) as err:
                self._fail(truncation_warning(self.path, self.frames_read,
                                              self._declared_frames, err) or str(err))
                logger.warning("%s", self._last_error)
                return
            n = got.shape[0]
            if n == 0:
                break
            samples = self._block[:n].reshape(-1)
            self.counters.callbacks += 1
            if self.realtime:
                # Release a block when a device would have finished recording it.
                due = start + (self.frames_read + n) / self.sample_rate
                delay = due - time.monotonic()
                if delay > 0 and self._stop_event.wait(delay):
                    return
                self.ring.write(samples)
            elif not self._write_all(samples):
                return
            self.frames_read += n
        warning = truncation_warning(self.path, self.frames_read, self._declared_frames)
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
                self._fail(f"stdin: read error after {self.bytes_read} bytes: {_one_line(err)}")
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


def _hostapi_name(index: int) -> str:
    return str(sd.query_hostapis(index)["name"])


def rescan_devices() -> None:
    """Make PortAudio enumerate devices again (it lists them once, at initialisation).
    Process-wide: only while no stream of this process is open."""
    sd._terminate()
    sd._initialize()


def list_input_devices() -> list[dict[str, Any]]:
    """Input devices as PortAudio sees them now (for `audio-monitor devices`)."""
    devices: list[dict[str, Any]] = []
    for info in sd.query_devices():
        if info["max_input_channels"] > 0:
            devices.append(
                {
                    "index": int(info["index"]),
                    "name": str(info["name"]),
                    "hostapi": _hostapi_name(info["hostapi"]),
                    "max_input_channels": int(info["max_input_channels"]),
                    "default_samplerate": float(info["default_samplerate"]),
                }
            )
    return devices


def _device_list(devices: list[dict[str, Any]]) -> str:
    return "; ".join(f"[{d['index']}] {d['name']}, {d['hostapi']}" for d in devices)


def _devices_line(devices: list[dict[str, Any]]) -> str:
    """The available inputs and where to look, for an error message."""
    if not devices:
        return ("no input devices available (`audio-monitor devices` shows none); without a "
                "microphone try `audio-monitor demo` or --source file:PATH")
    return f"available inputs: {_device_list(devices)} (`audio-monitor devices` lists them)"


def _resolve_input_device(device: str | int | None) -> dict[str, Any]:
    """One input device by index, case-insensitive substrings of 'name, hostapi', or default.

    Like sounddevice: space-separated substrings must appear in order; an exact
    name wins over several partial matches.
    """
    devices = list_input_devices()
    if isinstance(device, str) and device.strip().lstrip("-").isdigit():
        device = int(device)
    if device is None:
        try:
            default_in = int(sd.query_devices(kind="input")["index"])
        except (sd.PortAudioError, ValueError):
            default_in = -1
        for d in devices:
            if d["index"] == default_in:
                return d
        raise DeviceAbsentError(f"no default input device; {_devices_line(devices)}")
    if isinstance(device, int):
        for d in devices:
            if d["index"] == device:
                return d
        raise DeviceAbsentError(
            f"input device index {device} not found; {_devices_line(devices)}"
        )
    query = device.lower()
    words = query.split()
    matches = []
    exact = []
    for d in devices:
        full = f"{d['name']}, {d['hostapi']}".lower()
        pos = 0
        for word in words:
            pos = full.find(word, pos)
            if pos < 0:
                break
            pos += len(word)
        else:
            matches.append(d)
            if query in (d["name"].lower(), full):
                exact.append(d)
    if len(matches) == 1:
        return matches[0]
    if len(exact) == 1:
        return exact[0]
    if matches:
        raise AudioDeviceError(
            f"input device {device!r} is ambiguous: matches {_device_list(matches)}; "
            "give an index or a longer name (`audio-monitor devices` lists them)"
        )
    raise DeviceAbsentError(f"no input device matching {device!r}; {_devices_line(devices)}")


class MicSource(Source):
    """Microphone through PortAudio; the callback only copies into the ring and counts flags.

    Defaults: `sample_rate=None` takes the device's default rate (no resampling
    inside the driver); `channels=None` takes min(device max input channels, 2),
    because many USB interfaces wire a mono mic to either left or right, and the
    consumer's downmix then keeps it whichever side it is on.

    Self-healing: if the stream dies (PortAudio error, `finished_callback`
    without stop(), stream inactive, or no callback for `stall_s`), `poll`
    closes it and reopens the same device (found again by name and host API,
    since indices can change) with exponential backoff 0.5 s doubling to 30 s.
    Before each reopen PortAudio is re-initialised so it sees devices that came
    back; that is process-wide, so it is done only while this source has no
    stream open, and assumes no other PortAudio stream is open in the process.
    Closing runs in a reaper thread because some backends hang there; see
    `needs_restart` for the case where only a process restart can recover.
    """

    def __init__(
        self,
        device: str | int | None,
        *,
        sample_rate: int | None = None,
        channels: int | None = None,
        ring_seconds: float,
        block_ms: float,
        stall_s: float = 2.0,
    ) -> None:
        info = _resolve_input_device(device)
        max_ch = int(info["max_input_channels"])
        if channels is None:
            channels = min(max_ch, 2)
        if not 1 <= channels <= max_ch:
            raise AudioDeviceError(
                f"input device {info['name']!r} has {max_ch} input channels, asked for {channels}"
            )
        rate = int(sample_rate) if sample_rate else round(float(info["default_samplerate"]))
        super().__init__(
            sample_rate=rate,
            channels=channels,
            ring_seconds=ring_seconds,
            description=f"mic:{info['name']} [{info['hostapi']}] ({rate} Hz, {channels} ch)",
        )
        self.device_name: str = info["name"]
        self.hostapi: str = info["hostapi"]
        self._device_index = int(info["index"])
        self._blocksize = max(1, round(block_ms * rate / 1000.0))
        self._stall_s = max(stall_s, 4.0 * block_ms / 1000.0)
        self._stream: sd._StreamBase | None = None
        self._running = False  # between start() and stop(); consumer thread only
        self._stream_finished = False  # set by PortAudio's finished_callback
        self._backoff = _BACKOFF_FIRST_S
        self._next_retry = 0.0
        self._seen_callbacks = -1
        self._seen_at = 0.0
        self._reaper: threading.Thread | None = None
        self._closing_since = 0.0
        self._close_warned = False
        self._native = self.ring.native_capture(channels)
        """The C callback (monitor.capture.native_capture) when built, else None: `_callback`."""

    # --- PortAudio thread -------------------------------------------------------------
    def _callback(
        self, indata: np.ndarray, frames: int, time: Any, status: sd.CallbackFlags
    ) -> None:
        """Copy into the ring and count flags. Nothing else (no allocation, I/O or logging).
        Used when the C callback is not built; it does the same without entering Python."""
        self.ring.write(indata.reshape(-1))
        counters = self.counters
        counters.callbacks += 1
        if status:
            if status.input_overflow:
                counters.input_overflow += 1
            if status.input_underflow:
                counters.input_underflow += 1

    def _finished(self) -> None:
        self._stream_finished = True

    # --- consumer thread --------------------------------------------------------------
    def _open(self) -> None:
        """Open and start the stream on `self._device_index`; AudioDeviceError if it cannot."""
        self._stream_finished = False
        native = self._native
        try:
            if native is None:
                stream = sd.InputStream(
                    device=self._device_index, samplerate=self.sample_rate,
                    channels=self.channels, dtype="float32", blocksize=self._blocksize,
                    callback=self._callback, finished_callback=self._finished)
            else:  # sounddevice's documented base for streams with a C callback
                stream = sd._StreamBase(
                    kind="input", device=self._device_index, samplerate=self.sample_rate,
                    channels=self.channels, dtype="float32", blocksize=self._blocksize,
                    callback=native.callback, userdata=native.userdata,
                    finished_callback=self._finished)
        except (sd.PortAudioError, ValueError) as err:
            raise AudioDeviceError(
                f"cannot open input device {self.device_name!r} [{self.hostapi}] at "
                f"{self.sample_rate} Hz, {self.channels} ch: {_one_line(err)}"
            ) from err
        try:
            stream.start()
        except sd.PortAudioError as err:
            stream.close(ignore_errors=True)
            raise AudioDeviceError(
                f"cannot start input device {self.device_name!r} [{self.hostapi}]: "
                f"{_one_line(err)}"
            ) from err
        self._stream = stream

    def _close_stream(self) -> None:
        """Close the stream in a reaper thread, so a PortAudio call that hangs cannot block us.

        PortAudio's JACK backend waits (up to 10 min) for a process cycle that
        never comes when Pa_AbortStream/Pa_CloseStream run after the server died.
        """
        stream, self._stream = self._stream, None
        if stream is None:
            return
        reaper = threading.Thread(
            target=_close_quietly, args=(stream, self._native), name="mic-close", daemon=True
        )
        reaper.start()
        self._reaper = reaper

    def start(self) -> None:
        if self._running:
            return
        self._open()
        self._running = True
        self._seen_callbacks = -1
        logger.info("capturing from %s (%s)", self.description,
                    "Python callback" if self._native is None else "C callback")

    def stop(self) -> None:
        self._running = False
        self._close_stream()
        reaper = self._reaper
        if reaper is not None:
            reaper.join(_JOIN_TIMEOUT_S)
            if reaper.is_alive():
                logger.warning("%s: PortAudio did not close the stream within %.1f s",
                               self.description, _JOIN_TIMEOUT_S)
            else:
                self._reaper = None

    @property
    def needs_restart(self) -> bool:
        """True when PortAudio cannot release a dead stream, so only a new process can recover.

        Seen with PortAudio's JACK backend after the server dies: Pa_AbortStream
        waits 10 min for a process cycle that never comes, then a failed
        assertion aborts the process; Pa_Terminate (also run by sounddevice at
        exit) does the same. A supervisor should exit with os._exit and let its
        service manager restart it.
        """
        return self._close_warned and self.closing

    @property
    def closing(self) -> bool:
        """True while a dead stream is still being closed by PortAudio (no reopen until done)."""
        return self._reaper is not None and self._reaper.is_alive()

    def _stream_problem(self, now: float) -> str | None:
        """Why the open stream is considered dead, or None if it is fine."""
        stream = self._stream
        assert stream is not None
        if self._stream_finished:
            return "input stream finished unexpectedly"
        try:
            if not stream.active:
                return "input stream is no longer active"
        except sd.PortAudioError as err:
            return f"input stream error: {_one_line(err)}"
        calls = self.counters.callbacks
        if calls != self._seen_callbacks:
            self._seen_callbacks, self._seen_at = calls, now
        elif now - self._seen_at > self._stall_s:
            return f"no audio from input device for {now - self._seen_at:.1f} s"
        return None

    def _reopen(self) -> None:
        """Re-initialise PortAudio, find the device again by name and host API, open it."""
        rescan_devices()
        for d in list_input_devices():
            if d["name"] == self.device_name and d["hostapi"] == self.hostapi:
                self._device_index = int(d["index"])
                break
        else:
            raise DeviceAbsentError(
                f"input device {self.device_name!r} [{self.hostapi}] is not present"
            )
        self._open()

    def poll(self, now: float) -> None:
        """Detect a dead stream and reopen it with backoff; never raises, never blocks long."""
        if self._native is not None:  # the C callback counts on its own
            counters = self.counters
            counters.callbacks, counters.input_overflow, counters.input_underflow = \
                self._native.counts()
        if not self._running:
            return
        try:
            if self._stream is not None:
                problem = self._stream_problem(now)
                if problem is None:
                    return
                self._last_error = f"{self.description}: {problem}"
                self.counters.errors += 1
                logger.warning("%s; reopening in %.1f s", self._last_error, self._backoff)
                self._close_stream()
                self._next_retry = now + self._backoff
                self._closing_since = now
                return
            if self.closing:
                # Re-initialising PortAudio now would hang on the stream still closing.
                waited = now - self._closing_since
                if waited > _CLOSE_WARN_S and not self._close_warned:
                    self._close_warned = True
                    self._last_error = (
                        f"{self.description}: PortAudio has not released the dead stream "
                        f"after {waited:.0f} s (its JACK backend blocks up to 10 min, then "
                        "aborts the process); restart the process to recover"
                    )
                    logger.error("%s", self._last_error)
                return
            self._reaper = None
            self._close_warned = False
            if now < self._next_retry:
                return
            self._reopen()
        except Exception as err:  # poll must never take the consumer down
            self._last_error = f"{self.description}: reopen failed: {_one_line(err)}"
            self.counters.errors += 1
            self._close_stream()
            self._closing_since = now
            self._backoff = min(self._backoff * 2.0, _BACKOFF_MAX_S)
            self._next_retry = now + self._backoff
            logger.warning("%s; next try in %.1f s", self._last_error, self._backoff)
            return
        self.counters.reconnects += 1
        self._backoff = _BACKOFF_FIRST_S
        self._seen_callbacks = -1
        logger.info("reopened %s (reconnect %d)", self.description, self.counters.reconnects)


def _close_quietly(stream: sd._StreamBase, callback_memory: object = None) -> None:
    """Abort and close; `callback_memory` (the C callback's ring and struct) is held until
    PortAudio can no longer call the callback, even if its source is gone by then."""
    try:
        stream.abort(ignore_errors=True)
    finally:
        stream.close(ignore_errors=True)


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
