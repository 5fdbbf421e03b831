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

import numbers
import re
from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from monitor.errors import MessageError
from monitor.protocol.schema import Count, Finite, NonNegative, SensorId, describe

SCHEMA_VERSION: Literal[1] = 1

Text = Annotated[str, Meta(min_length=1, max_length=200)]
Note = Annotated[str, Meta(max_length=2000)]


def class_slug(name: str) -> str:
    """Topic-safe form of a class name: "Thump, thud" -> "thump_thud"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unnamed"


class _Wire(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
            tag_field="type"):
    """Fields every message carries; `type` is the tag that picks the message class."""

    v: Literal[1] = SCHEMA_VERSION
    """Schema version; a subscriber refuses any other, and a body without it (`decode`).
    The default is for building messages; every encoder writes it."""
    sensor_id: SensorId
    seq: Count
    """Per-sensor counter, +1 per message."""
    ts: NonNegative
    """Wall-clock send time, Unix seconds."""


class Event(_Wire, frozen=True, tag="event"):
    """A detected sound event. Published twice: ``phase="start"`` once confirmed,
    ``phase="end"`` when it is over (then with offset, duration and final peak)."""

    TYPE: ClassVar[str] = "event"
    event_id: Text
    """Unique per sensor and event; both phases share it."""
    label: Text
    """Class name as in the model card."""
    phase: Literal["start", "end"]
    onset_s: Finite
    """Audio time of the onset, seconds since the stream started."""
    offset_s: Finite | None
    """Audio time of the offset (end phase only)."""
    onset_time: Finite
    """Wall time of the onset, Unix seconds."""
    offset_time: Finite | None
    peak_score: Finite
    """Highest score so far, 0..1 (machine faults: the anomaly score)."""
    threshold: Finite
    machine: Text | None = None
    """For `machine_fault` events: the machine's name; null for sound events."""
    reason: Literal["restart"] | msgspec.UnsetType = msgspec.UNSET
    """Only on an `end` not decided by the event logic: "restart" when the daemon, starting,
    closed an event its journal shows was left open (kill -9, power cut); when it really
    ended is unknown, so `offset_s` and `offset_time` are null. Otherwise unset: absent
    from the JSON, so decoders built before it (unknown fields refused) still decode
    every other event."""

    @property
    def end_reason(self) -> str | None:
        """`reason`, or None when unset."""
        return None if isinstance(self.reason, msgspec.UnsetType) else self.reason

    @property
    def topic(self) -> str:
        return f"event.{class_slug(self.label)}"


class Anomaly(_Wire, frozen=True, tag="anomaly"):
    """Health of one watched machine, a few times per second of audio."""

    TYPE: ClassVar[str] = "anomaly"
    machine: Text
    t_audio_s: Finite
    score: Finite
    """Smoothed anomaly score; the alarm fires above `threshold` (same units)."""
    threshold: Finite
    running: bool
    """False while the machine is judged off or idle (level gate): no alarm then."""

    @property
    def topic(self) -> str:
        return f"anomaly.{class_slug(self.machine)}"


class Level(_Wire, frozen=True, tag="level"):
    """Input level and a coarse spectrum, ~10 per second of audio, for meters and dashboards."""

    TYPE: ClassVar[str] = "level"
    t_audio_s: Finite
    """Audio time at the end of the measured span."""
    rms_dbfs: Finite
    """RMS level of the span, dB relative to full scale (floor -120)."""
    peak_dbfs: Finite
    """Absolute peak of the span, dBFS."""
    mel: Annotated[list[Finite], Meta(max_length=1024)]
    """Latest log-mel frame averaged down to `publish.level_mel_bands` bands (natural log)."""

    @property
    def topic(self) -> str:
        return "level"


class Scores(_Wire, frozen=True, tag="scores"):
    """What the model hears: the top-k class scores of the latest window."""

    TYPE: ClassVar[str] = "scores"
    t_audio_s: Finite
    """Audio time at the end of the scored window."""
    top: Annotated[list[tuple[Text, Finite, Finite | None]], Meta(max_length=1000)]
    """[[class, score, threshold], ...] best first; threshold is the class's event
    threshold, or null for a class that raises no events."""

    @property
    def topic(self) -> str:
        return "scores"


