"""`audio-monitor proxy`: a fleet of sensors on one bus.

Two threads, each owning its sockets:

* **bus**: an XSUB socket *connects* to every sensor's PUB endpoint and ZeroMQ's own
  proxy (`zmq.proxy_steerable`) forwards to one bound XPUB; subscriptions travel
  upstream, so each sensor still filters by topic. Sensors stay the binding side (the
  daemon is unchanged) and are identified by the `sensor_id` inside every message;
  their `status` heartbeats pass through, so a silent sensor is visible downstream.
* **catch-up broker**: a bound ROUTER takes catch-up requests, reads `sensor_id`, and
  forwards each to a DEALER connected to that sensor's catch-up endpoint; the reply
  comes back with its envelope to the asking client. Sensors answer from their own
  journal, so the proxy keeps no state and can restart at any time.

With `curve`, the proxy is a CURVE server to subscribers (allow-list) and a CURVE
client to each sensor (its `public_key`; the sensor must allow the proxy's key).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq

from monitor.config import read_yaml_mapping
from monitor.errors import ConfigError, MessageError
from monitor.outputs.catchup import error_reply, parse_request, split_envelope
from monitor.protocol.keys import CurveServer, apply_client, require_safe
from monitor.protocol.schema import Endpoint, Refusals, SensorId, Strict, convert

logger = logging.getLogger(__name__)

POLL_MS = 100


class SensorSpec(Strict, frozen=True):
    """fleet.yaml: one entry of `sensors`."""

    publish: Endpoint
    """The sensor's publish.endpoint."""
    catchup: Endpoint | None = None
    """The sensor's publish.catchup_endpoint; null: no catch-up through the proxy."""
    public_key: Path | None = None
    """The sensor's public key (with `curve`): the proxy is its CURVE client."""


class ProxyCurve(Strict, frozen=True):
    secret_key: Path
    allowed_clients: Path | None = None


class FleetFile(Strict, frozen=True):
    """fleet.yaml as written (see the shipped file for each key)."""

    publish: Endpoint
    catchup: Endpoint | None = None
    sensors: dict[SensorId, SensorSpec] = msgspec.field(default_factory=dict)
    curve: ProxyCurve | None = None
    allow_insecure: bool = False


@dataclass(frozen=True)
class SensorLink:
    sensor_id: str
    publish: str
    catchup: str | None = None
    public_key: Path | None = None


@dataclass(frozen=True)
class ProxyConfig:
    publish: str
    catchup: str | None
    sensors: tuple[SensorLink, ...]
    secret_key: Path | None = None
    allowed_clients: Path | None = None
    allow_insecure: bool = False


def load_proxy_config(path: Path) -> ProxyConfig:
    """Read fleet.yaml; relative key paths are against its folder. ConfigError (one line
    naming the key path) if anything is off."""
    spec = convert(read_yaml_mapping(path, what="proxy config"), FleetFile, error=ConfigError)
    base = path.resolve().parent
    links = tuple(SensorLink(sensor_id, link.publish, link.catchup,
                             None if link.public_key is None else base / link.public_key)
                  for sensor_id, link in spec.sensors.items())
    curve = spec.curve
    return ProxyConfig(
        publish=spec.publish, catchup=spec.catchup, sensors=links,
        secret_key=None if curve is None else base / curve.secret_key,
        allowed_clients=None if curve is None or curve.allowed_clients is None
        else base / curve.allowed_clients,
        allow_insecure=spec.allow_insecure)


