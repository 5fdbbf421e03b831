"""MQTT output (paho-mqtt) with Home Assistant discovery.

Topics, under ``<topic_prefix>/<sensor_id>/``:

==============================  =====  ========  =========================================
topic                           QoS    retained  payload
==============================  =====  ========  =========================================
``availability``                1      yes       ``online``; ``offline`` (also the last will)
``status``                      1      yes       the `status` message's JSON
``event/<class>``               1      no        the `event` message's JSON (start and end)
``event/machine_fault/<m>``     1      no        a machine's fault events
``level``                       0      no        `level` JSON, at most `level_hz` per second
``anomaly/<machine>``           0      no        `anomaly` JSON, at most `level_hz` per second
``scores``                      0      no        `scores` JSON, at most `scores_hz` per second
==============================  =====  ========  =========================================

Payloads are the JSON bodies of the ZeroMQ wire contract (`monitor.protocol.messages`), so one
decoder reads both. Delivery of events is *at least once*: every event is in the journal
(with its `seq`) before it is handed here; while the broker is away paho keeps it queued
and sends it on reconnect; the seq of the newest event the broker acknowledged (PUBACK),
with every older one acknowledged too, is kept in ``state_dir/mqtt.db``, and at start-up
journaled events after it are sent again. A resend after a lost PUBACK or a crash can
repeat an event on the wire, never lose one; consumers drop repeats by
``(sensor_id, seq)`` (or ``event_id`` + ``phase``), as the alert daemon does.

Threads: `send` runs in the processing thread and never blocks on the network (paho
queues); paho's network thread connects, reconnects with backoff and runs the callbacks.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from monitor.config import MqttConfig
from monitor.errors import ConfigError, MessageError
from monitor.outputs.composer import Catalog, Output, OutputContext
from monitor.outputs.journal import JournalReader
from monitor.outputs.mqtt_discovery import OFFLINE, ONLINE, discovery_messages
from monitor.protocol.messages import (
    Anomaly,
    Event,
    Level,
    Message,
    Scores,
    Status,
    class_slug,
    decode,
)
from monitor.protocol.messages import encode as encode_frames

logger = logging.getLogger(__name__)

CLOSE_FLUSH_S = 2.0
"""On close: at most this long for queued events to be acknowledged."""
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def node_id(topic_prefix: str, sensor_id: str) -> str:
    """Home Assistant node and device id of a sensor: letters, digits, `_` and `-`."""
    return _UNSAFE.sub("_", f"{topic_prefix.strip('/')}_{sensor_id}")


def topic_of(message: Message) -> str:
    """The topic below ``<prefix>/<sensor_id>/`` for a wire message."""
    if isinstance(message, Event) and message.machine is not None:
        return f"event/{class_slug(message.label)}/{class_slug(message.machine)}"
    return message.topic.replace(".", "/")


def wire_topic(subtopic: str) -> str:
    """Inverse of `topic_of` on the ZeroMQ side: ``event/fall`` -> ``event.fall``."""
    return ".".join(subtopic.split("/")[:2])


def _read_secret(path: Path | None, key: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ConfigError(f"mqtt.{key}: cannot read {path}: {err.strerror}") from err


def make_client(settings: MqttConfig, client_id: str, *, clean_session: bool = True) -> Any:
    """A paho client with credentials, TLS and reconnect backoff from `settings`; not yet
    connected. ConfigError (naming the key) when a file cannot be read."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=clean_session)
    username = _read_secret(settings.username_file, "username_file")
    password = _read_secret(settings.password_file, "password_file")
    if username is not None or password is not None:
        client.username_pw_set(username or "", password)
    if settings.tls is not None:
        tls = settings.tls
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(tls, key)
            if path is not None and not path.is_file():
                raise ConfigError(f"mqtt.tls.{key}: {path} is not a file")
        try:
            client.tls_set(ca_certs=None if tls.ca_file is None else str(tls.ca_file),
                           certfile=None if tls.cert_file is None else str(tls.cert_file),
                           keyfile=None if tls.key_file is None else str(tls.key_file))
        except (OSError, ValueError) as err:
            raise ConfigError(f"mqtt.tls: {err}") from err
    client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
    return client


def refused(settings: MqttConfig, reason: Any) -> bool:
    """Whether the broker refused a connection (paho's `reason`); logs the refusal once."""
    if reason.is_failure:
        logger.warning("mqtt: %s:%d refused the connection: %s", settings.host, settings.port,
                       reason)
    return bool(reason.is_failure)


