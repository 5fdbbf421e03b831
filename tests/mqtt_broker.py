"""A real Mosquitto broker on a free loopback port, and a real paho subscriber, for tests."""

from __future__ import annotations

import os
import pwd
import queue
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Broker:
    """`mosquitto` with persistence in `folder`: sessions and queued QoS 1 messages of
    persistent subscribers survive `stop()` + `start()`, as on a real site."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.config = folder / "mosquitto.conf"
        self.log = folder / "mosquitto.log"
        folder.mkdir(parents=True, exist_ok=True)
        # Started as root, mosquitto would switch to user `mosquitto`, which cannot write
        # its persistence file here: it keeps the user that starts it.
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                               f"persistence true\npersistence_location {folder}/\n"
                               f"log_dest file {self.log}\n"
                               f"user {pwd.getpwuid(os.getuid()).pw_name}\n")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.process.stderr.read().decode()}"
                                   if self.process.stderr else "mosquitto exited")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port} in {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
            assert (self.folder / "mosquitto.db").is_file(), "mosquitto saved no sessions"
        self.process = None


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Subscriber:
    """A paho client that records every message; persistent (clean_session False) if
    `client_id` is given, so the broker queues QoS 1 messages while it is away."""

    def __init__(self, port: int, topics: list[str], *, client_id: str = "") -> None:
        self.messages: queue.Queue[Received] = queue.Queue()
        self.subscribed = queue.Queue[int]()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=not client_id)
        self.client.reconnect_delay_set(1, 1)
        self.topics = topics
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, m: self.messages.put(
            Received(m.topic, m.payload, m.qos, bool(m.retain)))
        self.client.on_subscribe = lambda *_: self.subscribed.put(1)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        self.subscribed.get(timeout=10)

    def _on_connect(self, client: Any, *_: Any) -> None:
        client.subscribe([(topic, 1) for topic in self.topics])

    def subscribe(self, topics: list[str]) -> None:
        self.topics = [*self.topics, *topics]
        self.client.subscribe([(topic, 1) for topic in topics])
        self.subscribed.get(timeout=10)

    def until(self, done: Any, *, timeout_s: float = 30.0) -> list[Received]:
        """Messages received until `done(messages)` is true; AssertionError on timeout."""
        got: list[Received] = []
        deadline = time.monotonic() + timeout_s
        while not done(got):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; got {[(m.topic, m.payload[:80]) for m in got]}")
            try:
                got.append(self.messages.get(timeout=min(left, 0.2)))
            except queue.Empty:
                continue
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
