"""A fleet on one bus (50 sensor processes -> proxy -> alert daemon) and CURVE security."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq
from test_alert import ENV, SIM, Webhook, alert_config, alert_daemon, outbox_states, stop

from monitor.apps.alert.config import load_alert_config
from monitor.apps.alert.daemon import AlertDaemon
from monitor.apps.alert.outbox import Outbox
from monitor.errors import ConfigError
from monitor.outputs.publisher import Publisher
from monitor.protocol.keys import CurveServer, apply_client, write_keypair
from monitor.protocol.messages import Event, Level, encode


def test_fifty_sensors_through_one_proxy_lose_nothing(tmp_path: Path) -> None:
    sensors, per_sensor = 50, 20
    ids = [f"bed-{i:02d}" for i in range(sensors)]
    fleet: dict[str, Any] = {"publish": f"ipc://{tmp_path}/bus.pub", "catchup": f"ipc://{tmp_path}/bus.cu",
             "sensors": {s: {"publish": f"ipc://{tmp_path}/{s}.pub",
                             "catchup": f"ipc://{tmp_path}/{s}.cu"} for s in ids}}
    (tmp_path / "fleet.yaml").write_text(json.dumps(fleet))
    proxy = subprocess.Popen([sys.executable, "-m", "monitor", "proxy", "--config",
                              str(tmp_path / "fleet.yaml"), "--log-level", "WARNING"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    hook = Webhook()
    alert = alert_daemon(alert_config(tmp_path, hook.url, [(fleet["publish"],
                                                            fleet["catchup"])]))
    procs = [subprocess.Popen(
        [sys.executable, str(SIM), "--state", str(tmp_path / f"state-{s}"), "--sensor", s,
         "--publish", f"ipc://{tmp_path}/{s}.pub", "--catchup", f"ipc://{tmp_path}/{s}.cu",
         "--events", str(per_sensor), "--rate", "4", "--start-after", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for s in ids]
    try:
        hook.wait_for(sensors * per_sensor, timeout_s=120)
        time.sleep(0.5)
    finally:
        for p in procs:
            stop(p)
        errors = stop(alert)
        proxy_errors = stop(proxy)
        hook.close()
    expected = {f"{s}|r-{s}-{i}|start|cough/webhook0" for s in ids for i in range(per_sensor)}
    assert set(hook.hits) == expected, (errors + proxy_errors)[-2000:]
    assert all(v == 1 for v in hook.hits.values())
    latency_ms = np.array(hook.latency_s) * 1000
    print(f"\nfleet: {len(expected)} events from {sensors} sensor processes via proxy -> alert "
          f"-> webhook: latency p50 {np.percentile(latency_ms, 50):.1f} ms, "
          f"p99 {np.percentile(latency_ms, 99):.1f} ms, max {latency_ms.max():.1f} ms")


def test_proxy_routes_catch_up_to_the_right_sensor(tmp_path: Path) -> None:
    """Both sensors publish before anyone listens; the alert daemon gets every event by
    catch-up through the proxy's router, each from its own sensor's journal."""
    fleet: dict[str, Any] = {"publish": f"ipc://{tmp_path}/bus.pub", "catchup": f"ipc://{tmp_path}/bus.cu",
             "sensors": {s: {"publish": f"ipc://{tmp_path}/{s}.pub",
                             "catchup": f"ipc://{tmp_path}/{s}.cu"} for s in ("a", "b")}}
    (tmp_path / "fleet.yaml").write_text(json.dumps(fleet))
    procs = [subprocess.Popen(
        [sys.executable, str(SIM), "--state", str(tmp_path / f"state-{s}"), "--sensor", s,
         "--publish", f"ipc://{tmp_path}/{s}.pub", "--catchup", f"ipc://{tmp_path}/{s}.cu",
         "--events", str(n), "--rate", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for s, n in (("a", 30), ("b", 40))]
    time.sleep(1.5)
    proxy = subprocess.Popen([sys.executable, "-m", "monitor", "proxy", "--config",
                              str(tmp_path / "fleet.yaml")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    hook = Webhook()
    alert = alert_daemon(alert_config(tmp_path, hook.url, [(fleet["publish"],
                                                            fleet["catchup"])]))
    try:
        hook.wait_for(70, timeout_s=60)
    finally:
        errors = stop(alert)
        stop(proxy)
        for p in procs:
            stop(p)
        hook.close()
    assert sorted(hook.hits) == sorted(
        [f"a|r-a-{i}|start|cough/webhook0" for i in range(30)] +
        [f"b|r-b-{i}|start|cough/webhook0" for i in range(40)]), errors[-2000:]
    assert outbox_states(tmp_path / "alert.db") == {"delivered": 70}


def keyring(tmp: Path) -> dict[str, Path]:
    for name in ("server", "good", "bad"):
        write_keypair(tmp / "keys", name)
    allowed = tmp / "allowed"
    allowed.mkdir()
    (allowed / "good.key").write_bytes((tmp / "keys" / "good.key").read_bytes())
    return {n: tmp / "keys" / n for n in ("server", "good", "bad")} | {"allowed": allowed}


def test_keys_command_writes_private_loadable_files(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "monitor", "keys", "s1", "--dir",
                             str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    for suffix in (".key", ".key_secret"):
        assert stat.S_IMODE((tmp_path / f"s1{suffix}").stat().st_mode) == 0o600
    public, secret = zmq.auth.load_certificate(str(tmp_path / "s1.key_secret"))
    assert secret is not None and zmq.curve_public(secret) == public
    again = subprocess.run([sys.executable, "-m", "monitor", "keys", "s1", "--dir",
                            str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr


def test_curve_only_allowed_clients_receive(tmp_path: Path) -> None:
    keys = keyring(tmp_path)
    context = zmq.Context()
    curve = CurveServer(context, secret_key=keys["server"].with_suffix(".key_secret"),
                        allowed_clients=keys["allowed"], where="publish.curve")
    publisher = Publisher("tcp://127.0.0.1:*", sensor_id="s1", send_hwm=1000, context=context,
                          curve=curve)
    subs = {}
    try:
        for name in ("good", "bad", "plain"):
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            if name != "plain":
                apply_client(sub, secret_key=keys[name].with_suffix(".key_secret"),
                             server_key=keys["server"].with_suffix(".key"), where=name)
            sub.connect(publisher.bound_endpoint)
            subs[name] = sub
        got = {name: 0 for name in subs}
        deadline = time.monotonic() + 10
        while got["good"] < 50 and time.monotonic() < deadline:
            publisher.publish(Level, t_audio_s=0.0, rms_dbfs=-20.0, peak_dbfs=-3.0, mel=[0.0])
            time.sleep(0.01)
            for name, sub in subs.items():
                while sub.poll(0):
                    sub.recv_multipart()
                    got[name] += 1
        assert got["good"] >= 50
        assert got["bad"] == 0 and got["plain"] == 0
    finally:
        for sub in subs.values():
            sub.close()
        publisher.close()
        curve.stop()
        context.term()


def test_no_clear_text_off_loopback() -> None:
    with pytest.raises(ConfigError, match=r"publish.endpoint: 'tcp://0.0.0.0:\*' is not "
                                          "loopback and CURVE is off"):
        Publisher("tcp://0.0.0.0:*", sensor_id="s1", send_hwm=10)
    publisher = Publisher("tcp://0.0.0.0:*", sensor_id="s1", send_hwm=10, allow_insecure=True)
    publisher.close()


def raw_publisher(context: zmq.Context[Any], tmp_path: Path) -> tuple[zmq.Socket[Any], str]:
    """An XPUB socket sending whatever frames a test writes (no Publisher checks)."""
    pub = context.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/raw.pub"
    pub.bind(endpoint)
    return pub, endpoint


def test_tampered_messages_are_dropped_and_counted(tmp_path: Path) -> None:
    """CURVE authenticates every frame, so a frame altered on the wire is rejected inside
    ZeroMQ and never reaches us. What can reach us is a malformed or inconsistent message
    from an allowed peer: the alert daemon validates each with `decode` and counts it."""
    context = zmq.Context()
    pub, endpoint = raw_publisher(context, tmp_path)
    path = tmp_path / "alert.yaml"
    path.write_text(json.dumps({"subscribe": [{"endpoint": endpoint}],
                                "state": str(tmp_path / "alert.db"),
                                "rules": [{"name": "all", "actions": [{"type": "log"}]}]}))
    daemon = AlertDaemon(load_alert_config(path), context=context)
    halt, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=daemon.run, args=(halt,), kwargs={"ready": ready})
    thread.start()
    try:
        assert ready.wait(10) and pub.poll(5000)  # the daemon's subscription arrived
        good = encode(_event(seq=1))
        body = json.loads(good[1])
        forged_topic = [b"event.glass", good[1]]
        truncated = [good[0], good[1][:-7]]
        extra = [good[0], json.dumps({**body, "seq": 3, "injected": 1}).encode()]
        for frames in (forged_topic, truncated, extra, good):
            pub.send_multipart(frames)
        deadline = time.monotonic() + 10
        while daemon.counters["events"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        halt.set()
        thread.join(10)
        pub.close()
        context.term()
    assert daemon.counters["bad_messages"] == 3
    assert daemon.counters["events"] == 1
    outbox = Outbox(tmp_path / "alert.db")
    assert [r["state"] for r in outbox.rows()] == ["delivered"]
    outbox.close()


def _event(*, seq: int) -> Event:
    return Event(sensor_id="s1", seq=seq, ts=time.time(), event_id="e1", label="Cough",
                 phase="start", onset_s=0.0, offset_s=None, onset_time=time.time(),
                 offset_time=None, peak_score=0.9, threshold=0.5)


def test_ack_cancels_escalation_and_unacked_escalates(tmp_path: Path) -> None:
    from monitor.apps.alert.ack import send_ack

    context = zmq.Context()
    pub, endpoint = raw_publisher(context, tmp_path)
    path = tmp_path / "alert.yaml"
    path.write_text(json.dumps({
        "subscribe": [{"endpoint": endpoint}], "state": str(tmp_path / "alert.db"),
        "ack_endpoint": f"ipc://{tmp_path}/ack.sock",
        "rules": [{"name": "r", "actions": [{"type": "log"}],
                   "escalate": {"after_s": 1.0, "actions": [{"type": "log"}]}}]}))
    daemon = AlertDaemon(load_alert_config(path), context=context)
    halt, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=daemon.run, args=(halt,), kwargs={"ready": ready})
    thread.start()
    try:
        assert ready.wait(10) and pub.poll(5000)
        for seq, event_id in ((1, "e1"), (2, "e2")):
            event = msgspec.structs.replace(_event(seq=seq), event_id=event_id)
            pub.send_multipart(encode(event))
        deadline = time.monotonic() + 10
        while daemon.counters["events"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert send_ack(f"ipc://{tmp_path}/ack.sock", "e1", by="nurse") == \
            {"ok": True, "cancelled": 1}
        time.sleep(2.0)  # past after_s
    finally:
        halt.set()
        thread.join(10)
        pub.close()
        context.term()
    outbox = Outbox(tmp_path / "alert.db")
    states = {r["key"]: r["state"] for r in outbox.rows()}
    outbox.close()
    assert states == {"s1|e1|start|r/log0": "delivered", "s1|e2|start|r/log0": "delivered",
                      "s1|e1|start|r/escalate/log0": "cancelled",
                      "s1|e2|start|r/escalate/log0": "delivered"}
