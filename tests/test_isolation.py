"""One slow peer delays nobody else: a webhook receiver that hangs, a catch-up endpoint that
never answers. Real alert daemon process, real sockets on loopback."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from test_alert import Webhook, alert_daemon, sensor, stop


class _Receiver:
    """A TCP server on loopback whose accepted connections go to `_take` (one thread)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"
        self._stop = threading.Event()
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        self.server.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            self._take(conn)

    def _take(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._accepter.join(5)
        self.server.close()


class Hang(_Receiver):
    """An HTTP receiver that accepts connections and never answers (until closed)."""

    def __init__(self) -> None:
        self.open: list[socket.socket] = []
        super().__init__()

    def _take(self, conn: socket.socket) -> None:
        self.open.append(conn)  # read nothing, answer nothing

    def close(self) -> None:
        super().close()
        for conn in self.open:
            conn.close()


def write_config(tmp: Path, sources: list[dict[str, Any]], actions: list[dict[str, Any]]) -> Path:
    path = tmp / "alert.yaml"
    path.write_text(json.dumps({
        "subscribe": sources, "state": str(tmp / "alert.db"), "workers": 2,
        "rules": [{"name": "cough", "classes": ["Cough"], "actions": actions}]}))
    return path


def test_a_hanging_webhook_does_not_delay_a_healthy_one(tmp_path: Path) -> None:
    """Before: one pool for every destination; 40 alerts to a receiver that hangs held
    every worker, and a healthy receiver got 16 of 40 after 25 s."""
    hang, healthy = Hang(), Webhook()
    config = write_config(
        tmp_path, [{"endpoint": f"ipc://{tmp_path}/s1.pub", "catchup": f"ipc://{tmp_path}/s1.cu"}],
        [{"type": "webhook", "name": "stuck", "url": hang.url, "timeout_s": 60},
         {"type": "webhook", "name": "fine", "url": healthy.url, "timeout_s": 60}])
    alert = alert_daemon(config)
    source = sensor(tmp_path, "s1", events=40, rate=20.0)
    try:
        healthy.wait_for(40, timeout_s=30)
        # Every alert reached the healthy receiver while the stuck one still holds its
        # first requests unanswered (its 60 s timeout has not run out once).
        assert healthy.distinct() == 40
        assert len(hang.open) >= 2
        assert max(healthy.latency_s) < 30
    finally:
        errors = stop(alert)
        stop(source)
        hang.close()
        healthy.close()
    assert "Traceback" not in errors, errors[-2000:]


def test_a_mute_catch_up_endpoint_does_not_delay_live_alerts(tmp_path: Path) -> None:
    """Before: catch-up ran in the main loop, so each heartbeat of a sensor whose catch-up
    endpoint does not answer stalled everyone's alerts for the 2 s request timeout."""
    context = zmq.Context()
    mute = context.socket(zmq.ROUTER)  # takes catch-up requests, never answers
    mute.bind(f"ipc://{tmp_path}/mute.cu")
    pub = context.socket(zmq.PUB)
    pub.bind(f"ipc://{tmp_path}/mute.pub")
    requests = 0
    hook = Webhook()
    config = write_config(
        tmp_path,
        [{"endpoint": f"ipc://{tmp_path}/s1.pub", "catchup": f"ipc://{tmp_path}/s1.cu"},
         {"endpoint": f"ipc://{tmp_path}/mute.pub", "catchup": f"ipc://{tmp_path}/mute.cu"}],
        [{"type": "webhook", "url": hook.url}])
    alert = alert_daemon(config)
    source = sensor(tmp_path, "s1", events=120, rate=20.0, start_after=1.0)
    from monitor.protocol.messages import Status, encode

    try:
        seq = 0
        deadline = time.monotonic() + 30
        while hook.distinct() < 120 and time.monotonic() < deadline:
            seq += 1  # a heartbeat of the mute sensor every 0.1 s: each asks for catch-up
            pub.send_multipart(encode(Status(
                sensor_id="mute", seq=seq, ts=time.time(), state="running", source="x",
                uptime_s=1.0, t_audio_s=1.0, counters={}, inference_ms_p50=0.0,
                inference_ms_max=0.0, dc_offset=0.0, last_error=None)))
            while mute.poll(0):
                mute.recv_multipart()
                requests += 1
            time.sleep(0.1)
    finally:
        errors = stop(alert)
        stop(source)
        hook.close()
        mute.close()
        pub.close()
        context.term()
    assert hook.distinct() == 120, errors[-2000:]
    assert requests >= 2, "the mute endpoint was never asked: nothing tested"
    # 120 events at 20/s while catch-up requests (one every ~4 s: 2 s timeout, 2 s pause)
    # went unanswered: each one's alert came well inside the 2 s that one blocked request
    # used to cost everyone.
    assert max(hook.latency_s) < 1.5, sorted(hook.latency_s)[-5:]


class Trickle(_Receiver):
    """An HTTP receiver that, for its first `stuck` connections, reads the request and then
    answers one byte every 0.2 s, forever: each read is well inside any socket timeout, so
    only a deadline on the whole exchange ends it. Later connections get 200 at once."""

    def __init__(self, *, stuck: int) -> None:
        self.stuck = stuck
        self.connections = 0
        self.answered: list[str] = []
        self._threads: list[threading.Thread] = []
        super().__init__()

    def _take(self, conn: socket.socket) -> None:
        self.connections += 1
        thread = threading.Thread(target=self._serve,
                                  args=(conn, self.connections <= self.stuck), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _serve(self, conn: socket.socket, stuck: bool) -> None:
        with conn:
            conn.settimeout(5)
            request = b""
            try:
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(body) < length:
                    body += conn.recv(65536)
                if stuck:
                    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"." * 100_000:
                        if self._stop.wait(0.2):
                            return
                        conn.sendall(bytes([byte]))
                key = next(line.split(b":", 1)[1].strip().decode()
                           for line in head.split(b"\r\n")
                           if line.lower().startswith(b"idempotency-key"))
                self.answered.append(key)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                return

    def close(self) -> None:
        super().close()
        for thread in self._threads:
            thread.join(5)


def test_a_webhook_that_never_finishes_answering_is_abandoned_at_its_deadline(
        tmp_path: Path) -> None:
    """Before: `timeout_s` bounded each socket read, so a receiver that trickles its answer
    held its worker for good: with 1 worker (2 in flight) no alert got through. Now the
    exchange is abandoned at `timeout_s`, counted as a timeout and retried by the backoff
    rules; the receiver, answering again, gets each alert once."""
    trickle = Trickle(stuck=2)
    config = write_config(
        tmp_path, [{"endpoint": f"ipc://{tmp_path}/s1.pub", "catchup": f"ipc://{tmp_path}/s1.cu"}],
        [{"type": "webhook", "name": "slow", "url": trickle.url, "timeout_s": 1,
          "backoff_s": 0.1, "max_backoff_s": 0.2}])
    config.write_text(config.read_text().replace('"workers": 2', '"workers": 1'))
    alert = alert_daemon(config)
    source = sensor(tmp_path, "s1", events=3, rate=20.0)
    try:
        deadline = time.monotonic() + 30
        while len(set(trickle.answered)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        errors = stop(alert)
        stop(source)
        trickle.close()
    assert len(set(trickle.answered)) == 3, (trickle.connections, errors[-2000:])
    assert trickle.connections >= 5  # 2 abandoned, then 3 answered
    assert "failed (no answer within timeout_s 1 s: abandoned); retry in" in errors
    assert "Traceback" not in errors, errors[-2000:]


def test_a_command_that_never_exits_is_killed_with_what_it_started(tmp_path: Path) -> None:
    """The command and its child (its process group) are killed at `timeout_s`; before, the
    child of a killed command lived on."""
    from monitor.apps.alert.config import Action
    from monitor.apps.alert.dispatch import run_command

    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! >> {pids}; wait"
    action = Action(type="command", argv=("/bin/sh", "-c", script), timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(Exception) as raised:  # its kind and message are checked below
        run_command(action, {"rule": "r"}, "k")
    assert time.monotonic() - started < 3
    child = int(pids.read_text())
    for _ in range(100):  # killed; reaped by init once its parent is gone
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.02)
    else:
        os.kill(child, 9)
        raise AssertionError(f"the command's child {child} outlived it")
    assert type(raised.value).__name__ == "DeadlineExceeded"
    assert str(raised.value) == "did not exit within timeout_s 0.5 s: killed"
