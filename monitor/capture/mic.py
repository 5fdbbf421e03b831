"""The microphone: a PortAudio input stream (sounddevice) that heals itself.

The C callback (`monitor.capture.native_capture`, when built) or a Python one copies each
period into the source's ring and counts PortAudio's flags; nothing else happens on the
audio thread. A stream that dies is reopened from `poll` with backoff; a device that is
not there yet raises DeviceAbsentError (the daemon waits for it).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import sounddevice as sd

from monitor.capture.sources import Source
from monitor.errors import AudioDeviceError, DeviceAbsentError, one_line

__all__ = ["MicSource", "list_input_devices", "print_input_devices", "rescan_devices"]

logger = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 2.0
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 30.0
_CLOSE_WARN_S = 5.0  # report a stream PortAudio has not closed after this long


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


def print_input_devices() -> int:
    """`audio-monitor devices`: one line per input device; 0."""
    devices = list_input_devices()
    if not devices:
        print("no audio input devices found (is a sound card or JACK/PulseAudio present?)")
        return 0
    for d in devices:
        print(f"{d['index']:>3}  {d['name']}  [{d['hostapi']}]  "
              f"{d['max_input_channels']} ch  {d['default_samplerate']:.0f} Hz")
    return 0


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
                f"{self.sample_rate} Hz, {self.channels} ch: {one_line(err)}"
            ) from err
        try:
            stream.start()
        except sd.PortAudioError as err:
            stream.close(ignore_errors=True)
            raise AudioDeviceError(
                f"cannot start input device {self.device_name!r} [{self.hostapi}]: "
                f"{one_line(err)}"
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
            return f"input stream error: {one_line(err)}"
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
            self._last_error = f"{self.description}: reopen failed: {one_line(err)}"
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
