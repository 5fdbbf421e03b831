"""The wire contract: messages survive encode/decode, and bad bytes get one-line errors."""

from __future__ import annotations

import json
import re

import pytest

from monitor.errors import MessageError
from monitor.protocol.messages import (
    Anomaly,
    Event,
    Level,
    Scores,
    Status,
    class_slug,
    decode,
    encode,
)

HEADER = {"sensor_id": "room-101", "seq": 7, "ts": 1700000000.25}


def samples() -> list[object]:
    return [
        Event(**HEADER, event_id="x-fall-1", label="Thump, thud", phase="start", onset_s=1.5,
              offset_s=None, onset_time=1700000001.5, offset_time=None, peak_score=0.9,
              threshold=0.5),
        Level(**HEADER, t_audio_s=0.1, rms_dbfs=-40.0, peak_dbfs=-20.0, mel=[-3.0, -2.5]),
        Scores(**HEADER, t_audio_s=0.96, top=[("Cough", 0.8, 0.4), ("Speech", 0.1, None)]),
        Status(**HEADER, state="running", source="mic:x", uptime_s=3.0, t_audio_s=2.9,
               counters={"frames": 290}, inference_ms_p50=1.2, inference_ms_max=2.0,
               dc_offset=0.0, last_error=None),
        Anomaly(**HEADER, machine="pump-1", t_audio_s=3.0, score=1.7, threshold=2.5,
                running=True),
        Event(**HEADER, event_id="x-mf-1", label="machine_fault", phase="end", onset_s=1.0,
              offset_s=9.0, onset_time=1.0, offset_time=9.0, peak_score=4.0, threshold=2.5,
              machine="pump-1"),
        Event(**HEADER, event_id="x-fall-2", label="fall", phase="end", onset_s=1.0,
              offset_s=None, onset_time=1.0, offset_time=None, peak_score=0.9, threshold=0.5,
              reason="restart"),
    ]


@pytest.mark.parametrize("message", samples(), ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    frames = encode(message)  # type: ignore[arg-type]
    assert decode(frames) == message
    body = json.loads(frames[1])
    assert body["v"] == 1 and body["sensor_id"] == "room-101" and body["seq"] == 7


def test_reason_is_left_out_when_null_for_older_decoders() -> None:
    """`reason` came after schema 1 shipped: a decoder that refuses unknown fields (ours
    before it) still decodes every event that has none."""
    plain, restart = samples()[0], samples()[-1]
    assert "reason" not in json.loads(encode(plain)[1])  # type: ignore[arg-type]
    assert json.loads(encode(restart)[1])["reason"] == "restart"  # type: ignore[arg-type]


def test_event_topic_is_a_prefix_friendly_slug() -> None:
    assert encode(samples()[0])[0] == b"event.thump_thud"  # type: ignore[arg-type]
    assert class_slug("Glass / Shatter!") == "glass_shatter"


def test_raw_audio_never_fits_the_contract() -> None:
    # No message type has a field that could carry samples except the coarse level spectrum.
    fields = {f for cls in (Event, Level, Scores, Status, Anomaly)
              for f in cls.__struct_fields__}
    assert not fields & {"audio", "samples", "pcm", "data"}


@pytest.mark.parametrize(("frames", "expected"), [
    ([b"level"], "expected 2 frames"),
    ([b"level", b"\xff\xfe"], "not JSON"),
    ([b"level", b"[1, 2]"], "$: expected `object`, got `array`"),
    ([b"level", b'{"v": 2, "type": "level"}'], "$.v: invalid enum value 2"),
    ([b"level", b'{"v": 1, "type": "bogus"}'], "$.type: invalid value 'bogus'"),
    ([b"level", b'{"v": 1, "type": "level", "sensor_id": "a"}'],
     "object missing required field"),
])
def test_malformed_messages_are_refused(frames: list[bytes], expected: str) -> None:
    with pytest.raises(MessageError, match=re.escape(expected)):
        decode(frames)


@pytest.mark.parametrize("message", samples(), ids=lambda m: type(m).__name__)
def test_a_body_without_its_version_is_refused(message: object) -> None:
    """Every encoder writes `v`; the Structs' default for building messages must not let a
    body without it decode as version 1."""
    topic, body = encode(message)  # type: ignore[arg-type]
    fields = json.loads(body)
    del fields["v"]
    with pytest.raises(MessageError, match=re.escape("$: object missing required field `v`")) \
            as refused:
        decode([topic, json.dumps(fields).encode()])
    assert refused.value.reason == "version"
    with pytest.raises(MessageError) as wrong:
        decode([topic, json.dumps({**fields, "v": 2}).encode()])
    assert wrong.value.reason == "version"


def test_topic_must_match_body() -> None:
    frames = encode(samples()[1])  # type: ignore[arg-type]
    with pytest.raises(MessageError, match="does not match"):
        decode([b"status", frames[1]])


def test_nan_is_refused_at_encode() -> None:
    bad = Level(**HEADER, t_audio_s=0.1, rms_dbfs=float("nan"), peak_dbfs=0.0, mel=[])
    with pytest.raises(ValueError):
        encode(bad)
