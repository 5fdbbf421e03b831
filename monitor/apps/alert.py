"""`audio-monitor alert`: a subscriber that turns events into actions, each exactly once.

Flow: SUB sockets (one per source: a sensor or a proxy) -> `decode` (a malformed or
tampered message is dropped and counted) -> rules -> one SQLite transaction records the
decision and the actions to run (`monitor.apps.outbox`) -> a dispatcher thread runs due
actions (log, webhook, command, publish), retries failures with exponential backoff
until they succeed or expire, and records the outcome.

Nothing is lost: live events are acted on at once; on start-up, on every heartbeat
(`status`) of a sensor, and after a failed catch-up, the daemon asks the source's
catch-up endpoint for the sensor's journaled events after its cursor, so events missed
while this daemon was down, or dropped by ZeroMQ, are judged too. Replays are harmless:
each (rule, sensor, event, phase) is judged once (see `monitor.apps.outbox`).

Threads: the main thread owns the SUB, catch-up and ack sockets and one SQLite
connection; the dispatcher owns the re-publish socket and its own connection; webhook
and command actions run in a small worker pool.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import queue
import sqlite3
import string
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import zmq
from msgspec import Meta
from msgspec.structs import replace

from monitor.apps.outbox import Item, Outbox, StateLock
from monitor.config import MqttConfig, MqttTlsConfig, TopicPrefix, read_yaml_mapping
from monitor.errors import ConfigError, MessageError
from monitor.outputs.catchup import CatchupClient, ReplyHeader
from monitor.protocol.keys import apply_client
from monitor.protocol.messages import Event, Status, decode
from monitor.protocol.schema import (
    PATTERN_HINTS,
    Endpoint,
    Finite,
    Name,
    NonNegative,
    Positive,
    Refusals,
    SensorId,
    Strict,
    convert,
    describe,
)

logger = logging.getLogger(__name__)

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


# --- actions --------------------------------------------------------------------------------

def run_webhook(action: Action, payload: dict[str, Any], key: str) -> None:
    """POST the alert as JSON; raises on anything but 2xx."""
    assert action.url is not None
    request = urllib.request.Request(
        action.url, data=json.dumps(payload).encode(), method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": key, **action.headers})
    with urllib.request.urlopen(request, timeout=action.timeout_s) as response:
        if not 200 <= response.status < 300:
            raise OSError(f"HTTP {response.status}")


def run_command(action: Action, payload: dict[str, Any], key: str) -> None:
    """Run argv with the alert JSON on stdin; fields are also `{name}` placeholders."""
    fields = {k: "" if v is None else str(v) for k, v in payload.items()}
    argv = [a.format_map(fields) for a in action.argv]
    result = subprocess.run(argv, input=json.dumps(payload).encode(), capture_output=True,
                            timeout=action.timeout_s, check=False,
                            env={"AUDIO_MONITOR_ALERT_KEY": key,
                                 "PATH": "/usr/local/bin:/usr/bin:/bin"})
    if result.returncode != 0:
        raise OSError(f"exit status {result.returncode}: "
                      f"{result.stderr.decode(errors='replace')[-200:]}")


# --- the daemon -------------------------------------------------------------------------

@dataclass
class SensorState:
    source: int
    last_seen: float
    last_seq: int
    catchup_at: float = 0.0
    """When to ask this sensor's catch-up next (0: at the next heartbeat)."""
    catchup_pending: bool = False
    """A request is out (answered through `CatchupWorker.results`)."""
    offline: bool = False


@dataclass
class Health:
    """`running` or `degraded` with what went wrong and what to do (`last_error`)."""

    name: str
    state: str = "running"
    last_error: str | None = None
    failures: int = 0
    failed_at: float = 0.0

    def failed(self, text: str, now: float) -> None:
        self.failures += 1
        self.failed_at = now
        if self.state != "degraded" or self.failures % 100 == 0:
            logger.error("%s degraded (%d failures so far): %s", self.name, self.failures, text)
        self.state, self.last_error = "degraded", text

    def settle(self, now: float, *, quiet_s: float = 5.0) -> None:
        """Back to `running` once nothing has failed for `quiet_s`."""
        if self.state == "degraded" and now - self.failed_at >= quiet_s:
            logger.warning("%s running again (was: %s)", self.name, self.last_error)
            self.state, self.last_error = "running", None


