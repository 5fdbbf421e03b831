"""alert.yaml: sources, rules, actions and escalations, validated at load; and the outbox
rows a fired rule adds (`work_items`)."""

from __future__ import annotations

import datetime
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import zmq
from msgspec import Meta
from msgspec.structs import replace

from monitor.apps.alert.outbox import Item
from monitor.config import MqttConfig, MqttTlsConfig, TopicPrefix, read_yaml_mapping
from monitor.errors import ConfigError
from monitor.protocol.keys import apply_client
from monitor.protocol.messages import Event
from monitor.protocol.schema import (
    PATTERN_HINTS,
    Endpoint,
    Finite,
    Name,
    NonNegative,
    Positive,
    SensorId,
    Strict,
    convert,
)

OFFLINE_LABEL = "sensor_offline"
"""Pseudo class of the synthetic event raised when a sensor falls silent."""


# --- configuration ------------------------------------------------------------------------

PAYLOAD_FIELDS = ("rule", "kind", "sensor_id", "room", "event_id", "label", "phase", "seq",
                  "peak_score", "onset_time", "offset_time", "event_ts", "attempt")
"""Keys of the alert JSON (webhook body, command stdin); also `{name}` placeholders in argv."""

HOURS_PATTERN = r"^\s*\d{1,2}:\d{2}\s*-\s*\d{1,2}:\d{2}\s*$"
URL_PATTERN = r"^https?://.+"
HoursWindow = Annotated[str, Meta(pattern=HOURS_PATTERN)]
Url = Annotated[str, Meta(pattern=URL_PATTERN, max_length=2000)]
PATTERN_HINTS.update({HOURS_PATTERN: 'a window like "22:00-06:30" (local time)',
                      URL_PATTERN: "an http:// or https:// URL"})


class Action(Strict, frozen=True):
    """One thing to do when a rule fires (alert.yaml: an entry of `actions`)."""

    type: Literal["log", "webhook", "command", "publish"]
    name: Name | None = None
    """Unique within its rule; keys the exactly-once record. Null: TYPE + position."""
    url: Url | None = None
    argv: tuple[str, ...] = ()
    timeout_s: Positive = 5.0
    expire_s: Positive = 86400.0
    """Give up (and record `expired`) this long after the event."""
    backoff_s: Positive = 1.0
    """First retry delay; doubles per attempt up to `max_backoff_s`."""
    max_backoff_s: Positive = 300.0
    headers: dict[str, str] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type == "webhook" and self.url is None:
            raise ValueError("a webhook needs `url: http(s)://...`")
        if self.type == "command":
            if not self.argv or not self.argv[0]:
                raise ValueError("a command needs `argv: [program, arg, ...]`")
            for arg in self.argv:
                try:
                    names = [n for _, n, _, _ in string.Formatter().parse(arg) if n is not None]
                except ValueError as err:
                    raise ValueError(f"argv {arg!r}: {err} (write {{{{ for a brace)") from err
                unknown = [n for n in names if n not in PAYLOAD_FIELDS]
                if unknown:
                    raise ValueError(f"argv {arg!r}: unknown placeholder {{{unknown[0]}}}; "
                                     f"known: {', '.join(PAYLOAD_FIELDS)}")


class Escalation(Strict, frozen=True):
    """Actions run when an alert is not acknowledged in time."""

    after_s: Positive
    actions: Annotated[tuple[Action, ...], Meta(min_length=1)]


def _minutes(window: str) -> tuple[int, int]:
    lo, hi = (datetime.time.fromisoformat(part.strip().zfill(5)) for part in window.split("-"))
    return lo.hour * 60 + lo.minute, hi.hour * 60 + hi.minute


