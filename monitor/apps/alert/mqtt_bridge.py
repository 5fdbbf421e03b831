"""The alert daemon's MQTT subscriber: a broker read like a ZeroMQ source."""

from __future__ import annotations

import logging
import threading
from typing import Any

import zmq

from monitor.config import MqttConfig
from monitor.outputs.mqtt import make_client, refused, wire_topic

logger = logging.getLogger(__name__)


class MqttBridge:
    """Subscribes to sensors' events and status on a broker (a persistent session at
    QoS 1, so the broker keeps what arrives while this process is away) and passes each
    on as ZeroMQ frames ``[topic, json]`` on an inproc endpoint: the alert daemon reads a
    broker like any ZeroMQ source, decoder and de-duplication included.

    Threads: the XPUB socket is created here and, after `start`, used only by paho's
    network thread until `stop` has joined it.
    """

    def __init__(self, settings: MqttConfig, *, endpoint: str, context: zmq.Context[Any],
                 client_id: str) -> None:
        self.prefix = settings.topic_prefix.strip("/")
        self.settings = settings
        self._pub = context.socket(zmq.XPUB)  # hears the subscriber: `start` waits for it
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 100000)
        self._pub.bind(endpoint)
        self.client = make_client(settings, client_id, clean_session=False)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        """Set once the broker has accepted the subscriptions (the first time)."""
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.received = 0
        self.dropped = 0

    def start(self, *, wait_subscriber_s: float = 5.0) -> None:
        """Connect once the ZeroMQ subscriber is listening (nothing queued is lost to it)."""
        if self._pub.poll(int(wait_subscriber_s * 1000)):
            while self._pub.poll(0):
                self._pub.recv()
        self.client.connect_async(self.settings.host, self.settings.port,
                                  keepalive=self.settings.keepalive_s)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._pub.close()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if refused(self.settings, reason):
            return
        client.subscribe([(f"{self.prefix}/+/event/#", 1), (f"{self.prefix}/+/status", 1)])

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.received += 1
        parts = message.topic[len(self.prefix) + 1:].split("/", 1)
        if len(parts) != 2:
            self.dropped += 1
            return
        try:
            self._pub.send_multipart([wire_topic(parts[1]).encode("ascii", "replace"),
                                      bytes(message.payload)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self.dropped += 1
