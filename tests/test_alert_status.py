"""The alert daemon's status surface: systemd STATUS= lines and `audio-monitor alert-status`
(its ack endpoint), over real processes: a real alert daemon, a simulated sensor, a healthy
and a hanging webhook receiver, a publisher of bad messages and a stand-in for systemd."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zmq
from test_alert import ENV, Webhook, sensor, stop
from test_isolation import Hang
from test_production import NotifySocket

from monitor.apps.alert.ack import ask_status
from monitor.protocol.messages import Event, encode


def test_status_names_state_destinations_and_bad_messages(tmp_path: Path) -> None:
    """Before: state, last_error and the counters were only in the log at stop."""
    systemd = NotifySocket(str(tmp_path / "notify"))
    fine, hang = Webhook(), Hang()
    ack = f"ipc://{tmp_path}/ack.sock"
    context = zmq.Context()
    evil = context.socket(zmq.XPUB)
    evil.bind(f"ipc://{tmp_path}/evil.pub")
    config = tmp_path / "alert.yaml"
    config.write_text(json.dumps({
        "subscribe": [{"endpoint": f"ipc://{tmp_path}/s1.pub",
                       "catchup": f"ipc://{tmp_path}/s1.cu"},
                      {"endpoint": f"ipc://{tmp_path}/evil.pub"}],
        "state": str(tmp_path / "alert.db"), "ack_endpoint": ack, "workers": 1,
        "rules": [{"name": "cough", "classes": ["Cough"], "actions": [
            {"type": "webhook", "name": "fine", "url": fine.url},
            {"type": "webhook", "name": "stuck", "url": hang.url, "timeout_s": 0.5,
             "backoff_s": 0.2, "max_backoff_s": 0.5}]}]}))
    alert = subprocess.Popen(
        [sys.executable, "-m", "monitor", "alert", "--config", str(config), "--log-level",
         "WARNING"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**ENV, "NOTIFY_SOCKET": systemd.address})
    source = None
    try:
        ready = systemd.wait_for("READY", "1", timeout=30)
        assert ready["STATUS"] == ("running; 0 sensor(s), 0 offline; delivered 0, failed 0 "
                                   "(0 timeouts), pending 0; bad_messages 0")
        source = sensor(tmp_path, "s1", events=5, rate=20.0)
        assert evil.poll(10_000), "the alert daemon never subscribed"
        evil.recv()
        topic, body = encode(Event(
            sensor_id="evil", seq=1, ts=time.time(), event_id="e1", label="Cough",
            phase="start", onset_s=0.0, offset_s=None, onset_time=time.time(),
            offset_time=None, peak_score=0.9, threshold=0.5))
        no_version = {**json.loads(body)}
        del no_version["v"]
        evil.send_multipart([topic, json.dumps(no_version).encode()])
        evil.send_multipart([topic, json.dumps({**json.loads(body), "label": 123}).encode()])
        fine.wait_for(5, timeout_s=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = ask_status(ack)
            if status["destinations"]["cough/stuck"]["timeouts"] >= 2:
                break
            time.sleep(0.2)
        cli = subprocess.run([sys.executable, "-m", "monitor", "alert-status", "--config",
                              str(config)], capture_output=True, text=True, timeout=60, env=ENV)
        assert cli.returncode == 0, cli.stderr[-2000:]
        status = json.loads(cli.stdout)
        line = systemd.wait_for("STATUS", "delivered 5,", timeout=10)["STATUS"]
        assert alert.poll() is None
    finally:
        errors = stop(alert)
        if source is not None:
            stop(source)
        fine.close()
        hang.close()
        evil.close()
        context.term()
    assert status["ok"] is True and status["state"] == "running"
    assert status["last_error"] is None
    assert status["bad_messages"] == {"version": 1, "schema": 1}
    assert status["counters"]["bad_messages"] == 2
    assert status["counters"]["delivered"] == 5
    assert status["destinations"]["cough/fine"] == {
        "delivered": 5, "failed": 0, "timeouts": 0, "expired": 0, "in_flight": 0, "pending": 0}
    stuck = status["destinations"]["cough/stuck"]
    assert stuck["delivered"] == 0 and stuck["pending"] == 5
    assert stuck["failed"] >= stuck["timeouts"] >= 2
    assert 1 <= stuck["in_flight"] <= 2  # 1 worker, 2 in flight at most
    assert list(status["sensors"]) == ["s1"]
    assert status["sensors"]["s1"]["offline"] is False
    assert line.startswith("running; 1 sensor(s), 0 offline; delivered 5, failed ")
    assert line.endswith("pending 5; bad_messages 2")
    stopping = systemd.wait_for("STOPPING", "1", timeout=10)
    systemd.close()
    assert stopping["STATUS"].startswith("stopping; running; 1 sensor(s)")
    assert "Traceback" not in errors, errors[-2000:]


def test_alert_status_without_an_endpoint_is_one_line_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "alert.yaml"
    config.write_text(json.dumps({"subscribe": [{"endpoint": "ipc:///tmp/x"}]}))
    result = subprocess.run([sys.executable, "-m", "monitor", "alert-status", "--config",
                             str(config)], capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "sets no ack_endpoint; set one (the status is asked there) or pass --endpoint")


def wait_state(endpoint: str, state: str, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = ask_status(endpoint)
        if status["state"] == state:
            return status
        time.sleep(0.2)
    raise AssertionError(f"never {state}: {status}")
