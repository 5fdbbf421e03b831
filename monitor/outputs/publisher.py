"""ZeroMQ PUB side: numbers messages and sends them without ever blocking the pipeline.

The socket lives and dies in the thread that creates it (the processing thread).
A slow or dead subscriber fills its own queue up to ``send_hwm``; ZeroMQ then drops
messages for that subscriber only, so one stuck dashboard cannot starve the pager.
Those per-subscriber drops are invisible to a PUB socket by design: subscribers see
them as gaps in ``seq``. ``dropped`` counts what this side could not send at all.
A message that cannot be encoded (a non-finite number: a bug upstream) is counted in
``unencodable`` and gives its ``seq`` back, so subscribers never mistake it for loss.

With a journal, every `Event` is written to disk (fsync) *before* it is sent, so a
subscriber that missed it asks the catch-up endpoint; `seq` continues after the
journal's highest reserved number across restarts (see `monitor.outputs.journal`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq

from monitor.config import Config, check_endpoint
from monitor.errors import ConfigError, MessageError
from monitor.outputs.catchup import CatchupServer
from monitor.outputs.journal import SEQ_BLOCK, Journal
from monitor.protocol.keys import CurveServer, require_safe
from monitor.protocol.messages import Event, Message, decode, encode

logger = logging.getLogger(__name__)


class Publisher:
    """Binds a PUB socket and sends messages with a per-sensor sequence number."""

    def __init__(self, endpoint: str, *, sensor_id: str, send_hwm: int,
                 context: zmq.Context[Any] | None = None, journal: Journal | None = None,
                 curve: CurveServer | None = None, allow_insecure: bool = False) -> None:
        check_endpoint(endpoint, where="publish.endpoint")
        require_safe(endpoint, curve=curve is not None, allow_insecure=allow_insecure,
                     where="publish.endpoint")
        self.sensor_id = sensor_id
        self.endpoint = endpoint
        self._context = context or zmq.Context.instance()
        # XPUB is PUB that also hears subscriptions: `wait_for_subscriber` needs them.
        self._socket = self._context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.SNDHWM, send_hwm)
        self._socket.setsockopt(zmq.RCVHWM, 100)
        self._socket.setsockopt(zmq.LINGER, 500)
        if curve is not None:
            curve.apply(self._socket)  # curve_server=True before bind
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as err:
            self._socket.close(linger=0)
            raise ConfigError(f"publish.endpoint: cannot bind {endpoint!r}: {err.strerror}; "
                              "pick a free port or path") from err
        self.bound_endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._journal = journal
        self.journal = journal
        """The durable event journal, when configured (its counters go into `status`)."""
        self._seq = 0 if journal is None else journal.start_seq(sensor_id)
        self._reserved = self._seq
        self._generation = 0 if journal is None else journal.generation
        self.sent = 0
        self.dropped = 0
        """Messages ZeroMQ refused (seq gaps at every subscriber)."""
        self.unencodable = 0
        """Messages that could not be encoded; their seq was given back (no gap)."""

    def wait_for_subscriber(self, timeout_s: float) -> bool:
        """Block until a subscription arrives (batch runs that must not lose the first
        messages to ZeroMQ's slow-joiner gap); False on timeout."""
        if self._socket.poll(int(timeout_s * 1000)):
            self.drain_subscriptions()
            return True
        return False

    def drain_subscriptions(self) -> int:
        """Read pending (un)subscription notices so they never pile up; returns how many."""
        count = 0
        while self._socket.poll(0):
            self._socket.recv()
            count += 1
        return count

    def next_header(self) -> dict[str, Any]:
        """Common fields of the next message: sensor_id, seq, ts."""
        self._seq += 1
        journal = self._journal
        if journal is not None:
            if journal.ready() and journal.generation != self._generation:
                # (Re)opened since we numbered: continue above what it holds, reserve anew.
                self._generation = journal.generation
                self._seq = max(self._seq, journal.start_seq(self.sensor_id) + 1)
                self._reserved = self._seq - 1
            if self._seq > self._reserved:
                self._reserved = journal.reserve(self.sensor_id, self._seq + SEQ_BLOCK)
        return {"sensor_id": self.sensor_id, "seq": self._seq, "ts": time.time()}

    def send(self, message: Message) -> bool:
        """Send without blocking; returns False (and counts a drop) when ZeroMQ refuses, or
        (counted as `unencodable`) when the message cannot be encoded."""
        try:
            frames = encode(message)
        except ValueError as err:  # e.g. NaN in a field: a bug upstream, never a crash here
            self.unencodable += 1
            self.give_back(message.seq)
            logger.warning("unencodable %s message not sent: %s", message.TYPE, err)
            return False
        if self._journal is not None and isinstance(message, Event):
            self._journal.append(message.sensor_id, message.seq, message.ts, frames,
                                 opens=message.event_id if message.phase == "start" else None,
                                 closes=message.event_id if message.phase == "end" else None)
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        except zmq.ZMQError as err:
            self.dropped += 1
            logger.warning("publish failed on %s: %s", self.endpoint, err.strerror)
            return False
        self.sent += 1
        return True

    def publish(self, cls: type, **fields: Any) -> Message:
        """Build a message of type `cls` with the next header and send it."""
        message: Message = cls(**self.next_header(), **fields)
        self.send(message)
        return message

    def open_events(self) -> list[Event]:
        """The `start` of every event the journal shows started and never ended (a killed
        run's); empty without a journal. Unreadable rows are logged and skipped."""
        if self._journal is None:
            return []
        starts = []
        for topic, body in self._journal.open_events(self.sensor_id):
            try:
                message = decode([topic, body])
            except MessageError as err:
                logger.error("journal: unreadable open event of %s: %s", self.sensor_id, err)
                continue
            if isinstance(message, Event):
                starts.append(message)
        return starts

    def give_back(self, seq: int) -> None:
        """`seq`, the latest number, was not used (its message could not be encoded): the
        next message takes it, so subscribers see no gap."""
        if seq == self._seq:
            self._seq -= 1

    def close(self) -> None:
        self._socket.close()



class PublishingStack:
    """What `run` publishes through: journal, CURVE authenticator, PUB socket and catch-up
    server, built from the config in the right order and closed in reverse."""

    def __init__(self, config: Config, *, context: zmq.Context[Any] | None = None) -> None:
        publish = config.publish
        self.context = context or zmq.Context.instance()
        self.curve: CurveServer | None = None
        self.catchup: CatchupServer | None = None
        self.journal = Journal(config.state_dir / "journal.db",
                               max_age_days=config.journal.max_age_days,
                               max_mb=config.journal.max_mb)
        try:
            if publish.curve is not None:
                assert publish.curve.secret_key is not None  # checked by load_config
                self.curve = CurveServer(self.context, secret_key=publish.curve.secret_key,
                                         allowed_clients=publish.curve.allowed_clients,
                                         where="publish.curve")
            self.publisher = Publisher(publish.endpoint, sensor_id=config.sensor_id,
                                       send_hwm=publish.send_hwm, context=self.context,
                                       journal=self.journal, curve=self.curve,
                                       allow_insecure=publish.allow_insecure)
            if publish.catchup_endpoint is not None:
                self.catchup = CatchupServer(publish.catchup_endpoint,
                                             journal_path=self.journal.path,
                                             sensor_ids=(config.sensor_id,),
                                             context=self.context, curve=self.curve,
                                             allow_insecure=publish.allow_insecure)
                self.catchup.start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.catchup is not None:
            self.catchup.stop()
        if hasattr(self, "publisher"):
            self.publisher.close()
        if self.curve is not None:
            self.curve.stop()
        self.journal.close()