class Proxy:
    """Runs the bus and the catch-up broker until `stop`."""

    def __init__(self, config: ProxyConfig, *, context: zmq.Context[Any] | None = None) -> None:
        self.config = config
        self.context = context or zmq.Context.instance()
        self.curve: CurveServer | None = None
        if config.secret_key is not None:
            self.curve = CurveServer(self.context, secret_key=config.secret_key,
                                     allowed_clients=config.allowed_clients, where="curve")
        for endpoint in (config.publish, config.catchup):
            if endpoint is not None:
                require_safe(endpoint, curve=self.curve is not None,
                             allow_insecure=config.allow_insecure, where="proxy")
        self.routed = 0
        self.refused = 0
        self.refusals = Refusals(logger, "proxy catch-up")
        """Requests it could not route, by reason (`bad_messages`)."""
        self.publish_endpoint = ""
        self.catchup_endpoint = ""
        self._stop = threading.Event()
        self._ready = threading.Barrier(3, timeout=10)
        self._control = f"inproc://proxy-control-{id(self)}"
        self._threads = [threading.Thread(target=self._bus, name="proxy-bus", daemon=True),
                         threading.Thread(target=self._broker, name="proxy-catchup",
                                          daemon=True)]

    def _client(self, socket: zmq.Socket[Any], link: SensorLink) -> None:
        if self.config.secret_key is not None and link.public_key is not None:
            apply_client(socket, secret_key=self.config.secret_key, server_key=link.public_key,
                         where=f"sensors.{link.sensor_id}")

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        try:
            self._ready.wait()
        except threading.BrokenBarrierError as err:
            raise ConfigError("proxy: could not bind its endpoints; see the log") from err

    def stop(self) -> None:
        self._stop.set()
        control = self.context.socket(zmq.PAIR)
        control.connect(self._control)
        control.send(b"TERMINATE")
        for thread in self._threads:
            thread.join(5)
        control.close(linger=0)
        if self.curve is not None:
            self.curve.stop()

    def _bus(self) -> None:
        xsub = self.context.socket(zmq.XSUB)
        xpub = self.context.socket(zmq.XPUB)
        control = self.context.socket(zmq.PAIR)
        for socket in (xsub, xpub, control):
            socket.setsockopt(zmq.LINGER, 0)
        xsub.setsockopt(zmq.RCVHWM, 100000)
        xpub.setsockopt(zmq.SNDHWM, 100000)
        try:
            control.bind(self._control)
            if self.curve is not None:
                self.curve.apply(xpub)
            xpub.bind(self.config.publish)
            self.publish_endpoint = xpub.getsockopt_string(zmq.LAST_ENDPOINT)
            for link in self.config.sensors:
                self._client(xsub, link)  # CURVE options apply to the next connect
                xsub.connect(link.publish)
        except zmq.ZMQError as err:
            logger.error("proxy: cannot bind %s: %s", self.config.publish, err.strerror)
            self._ready.abort()
            return
        self._ready.wait()
        try:
            zmq.proxy_steerable(xsub, xpub, None, control)
        except zmq.ContextTerminated:
            pass
        finally:
            for socket in (xsub, xpub, control):
                socket.close()

    def _broker(self) -> None:
        if self.config.catchup is None:
            self._ready.wait()
            return
        front = self.context.socket(zmq.ROUTER)
        front.setsockopt(zmq.LINGER, 0)
        dealers: dict[str, zmq.Socket[Any]] = {}
        poller = zmq.Poller()
        try:
            if self.curve is not None:
                self.curve.apply(front)
            front.bind(self.config.catchup)
            self.catchup_endpoint = front.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as err:
            logger.error("proxy: cannot bind %s: %s", self.config.catchup, err.strerror)
            front.close()
            self._ready.abort()
            return
        poller.register(front, zmq.POLLIN)
        for link in self.config.sensors:
            if link.catchup is None:
                continue
            dealer = self.context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            self._client(dealer, link)
            dealer.connect(link.catchup)
            dealers[link.sensor_id] = dealer
            poller.register(dealer, zmq.POLLIN)
        self._ready.wait()
        try:
            while not self._stop.is_set():
                for socket, _ in poller.poll(POLL_MS):
                    frames = socket.recv_multipart()
                    if socket is not front:  # a sensor's reply: envelope leads home
                        front.send_multipart(frames)
                        continue
                    envelope, payload = split_envelope(frames)
                    try:
                        sensor_id = parse_request(payload)[0]
                    except MessageError as err:
                        self.refused += 1
                        self.refusals.count(err.reason, str(err))
                        front.send_multipart(envelope + error_reply(str(err)))
                        continue
                    dealer = dealers.get(sensor_id)
                    if dealer is None:
                        self.refused += 1
                        front.send_multipart(envelope + error_reply(
                            f"no catch-up route to sensor {sensor_id!r}"))
                        continue
                    try:
                        dealer.send_multipart(frames, flags=zmq.NOBLOCK)
                        self.routed += 1
                    except zmq.Again:  # the sensor is away; its queue is full
                        self.refused += 1
                        front.send_multipart(envelope + error_reply(
                            f"sensor {sensor_id!r} is not answering"))
        finally:
            front.close()
            for dealer in dealers.values():
                dealer.close()


def describe(config: ProxyConfig) -> str:
    return json.dumps({"publish": config.publish, "catchup": config.catchup,
                       "sensors": [s.sensor_id for s in config.sensors],
                       "curve": config.secret_key is not None})


def proxy_command(config: ProxyConfig, *, stop: threading.Event) -> int:
    """`audio-monitor proxy`: run until `stop`; prints the bound endpoints as one JSON line
    first (port 0 in the config picks free ones)."""
    proxy = Proxy(config)
    proxy.start()
    logger.info("proxy running: %s", describe(config))
    print(json.dumps({"publish": proxy.publish_endpoint, "catchup": proxy.catchup_endpoint}),
          flush=True)
    try:
        stop.wait()
    finally:
        proxy.stop()
    return 0