def state_error(path: Path, err: BaseException) -> str:
    """`last_error` for a failing state file: which file, what, and the cure."""
    return (f"state {path}: {type(err).__name__}: {err}; events are judged again from the "
            f"sensors' journals once it is writable (free disk space, or make {path.parent} "
            "writable); if it is damaged, stop the daemon and move the file aside")


STOP_WAIT_S = 5.0
"""On stop, how long the dispatcher waits for actions in flight."""


class Dispatcher:
    """Runs due outbox rows in its own thread. Webhooks and commands run in one worker pool
    per destination (action), each of `workers` threads with the action's own timeout, so
    a destination that hangs holds up only its own alerts."""

    def __init__(self, config: AlertConfig, *, context: zmq.Context[Any],
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.context = context
        self.clock = clock
        self.actions = {f"{r.name}/{a.name}": a for r in config.rules for a in r.actions}
        self.actions.update({f"{r.name}/escalate/{a.name}": a
                             for r in config.rules for a in r.escalations})
        self.wake = threading.Event()
        self.delivered = 0
        self.failed = 0
        self.expired = 0
        self.bound_endpoint = ""
        self.health = Health("alert dispatcher")
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[Outbox] = []
        self._thread = threading.Thread(target=self._run, name="alert-dispatch", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise ConfigError("alert: the dispatcher did not start within 10 s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _run(self) -> None:
        pub = None
        try:
            outbox = Outbox(self.config.state)
            if self.config.publish_endpoint is not None:
                pub = self.context.socket(zmq.PUB)
                pub.setsockopt(zmq.LINGER, 500)
                pub.bind(self.config.publish_endpoint)
                self.bound_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        except (ConfigError, zmq.ZMQError) as err:
            self._error = err if isinstance(err, ConfigError) else ConfigError(
                f"$.publish_endpoint: cannot bind {self.config.publish_endpoint!r}: "
                f"{zmq.strerror(err.errno or 0)}; is another process using it?")
            if pub is not None:
                pub.close()
            self._ready.set()
            return
        pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        busy: dict[str, concurrent.futures.Future[None]] = {}
        self._ready.set()
        try:
            while not self._stop.is_set():
                try:
                    more = self._step(outbox, pub, pools, busy)
                except Exception as err:  # the state file failed: degrade, retry
                    self.health.failed(state_error(self.config.state, err), self.clock())
                    self._stop.wait(1.0)
                    continue
                self.health.settle(self.clock())
                if more:
                    continue
                nxt = outbox.next_due()
                self.wake.wait(0.5 if nxt is None else min(0.5, max(0.0, nxt - self.clock())))
                self.wake.clear()
        finally:
            for pool in pools.values():
                pool.shutdown(wait=False, cancel_futures=True)
            # An action in flight may hang up to its own timeout: wait a little, not for it.
            _, pending = concurrent.futures.wait(list(busy.values()), timeout=STOP_WAIT_S)
            if not pending:
                with self._lock:
                    for conn in self._conns:
                        conn.close()
            if pub is not None:
                pub.close()
            outbox.close()

    def _step(self, outbox: Outbox, pub: zmq.Socket[Any] | None,
              pools: dict[str, concurrent.futures.ThreadPoolExecutor],
              busy: dict[str, concurrent.futures.Future[None]]) -> bool:
        """Start what is due; True if there may be more right away."""
        now = self.clock()
        for key in [k for k, f in busy.items() if f.done()]:
            del busy[key]  # recorded by the worker itself
        per_action = Counter(key.rsplit("|", 1)[1] for key in busy)
        depth = self.config.workers * 2  # queued per destination, at most
        full = frozenset(a for a, n in per_action.items() if n >= depth)
        limit = depth * max(1, len(self.actions))
        rows = outbox.due(now, limit=limit, busy=set(busy), skip_actions=full)
        for row in rows:
            name = row["action"]
            action = self.actions.get(name)
            if action is None:  # the rule was removed from alert.yaml
                outbox.failed(row["key"], now=now, error="action no longer configured",
                              retry_at=float("inf"))
                continue
            payload = {**row["payload"], "attempt": row["attempts"] + 1}
            if action.type in ("log", "publish"):
                self._record(outbox, row["key"], self._inline(action, payload, pub), now)
                continue
            if per_action[name] >= depth:
                continue
            pool = pools.get(name)
            if pool is None:
                pool = pools[name] = concurrent.futures.ThreadPoolExecutor(
                    self.config.workers, thread_name_prefix=f"alert-{name}")
            future = pool.submit(self._work, action, payload, row["key"])
            future.add_done_callback(lambda _: self.wake.set())
            busy[row["key"]] = future
            per_action[name] += 1
        return len(rows) == limit

    def _work(self, action: Action, payload: dict[str, Any], key: str) -> None:
        """Worker thread: run the action and record the outcome at once (the smaller the
        gap between the two, the fewer repeats a crash can cause)."""
        try:
            outbox = getattr(self._local, "outbox", None)
            if outbox is None:
                outbox = self._local.outbox = Outbox(self.config.state, any_thread=True)
                with self._lock:
                    self._conns.append(outbox)
            run = run_webhook if action.type == "webhook" else run_command
            try:
                run(action, payload, key)
            except Exception as err:
                self._record(outbox, key, err, self.clock())
            else:
                self._record(outbox, key, None, self.clock())
        except Exception as err:  # the state file failed; the row stays pending: retried
            self.health.failed(state_error(self.config.state, err), self.clock())

    def _inline(self, action: Action, payload: dict[str, Any],
                pub: zmq.Socket[Any] | None) -> BaseException | None:
        if action.type == "log":
            logger.warning("ALERT %s %s %s %s on %s (score %.2f, event %s)",
                           payload["rule"], payload["kind"], payload["label"], payload["phase"],
                           payload["sensor_id"], payload["peak_score"], payload["event_id"])
            return None
        if pub is None:
            return OSError("publish action needs publish_endpoint in alert.yaml")
        try:
            pub.send_multipart([f"alert.{payload['rule']}".encode(),
                                json.dumps(payload).encode()], flags=zmq.NOBLOCK)
        except zmq.ZMQError as err:
            return err
        return None

    def _record(self, outbox: Outbox, key: str, error: BaseException | None,
                now: float) -> None:
        if error is None:
            outbox.delivered(key, now=now)
            with self._lock:
                self.delivered += 1
            return
        action = self.actions[key.rsplit("|", 1)[1]]
        row = outbox.attempts(key)
        delay = min(action.max_backoff_s, action.backoff_s * 2 ** row)
        state = outbox.failed(key, now=now, error=f"{type(error).__name__}: {error}",
                              retry_at=now + delay)
        with self._lock:
            self.failed += 1
            self.expired += state == "expired"
        if state == "expired":
            logger.error("alert %s expired after %d attempts: %s", key, row + 1, error)
        elif row == 0:  # the first failure is worth a look; retries are routine
            logger.warning("alert %s failed (%s); retry in %.1f s", key, error, delay)
        else:
            logger.info("alert %s failed again (%s); retry in %.1f s", key, error, delay)


@dataclass
class Page:
    """A catch-up answer for the main thread: header and pairs, or None and why not."""

    sensor_id: str
    after: int
    header: ReplyHeader | None
    pairs: list[list[bytes]]
    error: str | None = None


class CatchupWorker:
    """Catch-up requests to one source, in its own thread: a source that does not answer
    delays only its own sensors' catch-up, never live events or other sources."""

    def __init__(self, source: Source, *, context: zmq.Context[Any]) -> None:
        assert source.catchup is not None
        self.source = source
        self.context = context
        self.results: queue.SimpleQueue[Page] = queue.SimpleQueue()
        self._requests: queue.SimpleQueue[tuple[str, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="alert-catchup", daemon=True)
        self._thread.start()

    def ask(self, sensor_id: str, after: int) -> None:
        self._requests.put((sensor_id, after))

    def stop(self) -> None:
        self._requests.put(None)
        self._thread.join(5)

    def _client(self) -> CatchupClient:
        assert self.source.catchup is not None
        return CatchupClient(self.source.catchup, context=self.context,
                             configure=self.source.configure)

    def _run(self) -> None:
        client = self._client()
        try:
            while (request := self._requests.get()) is not None:
                sensor_id, after = request
                try:
                    page = client.fetch(sensor_id, after)
                    error = None if page is not None else "no answer within 2 s"
                except (MessageError, zmq.ZMQError) as err:
                    page, error = None, str(err)
                if page is None:  # a REQ socket is stuck after a lost reply: a fresh one
                    client.close()
                    client = self._client()
                    self.results.put(Page(sensor_id, after, None, [], error))
                else:
                    self.results.put(Page(sensor_id, after, page[0], page[1]))
        finally:
            client.close()


class AlertDaemon:
    """Subscribes, judges, records; the dispatcher delivers. `run` returns when `stop` is set.

    Nothing a peer sends ends it: bad messages are counted by reason (`refusals`) and
    dropped; a failing state file degrades it (`health`) and is retried."""

    def __init__(self, config: AlertConfig, *, context: zmq.Context[Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.context = context or zmq.Context.instance()
        self.clock = clock
        self.sensors: dict[str, SensorState] = {}
        self.counters = {"received": 0, "bad_messages": 0, "events": 0, "duplicates": 0,
                         "stale": 0, "catchup_requests": 0, "catchup_events": 0,
                         "catchup_failures": 0, "catchup_resets": 0, "acks": 0}
        self.refusals = Refusals(logger, "alert")
        """`bad_messages` by reason: frames, too_large, not_json, version, schema, topic, ack_*."""
        self.health = Health("alert daemon")
        self.dispatcher = Dispatcher(config, context=self.context, clock=clock)
        self.ack_endpoint = ""
        self._workers: list[CatchupWorker | None] = []
        self.bridges: list[Any] = []
        """MQTT sources' bridges (`monitor.apps.mqtt_bridge.MqttBridge`), while `run` runs."""

    @property
    def state(self) -> str:
        """"running", or "degraded" while the state file fails (see `last_error`)."""
        healths = (self.health, self.dispatcher.health)
        return "degraded" if any(h.state == "degraded" for h in healths) else "running"

    @property
    def last_error(self) -> str | None:
        return self.health.last_error or self.dispatcher.health.last_error

    def run(self, stop: threading.Event, *, ready: threading.Event | None = None) -> None:
        """Until `stop`. ConfigError at start: state file locked, damaged or unwritable, an
        endpoint that cannot be bound."""
        lock = StateLock(self.config.state)
        subs: list[zmq.Socket[Any]] = []
        ack = None
        outbox = None
        try:
            outbox = Outbox(self.config.state, check=True)
            if self.config.ack_endpoint is not None:
                ack = self.context.socket(zmq.ROUTER)
                ack.setsockopt(zmq.LINGER, 0)
                try:
                    ack.bind(self.config.ack_endpoint)
                except zmq.ZMQError as err:
                    raise ConfigError(f"$.ack_endpoint: cannot bind "
                                      f"{self.config.ack_endpoint!r}: "
                                      f"{zmq.strerror(err.errno or 0)}; is "
                                      "another alert daemon running?") from err
                self.ack_endpoint = ack.getsockopt_string(zmq.LAST_ENDPOINT)
            self.dispatcher.start()
            self.bridges = bridges = []
            for source in self.config.sources:
                if source.mqtt is not None:
                    from monitor.apps.mqtt_bridge import MqttBridge

                    bridges.append(MqttBridge(source.mqtt, endpoint=source.endpoint,
                                              context=self.context,
                                              client_id=source.mqtt.client_id or "audio-monitor"))
        except BaseException:
            if ack is not None:
                ack.close()
            if outbox is not None:
                outbox.close()
            self.dispatcher.stop()
            lock.release()
            raise
        for source in self.config.sources:
            sub = self.context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, 100000)
            source.configure(sub)
            for topic in (b"event.", b"status"):
                sub.setsockopt(zmq.SUBSCRIBE, topic)
            sub.connect(source.endpoint)
            subs.append(sub)
        self._workers = [None if s.catchup is None else CatchupWorker(s, context=self.context)
                         for s in self.config.sources]
        for bridge in bridges:
            bridge.start()
        poller = zmq.Poller()
        for sub in subs:
            poller.register(sub, zmq.POLLIN)
        if ack is not None:
            poller.register(ack, zmq.POLLIN)
        now = self.clock()
        self._contain(self._resume, outbox, now)
        if ready is not None:
            ready.set()
        next_tick = now + 1.0
        try:
            while not stop.is_set():
                for socket, _ in poller.poll(100):
                    if socket is ack:
                        self._contain(self._on_ack, outbox, ack)
                        continue
                    index = subs.index(socket)
                    for _ in range(1000):  # drain, but let other sockets in
                        try:
                            frames = socket.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._contain(self._on_frames, outbox, index, frames)
                for worker in self._workers:
                    while worker is not None and not worker.results.empty():
                        self._contain(self._on_page, outbox, worker.results.get())
                now = self.clock()
                if now >= next_tick:
                    next_tick = now + 1.0
                    self._contain(self._tick, outbox, now)
        finally:
            self.dispatcher.stop()
            for bridge in bridges:
                bridge.stop()
            for worker in self._workers:
                if worker is not None:
                    worker.stop()
            for sub in subs:
                sub.close()
            if ack is not None:
                ack.close()
            outbox.close()
            lock.release()
            logger.log(logging.WARNING if self.refusals.total else logging.INFO,
                       "alert daemon stopped: %s; bad_messages by reason: %s", self.counters,
                       dict(self.refusals.by_reason))

    def _resume(self, outbox: Outbox, now: float) -> None:
        """At start: ask every known sensor for what we missed while down; forget old rows."""
        endpoints = {s.endpoint: i for i, s in enumerate(self.config.sources)}
        for sensor_id, (seq, where) in outbox.cursors().items():
            if where in endpoints:
                self.sensors[sensor_id] = SensorState(endpoints[where], now, seq)
                self._catch_up(sensor_id)
        outbox.prune(before=now - self.config.retention_days * 86400)

    def _contain(self, handler: Callable[..., None], *args: Any) -> None:
        """Run one handler; a failure (the state file, or a bug) degrades, never ends, the
        daemon. What it did not record is judged again at the sensor's next catch-up."""
        try:
            handler(*args)
        except sqlite3.Error as err:
            self.health.failed(state_error(self.config.state, err), self.clock())
        except Exception as err:
            logger.exception("alert: %s failed", handler.__name__)
            self.health.failed(f"{handler.__name__}: {type(err).__name__}: {err}",
                               self.clock())

    def _on_frames(self, outbox: Outbox, index: int, frames: list[bytes]) -> None:
        self.counters["received"] += 1
        try:
            message = decode(frames)
        except MessageError as err:
            self._bad(err.reason, f"from {self.config.sources[index].endpoint}: {err}")
            return
        now = self.clock()
        state = self.sensors.get(message.sensor_id)
        if state is None:
            cursor = outbox.cursor(message.sensor_id)
            state = SensorState(index, now, 0 if cursor is None else cursor[0])
            self.sensors[message.sensor_id] = state
            self._catch_up(message.sensor_id)  # started late: ask
        state.source, state.last_seen = index, now
        if state.offline:
            state.offline = False
            logger.warning("sensor %s is back", message.sensor_id)
            self._judge(outbox, self._offline_event(message.sensor_id, state, "end"))
        if isinstance(message, Event):
            self._judge(outbox, message)
        elif isinstance(message, Status) and now >= state.catchup_at:
            self._catch_up(message.sensor_id)  # heartbeat: any gap?

    def _catch_up(self, sensor_id: str) -> None:
        """Ask the sensor's source for its journaled events after the cursor (answered in
        `_on_page`, page by page); one request per sensor at a time."""
        state = self.sensors[sensor_id]
        worker = self._workers[state.source] if state.source < len(self._workers) else None
        if worker is None or state.catchup_pending:
            return
        state.catchup_pending = True
        self.counters["catchup_requests"] += 1
        worker.ask(sensor_id, state.last_seq)

    def _on_page(self, outbox: Outbox, page: Page) -> None:
        sensor_id, header = page.sensor_id, page.header
        state = self.sensors[sensor_id]
        state.catchup_pending = False
        source = self.config.sources[state.source].endpoint
        if header is None:
            self.counters["catchup_failures"] += 1
            state.catchup_at = self.clock() + 2.0
            logger.warning("catch-up for %s from %s: %s", sensor_id, source, page.error)
            return
        known = outbox.epoch(sensor_id)
        if page.after > 0 and ((header.epoch is not None and known is not None and
                                header.epoch != known) or
                               (header.last_seq is not None and header.last_seq < page.after)):
            # The sensor's journal was reset (new file, seq started over): start again at 0.
            self.counters["catchup_resets"] += 1
            logger.warning("sensor %s: its journal was reset (epoch %s -> %s, last seq %s, "
                           "our cursor %d); catching up from seq 0", sensor_id, known,
                           header.epoch, header.last_seq, page.after)
            outbox.reset_cursor(sensor_id, source, epoch=header.epoch)
            state.last_seq = 0
            self._catch_up(sensor_id)
            return
        after = page.after
        for pair in page.pairs:
            try:
                message = decode(pair)
            except MessageError as err:
                self._bad(err.reason, f"catch-up from {source}: {err}")
                continue
            if isinstance(message, Event) and message.sensor_id == sensor_id:
                self.counters["catchup_events"] += 1
                self._judge(outbox, message)
                after = max(after, message.seq)
        if after > state.last_seq or outbox.cursor(sensor_id) is None or known is None:
            outbox.set_cursor(sensor_id, source, after, epoch=header.epoch)
            state.last_seq = max(state.last_seq, after)
        if header.more and page.pairs:
            self._catch_up(sensor_id)
        else:
            state.catchup_at = 0.0

    def _judge(self, outbox: Outbox, event: Event) -> None:
        now = self.clock()
        if now - event.ts > self.config.max_event_age_s:
            self.counters["stale"] += 1
            return
        self.counters["events"] += 1
        fired_any = False
        for rule in self.config.rules:
            if not rule.matches(event, self.config.rooms):
                continue
            if outbox.decided(rule.name, event.sensor_id, event.event_id, event.phase) \
                    is not None:
                self.counters["duplicates"] += 1
                continue
            fire = True
            if event.phase == "end" and "start" in rule.phases:
                fire = outbox.decided(rule.name, event.sensor_id, event.event_id,
                                      "start") is not False
            elif rule.cooldown_s > 0:
                last = outbox.last_fired(rule.name, event.sensor_id, event.label)
                fire = last is None or event.onset_time - last >= rule.cooldown_s
            items = self._items(rule, event, now) if fire else []
            outbox.decide(rule=rule.name, sensor_id=event.sensor_id, event_id=event.event_id,
                          phase=event.phase, label=event.label, fired=fire, at=now,
                          event_time=event.onset_time, items=items)
            fired_any |= fire
        if fired_any:
            self.dispatcher.wake.set()

    def _items(self, rule: Rule, event: Event, now: float) -> list[Item]:
        payload = {"rule": rule.name, "kind": "alert", "sensor_id": event.sensor_id,
                   "room": next((r for r, s in self.config.rooms.items()
                                 if event.sensor_id in s), None),
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

    def _offline_event(self, sensor_id: str, state: SensorState,
                       phase: Literal["start", "end"]) -> Event:
        now = self.clock()
        return Event(sensor_id=sensor_id, seq=state.last_seq, ts=now,
                     event_id=f"offline-{sensor_id}-{int(state.last_seen)}", label=OFFLINE_LABEL,
                     phase=phase, onset_s=0.0, offset_s=None if phase == "start" else 0.0,
                     onset_time=state.last_seen, offset_time=None if phase == "start" else now,
                     peak_score=1.0, threshold=1.0)

    def _tick(self, outbox: Outbox, now: float) -> None:
        for sensor_id, state in self.sensors.items():
            if not state.offline and now - state.last_seen > self.config.heartbeat_timeout_s:
                state.offline = True
                logger.warning("sensor %s silent for %.0f s", sensor_id, now - state.last_seen)
                self._judge(outbox, self._offline_event(sensor_id, state, "start"))
            if state.catchup_at and now >= state.catchup_at:
                self._catch_up(sensor_id)
        self.health.settle(now)

    def _bad(self, reason: str, text: str) -> None:
        self.counters["bad_messages"] += 1
        self.refusals.count(reason, text)

    def _on_ack(self, outbox: Outbox, socket: zmq.Socket[Any]) -> None:
        frames = socket.recv_multipart()
        envelope, payload = frames[:-1], frames[-1]
        try:
            request = parse_ack(payload)
        except MessageError as err:
            self._bad(f"ack_{err.reason}", str(err))
            socket.send_multipart([*envelope, msgspec.json.encode(
                {"ok": False, "error": f"{err}; expected {{\"event_id\": ..., \"by\": ...}}"})])
            return
        cancelled = outbox.ack(request.event_id, at=self.clock(), by=request.by)
        self.counters["acks"] += 1
        logger.info("event %s acknowledged by %s; %d escalation(s) cancelled", request.event_id,
                    request.by or "?", cancelled)
        socket.send_multipart([*envelope, json.dumps({"ok": True,
                                                      "cancelled": cancelled}).encode()])


class AckRequest(Strict, frozen=True):
    """What `audio-monitor ack` sends: the event to acknowledge and who did."""

    event_id: Name
    by: Annotated[str, Meta(max_length=200)] = ""


_ACK = msgspec.json.Decoder(AckRequest)
MAX_ACK_BYTES = 4096


def parse_ack(payload: bytes) -> AckRequest:
    """An ack request's body -> AckRequest; MessageError (one line, key path) if malformed."""
    if len(payload) > MAX_ACK_BYTES:
        raise MessageError(f"ack request of {len(payload)} bytes is over the {MAX_ACK_BYTES}-"
                           "byte limit", reason="too_large")
    try:
        return _ACK.decode(payload)
    except msgspec.ValidationError as err:
        raise MessageError(f"ack request: {describe(err)}") from err
    except msgspec.DecodeError as err:
        raise MessageError(f"ack request is not JSON: {err}", reason="not_json") from err


def send_ack(endpoint: str, event_id: str, *, by: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Client of the ack endpoint (`audio-monitor ack`)."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(endpoint)
        socket.send(msgspec.json.encode(AckRequest(event_id=event_id, by=by)))
        if not socket.poll(int(timeout_s * 1000)):
            raise ConfigError(f"ack: no answer from {endpoint} within {timeout_s} s; is "
                              "`audio-monitor alert` running with ack_endpoint set?")
        reply: dict[str, Any] = json.loads(socket.recv())
        return reply
    finally:
        socket.close()
