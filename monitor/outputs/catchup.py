"""Catch-up: "events of sensor S since seq N", answered from the journal.

Protocol (request/reply over ZeroMQ; the server is a ROUTER, clients use REQ):

* request: one frame, JSON ``{"sensor_id": S, "after_seq": N, "limit": L}``
* reply: ``[header, topic, body, topic, body, ...]``; header is JSON
  ``{"ok": true, "sensor_id": S, "after_seq": N, "last_seq": M, "more": bool}``
  (``last_seq``: the newest journaled event seq; ``more``: ask again after the last
  returned seq) or ``{"ok": false, "error": "..."}``. Each ``[topic, body]`` pair is the
  event exactly as it was published, so `monitor.protocol.messages.decode` checks it.

The server keeps every envelope frame up to the first empty frame and sends it back, so a
broker in between (`monitor.apps.proxy`, a ROUTER in front of DEALERs) routes replies home.
The server runs in its own thread with its own SQLite connection; its socket never leaves
that thread.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Annotated, Any

import msgspec
import zmq
from msgspec import Meta

from monitor.config import check_endpoint
from monitor.errors import ConfigError, MessageError
from monitor.outputs.journal import JournalReader
from monitor.protocol.keys import CurveServer, require_safe
from monitor.protocol.schema import Count, Refusals, SensorId, Strict, describe

logger = logging.getLogger(__name__)

MAX_LIMIT = 1000
"""Events per reply at most; clients page with `after_seq`."""
POLL_MS = 100


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """ROUTER frames -> (envelope up to and including the first empty frame, payload)."""
    for i, frame in enumerate(frames):
        if frame == b"":
            return frames[:i + 1], frames[i + 1:]
    return frames, []


class Request(Strict, frozen=True):
    """A catch-up request: events of `sensor_id` with seq above `after_seq`."""

    sensor_id: SensorId
    after_seq: Count
    limit: Annotated[int, Meta(ge=1)] = MAX_LIMIT
    """Events per reply at most (capped at MAX_LIMIT)."""


_REQUEST = msgspec.json.Decoder(Request)
MAX_REQUEST_BYTES = 4096


def parse_request(payload: list[bytes]) -> tuple[str, int, int]:
    """-> (sensor_id, after_seq, limit); MessageError (one line, key path) if malformed."""
    if len(payload) != 1:
        raise MessageError(f"catch-up request must be 1 frame, got {len(payload)}",
                           reason="frames")
    if len(payload[0]) > MAX_REQUEST_BYTES:
        raise MessageError(f"catch-up request of {len(payload[0])} bytes is over the "
                           f"{MAX_REQUEST_BYTES}-byte limit", reason="too_large")
    try:
        request = _REQUEST.decode(payload[0])
    except msgspec.ValidationError as err:
        raise MessageError(f"catch-up request: {describe(err)}") from err
    except msgspec.DecodeError as err:
        raise MessageError(f"catch-up request is not JSON: {err}", reason="not_json") from err
    return request.sensor_id, request.after_seq, min(request.limit, MAX_LIMIT)


class ReplyHeader(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """First frame of a reply. Unknown keys are ignored (a newer server may add some)."""

    ok: bool
    sensor_id: SensorId | None = None
    after_seq: Count | None = None
    last_seq: Count | None = None
    """The newest journaled event seq (null: none yet)."""
    more: bool = False
    """True: ask again after the last returned seq."""
    epoch: Annotated[str, Meta(max_length=64)] | None = None
    """Id of the sensor's journal file. A different epoch than before means the journal was
    reset (seq started over): the subscriber restarts its cursor at 0."""
    error: Annotated[str, Meta(max_length=2000)] | None = None


_HEADER = msgspec.json.Decoder(ReplyHeader)


def error_reply(text: str) -> list[bytes]:
    return [msgspec.json.encode(ReplyHeader(ok=False, error=text[:2000]))]


class CatchupServer:
    """ROUTER answering catch-up requests from the journal, in a named thread."""

    def __init__(self, endpoint: str, *, journal_path: Path, sensor_ids: tuple[str, ...],
                 context: zmq.Context[Any] | None = None, curve: CurveServer | None = None,
                 allow_insecure: bool = False) -> None:
        check_endpoint(endpoint, where="publish.catchup_endpoint")
        require_safe(endpoint, curve=curve is not None, allow_insecure=allow_insecure,
                     where="publish.catchup_endpoint")
        self.endpoint = endpoint
        self.journal_path = journal_path
        self.sensor_ids = sensor_ids
        self.curve = curve
        self.context = context or zmq.Context.instance()
        self.served = 0
        self.bad_requests = 0
        self.refusals = Refusals(logger, "catch-up server")
        """Requests it could not answer, by reason (`bad_messages`)."""
        self.bound_endpoint = ""
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="catchup", daemon=True)

    def start(self, timeout_s: float = 5.0) -> None:
        """Start the thread and wait until it has bound (or report why it could not)."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise ConfigError(f"publish.catchup_endpoint: {self.endpoint!r} did not bind "
                              f"within {timeout_s} s")
        if self._error is not None:
            raise self._error

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        socket = self.context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            if self.curve is not None:
                self.curve.apply(socket)
            socket.bind(self.endpoint)
            self.bound_endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as err:
            self._error = ConfigError(f"publish.catchup_endpoint: cannot bind "
                                      f"{self.endpoint!r}: {err.strerror}")
            socket.close()
            self._ready.set()
            return
        self._ready.set()
        reader: JournalReader | None = None  # opened at the first request it can be
        try:
            while not self._stop.is_set():
                if not socket.poll(POLL_MS):
                    continue
                envelope, payload = split_envelope(socket.recv_multipart())
                try:
                    if reader is None:
                        reader = JournalReader(self.journal_path)
                    reply = self.answer(reader, payload)
                except ConfigError as err:  # no journal yet (the sensor runs degraded)
                    self.refusals.count("journal", str(err))
                    reply = error_reply(f"journal not available: {err}")
                except sqlite3.Error as err:  # the journal is unreadable: say so, go on
                    self.refusals.count("journal", f"{self.journal_path}: {err}")
                    reply = error_reply(f"journal unreadable: {err}")
                socket.send_multipart(envelope + reply)
        finally:
            if reader is not None:
                reader.close()
            socket.close()

    def answer(self, reader: JournalReader, payload: list[bytes]) -> list[bytes]:
        try:
            sensor_id, after_seq, limit = parse_request(payload)
        except MessageError as err:
            self.bad_requests += 1
            self.refusals.count(err.reason, str(err))
            return error_reply(str(err))
        if sensor_id not in self.sensor_ids:
            self.bad_requests += 1
            self.refusals.count("unknown_sensor", f"unknown sensor_id {sensor_id!r}")
            return error_reply(f"unknown sensor_id {sensor_id!r}; this endpoint serves "
                               f"{list(self.sensor_ids)}")
        rows = reader.since(sensor_id, after_seq, limit=limit)
        self.served += len(rows)
        header = ReplyHeader(ok=True, sensor_id=sensor_id, after_seq=after_seq,
                             last_seq=reader.last_seq(sensor_id), more=len(rows) == limit,
                             epoch=reader.epoch)
        frames = [msgspec.json.encode(header)]
        for topic, body in rows:
            frames += [topic, body]
        return frames


