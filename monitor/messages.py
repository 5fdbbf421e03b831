"""The wire contract: every message the daemon publishes, one frozen dataclass each.

A message travels as two ZeroMQ frames: ``[topic, json]``. The topic is ASCII and
starts with the message type (``event.<class_slug>``, ``level``, ``scores``,
``status``), so subscribers filter by prefix. The JSON object always carries
``v`` (schema version), ``type``, ``sensor_id``, ``seq`` (per-sensor counter,
+1 per message, so a gap means a lost message) and ``ts`` (wall-clock send time,
Unix seconds). Audio-time fields (``*_s``) count seconds of audio since the
stream started; wall-time fields (``*_time``) are Unix seconds derived from them.
No message carries raw audio.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from monitor.errors import MessageError

SCHEMA_VERSION = 1


def class_slug(name: str) -> str:
    """Topic-safe form of a class name: "Thump, thud" -> "thump_thud"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unnamed"


@dataclass(frozen=True)
class Event:
    """A detected sound event. Published twice: ``phase="start"`` once confirmed,
    ``phase="end"`` when it is over (then with offset, duration and final peak)."""

    TYPE: ClassVar[str] = "event"
    sensor_id: str
    seq: int
    ts: float
    event_id: str
    """Unique per sensor and event; both phases share it."""
    label: str
    """Class name as in the model card."""
    phase: str
    """"start" or "end"."""
    onset_s: float
    """Audio time of the onset, seconds since the stream started."""
    offset_s: float | None
    """Audio time of the offset (end phase only)."""
    onset_time: float
    """Wall time of the onset, Unix seconds."""
    offset_time: float | None
    peak_score: float
    """Highest score so far, 0..1."""
    threshold: float
    machine: str | None = None
    """For `machine_fault` events: the machine's name; null for sound events."""

    @property
    def topic(self) -> str:
        return f"event.{class_slug(self.label)}"


@dataclass(frozen=True)
class Anomaly:
    """Health of one watched machine, a few times per second of audio."""

    TYPE: ClassVar[str] = "anomaly"
    sensor_id: str
    seq: int
    ts: float
    machine: str
    t_audio_s: float
    score: float
    """Smoothed anomaly score; the alarm fires above `threshold` (same units)."""
    threshold: float
    running: bool
    """False while the machine is judged off or idle (level gate): no alarm then."""

    @property
    def topic(self) -> str:
        return f"anomaly.{class_slug(self.machine)}"


@dataclass(frozen=True)
class Level:
    """Input level and a coarse spectrum, ~10 per second of audio, for meters and dashboards."""

    TYPE: ClassVar[str] = "level"
    sensor_id: str
    seq: int
    ts: float
    t_audio_s: float
    """Audio time at the end of the measured span."""
    rms_dbfs: float
    """RMS level of the span, dB relative to full scale (floor -120)."""
    peak_dbfs: float
    """Absolute peak of the span, dBFS."""
    mel: list[float]
    """Latest log-mel frame averaged down to `publish.level_mel_bands` bands (natural log)."""

    @property
    def topic(self) -> str:
        return "level"


@dataclass(frozen=True)
class Scores:
    """What the model hears: the top-k class scores of the latest window."""

    TYPE: ClassVar[str] = "scores"
    sensor_id: str
    seq: int
    ts: float
    t_audio_s: float
    """Audio time at the end of the scored window."""
    top: list[list[Any]]
    """[[class, score, threshold], ...] best first; threshold is the class's event
    threshold, or null for a class that raises no events."""

    @property
    def topic(self) -> str:
        return "scores"


@dataclass(frozen=True)
class Status:
    """Heartbeat with pipeline health counters, every `publish.status_interval_s`."""

    TYPE: ClassVar[str] = "status"
    sensor_id: str
    seq: int
    ts: float
    state: str
    """"running", "degraded" (a problem is being retried) or "stopped"."""
    source: str
    """Source description, e.g. "file:a.wav (48000 Hz, 2 ch)"."""
    uptime_s: float
    t_audio_s: float
    counters: dict[str, int]
    """Monotonic counters: samples, frames, windows, events, overrun_samples, input_overflow,
    nonfinite_samples, clipped_samples, publish_dropped, source_errors, reconnects, ..."""
    inference_ms_p50: float
    inference_ms_max: float
    """Per-window inference time since the previous status message."""
    dc_offset: float
    """Mean sample value over the last level span (a large value means a faulty input)."""
    last_error: str | None

    @property
    def topic(self) -> str:
        return "status"


Message = Event | Level | Scores | Status | Anomaly
_TYPES: dict[str, type] = {cls.TYPE: cls for cls in (Event, Level, Scores, Status, Anomaly)}


def encode(message: Message) -> list[bytes]:
    """Message -> ``[topic, json]`` frames."""
    # vars(): the fields as they are (asdict deep-copies every list: 12 us a message).
    body = {"v": SCHEMA_VERSION, "type": message.TYPE, **vars(message)}
    return [message.topic.encode("ascii"),
            json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")]


def decode(frames: list[bytes]) -> Message:
    """``[topic, json]`` frames -> message; anything malformed raises MessageError (one line)."""
    if len(frames) != 2:
        raise MessageError(f"expected 2 frames [topic, json], got {len(frames)}")
    try:
        body = json.loads(frames[1])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MessageError(f"message body is not JSON: {err}") from err
    if not isinstance(body, dict):
        raise MessageError(f"message body must be a JSON object, got {type(body).__name__}")
    version = body.pop("v", None)
    if version != SCHEMA_VERSION:
        raise MessageError(f"schema version {version!r} is not supported; expected "
                           f"{SCHEMA_VERSION}")
    kind = body.pop("type", None)
    cls = _TYPES.get(kind)
    if cls is None:
        raise MessageError(f"unknown message type {kind!r}; expected one of {sorted(_TYPES)}")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not required <= set(body) <= names:
        missing, extra = sorted(required - set(body)), sorted(set(body) - names)
        raise MessageError(f"{kind} message fields differ: missing {missing}, unexpected {extra}")
    message: Message = cls(**body)
    if frames[0] != message.topic.encode("ascii"):
        raise MessageError(f"topic {frames[0]!r} does not match a {kind} message "
                           f"({message.topic!r})")
    return message