class _Cursor:
    """The seq of the newest event the broker acknowledged with all older ones, on disk."""

    def __init__(self, path: Path, *, sensor_id: str, broker: str) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(path), timeout=10, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # a lost update means a resend
            self._conn.execute("CREATE TABLE IF NOT EXISTS delivered (sensor_id TEXT, "
                               "broker TEXT, seq INTEGER NOT NULL, "
                               "PRIMARY KEY (sensor_id, broker))")
        except (sqlite3.Error, OSError) as err:
            raise ConfigError(f"mqtt: cannot open {path}: {err}; check state_dir") from err
        self._key = (sensor_id, broker)

    def load(self) -> int | None:
        row = self._conn.execute("SELECT seq FROM delivered WHERE sensor_id = ? AND broker = ?",
                                 self._key).fetchone()
        return None if row is None else int(row[0])

    def store(self, seq: int) -> None:
        try:
            self._conn.execute("INSERT INTO delivered VALUES (?, ?, ?) ON CONFLICT DO UPDATE "
                               "SET seq = max(seq, excluded.seq)", (*self._key, seq))
        except sqlite3.Error as err:
            logger.warning("mqtt: cannot record delivered seq %d: %s", seq, err)

    def close(self) -> None:
        self._conn.close()


def build(settings: MqttConfig, context: OutputContext) -> MqttOutput:
    """The `mqtt:` output (`monitor.outputs.composer.build_outputs`)."""
    return MqttOutput(settings, sensor_id=context.sensor_id, state_dir=context.state_dir,
                      journal_path=context.journal_path)