class Status(_Wire, frozen=True, tag="status"):
    """Heartbeat with pipeline health counters, every `publish.status_interval_s`."""

    TYPE: ClassVar[str] = "status"
    state: Literal["running", "degraded", "stopped"]
    """"running", "degraded" (a problem is being retried) or "stopped"."""
    source: Note
    """Source description, e.g. "file:a.wav (48000 Hz, 2 ch)"."""
    uptime_s: Finite
    t_audio_s: Finite
    counters: Annotated[dict[Annotated[str, Meta(max_length=200)], Count], Meta(max_length=1000)]
    """Monotonic counters: samples, frames, windows, events, overrun_samples, input_overflow,
    nonfinite_samples, clipped_samples, levels_clamped, publish_dropped, publish_unencodable,
    source_errors, reconnects, ..."""
    inference_ms_p50: Finite
    inference_ms_max: Finite
    """Per-window inference time since the previous status message."""
    dc_offset: Finite
    """Mean sample value over the last level span (a large value means a faulty input)."""
    last_error: Note | None

    @property
    def topic(self) -> str:
        return "status"


Message = Event | Level | Scores | Status | Anomaly
MESSAGE_TYPES = (Event, Level, Scores, Status, Anomaly)
MAX_BODY_BYTES = 1 << 20
"""A body longer than this is refused unread (the largest real message is a few kB)."""

def _enc_hook(obj: object) -> object:
    """NumPy scalars (np.float32, np.int64, ...) as Python numbers."""
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


class _Version(msgspec.Struct):
    """Only the version, and required: the message Structs give `v` a default so code can
    build them, which would let a body without `v` decode as version 1."""

    v: Literal[1]


_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)
_DECODER = msgspec.json.Decoder(Message)
_VERSION = msgspec.json.Decoder(_Version)


def encode(message: Message) -> list[bytes]:
    """Message -> ``[topic, json]`` frames; ValueError if it breaks the contract (e.g. NaN).

    The body is checked with the subscribers' own decoder, so nothing is published that a
    subscriber would refuse (msgspec would write NaN as null).
    """
    try:
        body = _ENCODER.encode(message)
    except (TypeError, NotImplementedError) as err:
        raise ValueError(f"{message.TYPE} message cannot be encoded: {err}") from err
    try:
        _DECODER.decode(body)
    except msgspec.ValidationError as err:
        raise ValueError(f"{message.TYPE} message breaks the wire contract: "
                         f"{describe(err)}") from err
    return [message.topic.encode("ascii"), body]


def decode(frames: list[bytes]) -> Message:
    """``[topic, json]`` frames -> message; anything malformed raises MessageError (one line
    naming the key path, e.g. ``$.peak_score: expected `float`, got `str```). A body whose
    ``v`` is missing or not 1 is refused with reason ``version``: every encoder of this
    contract has always written it, so a body without it was not made by one."""
    if len(frames) != 2:
        raise MessageError(f"expected 2 frames [topic, json], got {len(frames)}",
                           reason="frames")
    if len(frames[1]) > MAX_BODY_BYTES:
        raise MessageError(f"message body of {len(frames[1])} bytes is over the "
                           f"{MAX_BODY_BYTES}-byte limit", reason="too_large")
    try:
        message: Message = _DECODER.decode(frames[1])
    except msgspec.ValidationError as err:
        text = describe(err)
        raise MessageError(text, reason="version" if text.startswith("$.v:") else "schema") \
            from err
    except msgspec.DecodeError as err:
        raise MessageError(f"message body is not JSON: {err}", reason="not_json") from err
    try:
        _VERSION.decode(frames[1])
    except msgspec.ValidationError as err:
        raise MessageError(describe(err), reason="version") from err
    if frames[0] != message.topic.encode("ascii"):
        raise MessageError(f"topic {frames[0]!r:.80} does not match a {message.TYPE} message "
                           f"({message.topic!r})", reason="topic")
    return message


def to_dict(message: Message) -> dict[str, object]:
    """The message's fields as a dict (with ``v`` and ``type``), as on the wire: an unset
    optional field (``Event.reason``) is left out."""
    body: dict[str, object] = msgspec.to_builtins(message, enc_hook=_enc_hook)
    return body