class Rule(Strict, frozen=True):
    """When to act, and how (alert.yaml: an entry of `rules`)."""

    name: Name
    """Unique; keys the exactly-once record."""
    actions: Annotated[tuple[Action, ...], Meta(min_length=1)]
    classes: tuple[Name, ...] = ()
    """Class names (as in the model card) or topic slugs; empty: any class."""
    min_score: Finite = 0.0
    sensors: tuple[SensorId, ...] = ()
    room: Name | None = None
    phases: Annotated[tuple[Literal["start", "end"], ...], Meta(min_length=1)] = ("start",)
    hours: tuple[HoursWindow, ...] = ()
    """Local-time windows "HH:MM-HH:MM" of the onset; may wrap midnight."""
    cooldown_s: NonNegative = 0.0
    escalate: Escalation | None = None

    def __post_init__(self) -> None:
        for window in self.hours:
            try:
                lo, hi = _minutes(window)
            except ValueError as err:
                raise ValueError(f"hours {window!r} is not a window like \"22:00-06:30\"") \
                    from err
            if lo == hi:
                raise ValueError(f"hours {window!r} is empty and can never fire; leave `hours` "
                                 "out for the whole day")
        for actions in (self.actions, self.escalations):
            names = [a.name for a in actions if a.name is not None]
            if len(set(names)) != len(names):
                raise ValueError("action names must be unique within a list of actions")

    @property
    def escalate_after_s(self) -> float | None:
        return None if self.escalate is None else self.escalate.after_s

    @property
    def escalations(self) -> tuple[Action, ...]:
        return () if self.escalate is None else self.escalate.actions

    def matches(self, event: Event, rooms: dict[str, tuple[str, ...]]) -> bool:
        if self.classes and event.label not in self.classes and \
                event.topic.removeprefix("event.") not in self.classes:
            return False
        if event.phase not in self.phases or event.peak_score < self.min_score:
            return False
        if self.sensors and event.sensor_id not in self.sensors:
            return False
        if self.room is not None and event.sensor_id not in rooms.get(self.room, ()):
            return False
        if self.hours:
            local = datetime.datetime.fromtimestamp(event.onset_time)
            minute = local.hour * 60 + local.minute
            return any(lo <= minute < hi if lo <= hi else minute >= lo or minute < hi
                       for lo, hi in map(_minutes, self.hours))
        return True


class CurveClient(Strict, frozen=True):
    secret_key: Path
    """This daemon's key pair (its .key must be allowed by the server)."""
    server_key: Path
    """The server's public key."""


class MqttSubscribe(Strict, frozen=True):
    """Events from an MQTT broker (sensors with `mqtt.enabled`), in a persistent session."""

    host: Annotated[str, Meta(min_length=1, max_length=253)] = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 1883
    topic_prefix: TopicPrefix = "audio-monitor"
    client_id: Annotated[str, Meta(min_length=1, max_length=200)] = "audio-monitor-alert"
    """The broker keeps this client's session (and its events) while the daemon is away."""
    keepalive_s: Annotated[int, Meta(ge=5, le=3600)] = 30
    username_file: Path | None = None
    password_file: Path | None = None
    tls: MqttTlsConfig | None = None


class SourceSpec(Strict, frozen=True):
    endpoint: Endpoint | None = None
    catchup: Endpoint | None = None
    curve: CurveClient | None = None
    mqtt: MqttSubscribe | None = None
    """A broker instead of `endpoint`."""

    def __post_init__(self) -> None:
        if (self.endpoint is None) == (self.mqtt is None):
            raise ValueError("give either `endpoint` (ZeroMQ) or `mqtt` (a broker)")


class AlertFile(Strict, frozen=True):
    """alert.yaml as written (see the shipped file for each key)."""

    subscribe: Annotated[tuple[SourceSpec, ...], Meta(min_length=1)]
    rules: tuple[Rule, ...] = ()
    state: Path = Path("~/.local/state/audio-monitor/alert.db")
    rooms: dict[Name, tuple[SensorId, ...]] = msgspec.field(default_factory=dict)
    ack_endpoint: Endpoint | None = None
    publish_endpoint: Endpoint | None = None
    heartbeat_timeout_s: Positive = 30.0
    max_event_age_s: Positive = 86400.0
    retention_days: Positive = 30.0
    workers: Annotated[int, Meta(ge=1, le=256)] = 4
    """Webhook/command actions running at once, at most."""


@dataclass(frozen=True)
class Source:
    endpoint: str
    catchup: str | None = None
    secret_key: Path | None = None
    server_key: Path | None = None
    mqtt: MqttConfig | None = None
    """A broker instead of a ZeroMQ endpoint: `MqttBridge` feeds `endpoint` (inproc)."""

    def configure(self, socket: zmq.Socket[Any]) -> None:
        if self.secret_key is not None and self.server_key is not None:
            apply_client(socket, secret_key=self.secret_key, server_key=self.server_key,
                         where=f"subscribe[{self.endpoint}].curve")


@dataclass(frozen=True)
class AlertConfig:
    sources: tuple[Source, ...]
    rules: tuple[Rule, ...]
    state: Path
    rooms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ack_endpoint: str | None = None
    publish_endpoint: str | None = None
    heartbeat_timeout_s: float = 30.0
    max_event_age_s: float = 86400.0
    retention_days: float = 30.0
    workers: int = 4