class MqttOutput(Output):
    """Publishes the daemon's messages to an MQTT broker (see the module docstring)."""

    name = "mqtt"

    def __init__(self, settings: MqttConfig, *, sensor_id: str, state_dir: Path,
                 journal_path: Path | None = None, clock: Callable[[], float] = time.monotonic,
                 ) -> None:
        self.settings = settings
        self.sensor_id = sensor_id
        self.base = f"{settings.topic_prefix.strip('/')}/{sensor_id}"
        self.availability_topic = f"{self.base}/availability"
        self.node = node_id(settings.topic_prefix, sensor_id)
        self.catalog: Catalog | None = None
        self.clock = clock
        self.client_id = settings.client_id or f"audio-monitor-{sensor_id}"
        self.client = make_client(settings, self.client_id)
        self.client.will_set(self.availability_topic, OFFLINE, qos=1, retain=True)
        self.client.max_queued_messages_set(settings.queue_max)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        broker = f"{settings.host}:{settings.port}"
        self._cursor = _Cursor(state_dir / "mqtt.db", sensor_id=sensor_id, broker=broker)
        self._lock = threading.Lock()  # guards the three below (processing and network thread)
        self._pending: dict[int, int | None] = {}  # mid -> event seq (None: not an event)
        self._early: set[int] = set()  # acknowledged before `_pending` heard of them
        self._acked_high = 0
        self._last_status: bytes | None = None
        self._next_t: dict[str, float] = {}
        self.connected = False
        self._closing = False
        self.sent = 0
        """QoS 0 messages handed to the socket (processing thread)."""
        self.acked = 0
        """QoS 1 messages the broker acknowledged (network thread)."""
        self.dropped = 0
        self.connects = 0
        self.replayed = 0
        self._delivered = self._cursor.load()
        self._stored = self._delivered
        if journal_path is not None:
            self._replay(journal_path)
        self.client.connect_async(settings.host, settings.port, keepalive=settings.keepalive_s)
        self.client.loop_start()

    # --- processing thread ---------------------------------------------------------------

    def announce(self, catalog: Catalog) -> None:
        """What discovery announces, at every connect; the daemon is built: `online`."""
        self.catalog = catalog
        if self.connected:
            self._say_online()

    def send(self, message: Message) -> None:
        if isinstance(message, Event):
            self._publish_event(message)
        elif isinstance(message, Status):
            payload = encode_frames(message)[1]
            self._last_status = payload
            if self.connected:  # otherwise sent at the next connect: only the latest counts
                self._publish(f"{self.base}/status", payload, qos=1, retain=True)
        elif isinstance(message, Level | Anomaly):
            self._sample(message, message.t_audio_s, self.settings.level_hz)
        elif isinstance(message, Scores):
            self._sample(message, message.t_audio_s, self.settings.scores_hz)

    def _sample(self, message: Message, t_audio_s: float, hz: float) -> None:
        """Publish at most `hz` messages per second of audio per topic (QoS 0)."""
        if hz <= 0:
            return
        topic = topic_of(message)
        if t_audio_s < self._next_t.get(topic, 0.0):
            return
        self._next_t[topic] = t_audio_s + 1.0 / hz
        if self.connected:
            self._publish(f"{self.base}/{topic}", encode_frames(message)[1], qos=0)

    def _publish_event(self, event: Event) -> None:
        self._publish(f"{self.base}/{topic_of(event)}", encode_frames(event)[1], qos=1,
                      seq=event.seq)

    def _publish(self, topic: str, payload: bytes | str, *, qos: int, retain: bool = False,
                 seq: int | None = None) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            self.dropped += 1
            logger.error("mqtt: queue full (%d); %s dropped (the journal keeps events: they "
                         "are sent after the next start)", self.settings.queue_max, topic)
            return
        if qos == 0:
            if info.rc == paho.MQTT_ERR_SUCCESS:
                self.sent += 1
            else:
                self.dropped += 1
            return
        with self._lock:  # never held while paho holds its own lock: no lock order to break
            if info.mid in self._early:
                self._early.discard(info.mid)
                self._acked(seq)
            else:
                self._pending[info.mid] = seq

    def _replay(self, journal_path: Path) -> None:
        """Queue journaled events the broker has not acknowledged (previous runs)."""
        try:
            reader = JournalReader(journal_path)
        except ConfigError as err:
            logger.warning("mqtt: no journal to replay from: %s", err)
            return
        try:
            if self._delivered is None:  # first run with this broker: start from now
                self._delivered = self._stored = reader.last_seq(self.sensor_id)
                self._cursor.store(self._delivered)
                return
            after = self._delivered
            for pair in reader.since(self.sensor_id, after, limit=self.settings.queue_max):
                try:
                    message = decode(list(pair))
                except MessageError as err:
                    logger.warning("mqtt: journaled message not replayed: %s", err)
                    continue
                if isinstance(message, Event):
                    self._publish_event(message)
                    self.replayed += 1
        finally:
            reader.close()
        if self.replayed:
            logger.info("mqtt: %d journaled event(s) after seq %d queued for the broker",
                        self.replayed, after)

    def poll(self, now: float) -> None:
        self._store_cursor()

    def _store_cursor(self) -> None:
        with self._lock:
            delivered = self._delivered
        if delivered is not None and delivered != self._stored:
            self._cursor.store(delivered)
            self._stored = delivered

    def stats(self) -> dict[str, int]:
        return {"mqtt_sent": self.sent, "mqtt_acked": self.acked, "mqtt_dropped": self.dropped,
                "mqtt_connects": self.connects, "mqtt_replayed": self.replayed}

    def pending_events(self) -> int:
        """Events handed to paho that the broker has not acknowledged yet."""
        with self._lock:
            return sum(seq is not None for seq in self._pending.values())

    def close(self) -> None:
        """Say offline (retained), give queued events CLOSE_FLUSH_S to be acknowledged,
        record what was, disconnect."""
        if self.connected:
            self._publish(self.availability_topic, OFFLINE, qos=1, retain=True)
        deadline = self.clock() + CLOSE_FLUSH_S
        while self.connected and self.clock() < deadline:
            with self._lock:
                if not self._pending:
                    break
            time.sleep(0.02)
        self._closing = True
        self.client.disconnect()
        self.client.loop_stop()
        self._store_cursor()
        self._cursor.close()
        left = self.pending_events()
        if left:
            logger.warning("mqtt: %d event(s) not acknowledged at exit; sent at the next start "
                           "from the journal", left)

    # --- paho's network thread -----------------------------------------------------------

    def _acked(self, seq: int | None) -> None:
        """With `_lock` held: one QoS 1 message was acknowledged."""
        self.acked += 1
        if seq is None:
            return
        self._acked_high = max(self._acked_high, seq)
        waiting = [s for s in self._pending.values() if s is not None]
        delivered = min(waiting) - 1 if waiting else self._acked_high
        if self._delivered is None or delivered > self._delivered:
            self._delivered = delivered

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        with self._lock:
            if mid not in self._pending:
                self._early.add(mid)
                return
            self._acked(self._pending.pop(mid))

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if refused(self.settings, reason):
            return
        self.connects += 1
        self.connected = True
        logger.info("mqtt: connected to %s:%d as %s", self.settings.host, self.settings.port,
                    self.client_id)
        if self.catalog is not None:  # else `announce` says online once the daemon is built
            self._say_online()

    def _say_online(self) -> None:
        """Entities and state before `online`: whoever sees `online` finds them retained."""
        if self.settings.discovery:
            self._publish_discovery()
        if self._last_status is not None:
            self._publish(f"{self.base}/status", self._last_status, qos=1, retain=True)
        self._publish(self.availability_topic, ONLINE, qos=1, retain=True)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        if self.connected and not self._closing:
            logger.warning("mqtt: lost %s:%d (%s); reconnecting with backoff",
                           self.settings.host, self.settings.port, reason)
        self.connected = False

    # --- Home Assistant discovery --------------------------------------------------------

    def _publish_discovery(self) -> None:
        assert self.catalog is not None
        for topic, config in discovery_messages(
                self.settings, sensor_id=self.sensor_id, base=self.base, node=self.node,
                availability_topic=self.availability_topic, catalog=self.catalog):
            self._publish(topic, json.dumps(config, separators=(",", ":")), qos=1, retain=True)