class CatchupClient:
    """REQ client of a catch-up endpoint (a sensor's or a proxy's); one thread only."""

    def __init__(self, endpoint: str, *, context: zmq.Context[Any],
                 configure: Any = None, timeout_s: float = 2.0) -> None:
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_s * 1000)
        self._context = context
        self._configure = configure
        self._socket = self._new_socket()

    def _new_socket(self) -> zmq.Socket[Any]:
        socket = self._context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.REQ_RELAXED, 1)
        socket.setsockopt(zmq.REQ_CORRELATE, 1)
        if self._configure is not None:
            self._configure(socket)
        socket.connect(self.endpoint)
        return socket

    def fetch(self, sensor_id: str, after_seq: int, *,
              limit: int = MAX_LIMIT) -> tuple[ReplyHeader, list[list[bytes]]] | None:
        """One page: (header, [[topic, body], ...]); None on timeout (the server is away).

        MessageError if the reply is malformed or a refusal; each pair still needs
        `monitor.protocol.messages.decode`."""
        request = Request(sensor_id=sensor_id, after_seq=after_seq, limit=limit)
        self._socket.send(msgspec.json.encode(request))
        if not self._socket.poll(self.timeout_ms):
            return None
        frames = self._socket.recv_multipart()
        try:
            header = _HEADER.decode(frames[0])
        except msgspec.ValidationError as err:
            raise MessageError(f"catch-up reply from {self.endpoint}: {describe(err)}") from err
        except msgspec.DecodeError as err:
            raise MessageError(f"catch-up reply from {self.endpoint} is not JSON",
                               reason="not_json") from err
        if not header.ok:
            raise MessageError(f"catch-up from {self.endpoint} refused: {header.error}",
                               reason="refused")
        pairs = [[frames[i], frames[i + 1]] for i in range(1, len(frames) - 1, 2)]
        return header, pairs

    def close(self) -> None:
        self._socket.close()