def _named(actions: tuple[Action, ...]) -> tuple[Action, ...]:
    return tuple(a if a.name is not None else replace(a, name=f"{a.type}{i}")
                 for i, a in enumerate(actions))


def load_alert_config(path: Path) -> AlertConfig:
    """Read and validate alert.yaml; relative paths are against its folder.

    Raises ConfigError (one line naming the key path)."""
    data = read_yaml_mapping(path, what="alert config")
    spec = convert(data, AlertFile, error=ConfigError)
    base = path.resolve().parent
    rules = tuple(replace(r, actions=_named(r.actions), escalate=None if r.escalate is None
                          else replace(r.escalate, actions=_named(r.escalate.actions)))
                  for r in spec.rules)
    if len({r.name for r in rules}) != len(rules):
        raise ConfigError("$.rules: rule names must be unique (they key the exactly-once "
                          "record)")
    return AlertConfig(
        sources=tuple(_mqtt_source(s.mqtt, i, base) if s.mqtt is not None else
                      Source(endpoint=s.endpoint or "", catchup=s.catchup,
                             secret_key=None if s.curve is None else base / s.curve.secret_key,
                             server_key=None if s.curve is None else base / s.curve.server_key)
                      for i, s in enumerate(spec.subscribe)),
        rules=rules, state=base / spec.state, rooms=dict(spec.rooms),
        ack_endpoint=spec.ack_endpoint, publish_endpoint=spec.publish_endpoint,
        heartbeat_timeout_s=spec.heartbeat_timeout_s, max_event_age_s=spec.max_event_age_s,
        retention_days=spec.retention_days, workers=spec.workers)


def _mqtt_source(spec: MqttSubscribe, index: int, base: Path) -> Source:
    """A broker source; its events reach the SUB loop through an inproc endpoint. It needs
    no catch-up request: the broker keeps the session's events while this daemon is away."""
    settings = MqttConfig(enabled=True, host=spec.host, port=spec.port,
                          topic_prefix=spec.topic_prefix, client_id=spec.client_id,
                          keepalive_s=spec.keepalive_s, username_file=spec.username_file,
                          password_file=spec.password_file, tls=spec.tls)
    return Source(endpoint=f"inproc://alert-mqtt-{index}", mqtt=settings.resolved(base))


def work_items(rule: Rule, event: Event, *, rooms: dict[str, tuple[str, ...]],
               now: float) -> list[Item]:
    """The outbox rows a fired `rule` adds for `event`: one per action, due `now`, and one
    per escalation action, due `escalate_after_s` later (start phases only)."""
    payload = {"rule": rule.name, "kind": "alert", "sensor_id": event.sensor_id,
               "room": next((r for r, s in rooms.items() if event.sensor_id in s), None),
               "event_id": event.event_id, "label": event.label, "phase": event.phase,
               "seq": event.seq, "peak_score": event.peak_score,
               "onset_time": event.onset_time, "offset_time": event.offset_time,
               "reason": event.end_reason, "event_ts": event.ts}
    base = f"{event.sensor_id}|{event.event_id}|{event.phase}|"
    items = [Item(key=base + f"{rule.name}/{a.name}", kind="alert",
                  action=f"{rule.name}/{a.name}", sensor_id=event.sensor_id,
                  event_id=event.event_id, phase=event.phase, payload=payload,
                  next_at=now, expires_at=event.ts + a.expire_s) for a in rule.actions]
    if rule.escalate_after_s is not None and event.phase == "start":
        at = now + rule.escalate_after_s
        items += [Item(key=base + f"{rule.name}/escalate/{a.name}", kind="escalation",
                       action=f"{rule.name}/escalate/{a.name}", sensor_id=event.sensor_id,
                       event_id=event.event_id, phase=event.phase,
                       payload={**payload, "kind": "escalation"}, next_at=at,
                       expires_at=at + a.expire_s) for a in rule.escalations]
    return items


def offline_event(sensor_id: str, last_seq: int, last_seen: float,
                  phase: Literal["start", "end"], *, now: float) -> Event:
    """The synthetic `sensor_offline` event of a sensor silent since `last_seen`."""
    return Event(sensor_id=sensor_id, seq=last_seq, ts=now,
                 event_id=f"offline-{sensor_id}-{int(last_seen)}", label=OFFLINE_LABEL,
                 phase=phase, onset_s=0.0, offset_s=None if phase == "start" else 0.0,
                 onset_time=last_seen, offset_time=None if phase == "start" else now,
                 peak_score=1.0, threshold=1.0)
