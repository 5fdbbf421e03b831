"""The ack endpoint's requests: acknowledging an event (`audio-monitor ack`) and asking the
daemon's status (`audio-monitor alert-status`); their parsers and the clients."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec
import zmq
from msgspec import Meta

from monitor.errors import ConfigError, MessageError
from monitor.protocol.schema import Name, Strict, describe


class AckRequest(Strict, frozen=True):
    """What `audio-monitor ack` sends: the event to acknowledge and who did."""

    event_id: Name
    by: Annotated[str, Meta(max_length=200)] = ""


class StatusRequest(Strict, frozen=True):
    """What `audio-monitor alert-status` sends to the ack endpoint."""

    request: Literal["status"]


_ACK = msgspec.json.Decoder(AckRequest)
_STATUS = msgspec.json.Decoder(StatusRequest)
MAX_ACK_BYTES = 4096


def is_status_request(payload: bytes) -> bool:
    """True for exactly ``{"request": "status"}``; anything else is parsed as an ack."""
    if len(payload) > MAX_ACK_BYTES:
        return False
    try:
        _STATUS.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return False
    return True




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
    return _ask(endpoint, AckRequest(event_id=event_id, by=by), timeout_s=timeout_s)


def ask_status(endpoint: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """The running alert daemon's `AlertDaemon.status()`, through its ack endpoint."""
    return _ask(endpoint, StatusRequest(request="status"), timeout_s=timeout_s)


def _ask(endpoint: str, request: msgspec.Struct, *, timeout_s: float) -> dict[str, Any]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(endpoint)
        socket.send(msgspec.json.encode(request))
        if not socket.poll(int(timeout_s * 1000)):
            raise ConfigError(f"no answer from {endpoint} within {timeout_s} s; is "
                              "`audio-monitor alert` running with ack_endpoint set?")
        reply: dict[str, Any] = json.loads(socket.recv())
        return reply
    finally:
        socket.close()
