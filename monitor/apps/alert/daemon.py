"""The alert daemon: subscribes to every source, judges events against the rules and records
each decision and its actions once (`monitor.apps.alert` says how it flows)."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from monitor.apps.alert.ack import is_status_request, parse_ack
from monitor.apps.alert.catchup import CatchupWorker, Page
from monitor.apps.alert.config import AlertConfig, offline_event, work_items
from monitor.apps.alert.dispatch import DESTINATION_COUNTERS, Dispatcher, Health, state_error
from monitor.apps.alert.outbox import Outbox, StateLock
from monitor.errors import ConfigError, MessageError
from monitor.protocol.messages import Event, Status, decode
from monitor.protocol.schema import Refusals
from monitor.service.sdnotify import Notifier

logger = logging.getLogger(__name__)


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
    catchup_failures: int = 0
    """Failed catch-up requests in a row (a sensor running without its journal answers
    each with a refusal: logged at the first and every 100th, not every 2 s)."""


class AlertDaemon:
    """Subscribes, judges, records; the dispatcher delivers. `run` returns when `stop` is set.

    Nothing a peer sends ends it: bad messages are counted by reason (`refusals`) and
    dropped; a failing state file degrades it (`health`) and is retried."""

    def __init__(self, config: AlertConfig, *, context: zmq.Context[Any] | None = None,
                 clock: Callable[[], float] = time.time,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.context = context or zmq.Context.instance()
        self.clock = clock
        self.notifier = notifier or Notifier(None)
        """systemd: READY=1 once running, a STATUS= line (`summary`) whenever it changes."""
        self.started = clock()
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
        self._status_line = ""
        self.bridges: list[Any] = []
        """MQTT sources' bridges (`monitor.apps.alert.mqtt_bridge.MqttBridge`), while `run` runs."""

    @property
    def state(self) -> str:
        """"running", or "degraded" while the state file fails (see `last_error`)."""
        healths = (self.health, self.dispatcher.health)
        return "degraded" if any(h.state == "degraded" for h in healths) else "running"

    @property
    def last_error(self) -> str | None:
        return self.health.last_error or self.dispatcher.health.last_error

    def status(self, outbox: Outbox | None = None) -> dict[str, Any]:
        """What an operator asks for (`audio-monitor alert-status`): state, last_error,
        counters, bad_messages by reason, per destination (`rule/action`) delivered, failed,
        timeouts, expired, in_flight and pending (null if the state file cannot be read),
        and per sensor whether it is offline, its cursor and seconds since it was heard."""
        pending: dict[str, int] | None = None
        if outbox is not None:
            try:
                pending = outbox.pending_by_action()
            except sqlite3.Error:
                pending = None
        dispatcher = self.dispatcher
        with dispatcher.lock:
            destinations = {name: {**{k: counts[k] for k in DESTINATION_COUNTERS},
                                   "pending": None if pending is None else pending.get(name, 0)}
                            for name, counts in dispatcher.destinations.items()}
            delivered, failed, expired = dispatcher.delivered, dispatcher.failed, \
                dispatcher.expired
        now = self.clock()
        return {
            "state": self.state, "last_error": self.last_error,
            "uptime_s": round(now - self.started, 3),
            "counters": {**self.counters, "delivered": delivered, "failed": failed,
                         "expired": expired},
            "bad_messages": dict(self.refusals.by_reason),
            "destinations": destinations,
            "sensors": {sensor_id: {"offline": state.offline, "last_seq": state.last_seq,
                                    "silent_s": round(max(0.0, now - state.last_seen), 3)}
                        for sensor_id, state in sorted(self.sensors.items())},
        }

    def summary(self, status: dict[str, Any]) -> str:
        """`status` as one line, for systemd's STATUS= (`systemctl status`)."""
        destinations = status["destinations"].values()
        pending = [d["pending"] for d in destinations]
        counters = status["counters"]
        line = (f"{status['state']}; {len(status['sensors'])} sensor(s), "
                f"{sum(s['offline'] for s in status['sensors'].values())} offline; "
                f"delivered {counters['delivered']}, failed {counters['failed']} "
                f"({sum(d['timeouts'] for d in destinations)} timeouts), pending "
                f"{'?' if None in pending else sum(pending)}; "
                f"bad_messages {counters['bad_messages']}")
        if status["last_error"]:
            line += f"; last_error: {status['last_error']}"
        return line

    def _notify(self, outbox: Outbox) -> None:
        text = self.summary(self.status(outbox))
        if text != self._status_line:
            self._status_line = text
            self.notifier.status(text)

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
                    from monitor.apps.alert.mqtt_bridge import MqttBridge

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
        self._status_line = self.summary(self.status(outbox))
        self.notifier.ready(self._status_line)
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
                    self._notify(outbox)
        finally:
            self.notifier.stopping(f"stopping; {self._status_line}")
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
            self._judge(outbox, offline_event(message.sensor_id, state.last_seq,
                                              state.last_seen, "end", now=self.clock()))
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
            state.catchup_failures += 1
            if state.catchup_failures % 100 == 1:
                logger.warning("catch-up for %s from %s (%d failures in a row): %s", sensor_id,
                               source, state.catchup_failures, page.error)
            return
        state.catchup_failures = 0
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
            items = work_items(rule, event, rooms=self.config.rooms, now=now) if fire else []
            outbox.decide(rule=rule.name, sensor_id=event.sensor_id, event_id=event.event_id,
                          phase=event.phase, label=event.label, fired=fire, at=now,
                          event_time=event.onset_time, items=items)
            fired_any |= fire
        if fired_any:
            self.dispatcher.wake.set()

    def _tick(self, outbox: Outbox, now: float) -> None:
        for sensor_id, state in self.sensors.items():
            if not state.offline and now - state.last_seen > self.config.heartbeat_timeout_s:
                state.offline = True
                logger.warning("sensor %s silent for %.0f s", sensor_id, now - state.last_seen)
                self._judge(outbox, offline_event(sensor_id, state.last_seq, state.last_seen,
                                                  "start", now=self.clock()))
            if state.catchup_at and now >= state.catchup_at:
                self._catch_up(sensor_id)
        self.health.settle(now)

    def _bad(self, reason: str, text: str) -> None:
        self.counters["bad_messages"] += 1
        self.refusals.count(reason, text)

    def _on_ack(self, outbox: Outbox, socket: zmq.Socket[Any]) -> None:
        """A request on the ack endpoint: an ack, or `{"request": "status"}`."""
        frames = socket.recv_multipart()
        envelope, payload = frames[:-1], frames[-1]
        if is_status_request(payload):
            socket.send_multipart([*envelope, json.dumps({"ok": True,
                                                          **self.status(outbox)}).encode()])
            return
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
