"""One slow peer delays nobody else: a webhook receiver that hangs, a catch-up endpoint that
never answers. Real alert daemon process, real sockets on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import zmq
from test_alert import Webhook, alert_daemon, sensor, stop


class Hang:
    """An HTTP receiver that accepts connections and never answers (until closed)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"
        self.open: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.server.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            self.open.append(conn)  # read nothing, answer nothing

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self.open:
            conn.close()
        self.server.close()


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
