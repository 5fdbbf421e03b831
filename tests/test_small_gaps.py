"""The smaller gaps of the same family: values that loaded and could never work, a port in
use, a full disk that left `status` at `running`."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_alert import ENV, alert_config
from test_daemon_e2e import daemon, recording, subscriber  # noqa: F401 (fixture)

from monitor.apps.alert.config import load_alert_config
from monitor.apps.proxy import load_proxy_config
from monitor.errors import ConfigError
from monitor.protocol.messages import Status, decode


def write(tmp: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp / name
    path.write_text(json.dumps(data))
    return path


def alert_file(tmp: Path, **changes: Any) -> Path:
    rule: dict[str, Any] = {"name": "r", "actions": [{"type": "log"}]}
    rule.update(changes.pop("rule", {}))
    return write(tmp, "alert.yaml", {"subscribe": [{"endpoint": "ipc:///tmp/x"}],
                                     "rules": [rule], **changes})


@pytest.mark.parametrize(("changes", "expected"), [
    ({"rule": {"hours": ["00:00-00:00"]}},
     "$.rules[0]: hours '00:00-00:00' is empty and can never fire"),
    ({"rule": {"hours": ["25:00-06:00"]}},
     "$.rules[0]: hours '25:00-06:00' is not a window like \"22:00-06:30\""),
    ({"workers": 0}, "$.workers: 0: expected `int` >= 1"),
    ({"rule": {"actions": [{"type": "command", "argv": ["/bin/page", "{sensor}"]}]}},
     "$.rules[0].actions[0]: argv '{sensor}': unknown placeholder {sensor}; known: rule, kind"),
    ({"rule": {"actions": [{"type": "command", "argv": ["/bin/page", "{label"]}]}},
     "$.rules[0].actions[0]: argv '{label': expected '}' before end of string"),
    ({"rule": {"min_score": float("nan")}}, "$.rules[0].min_score"),
    ({"heartbeat_timeout_s": -1}, "$.heartbeat_timeout_s: -1: expected `float` > 0.0"),
])
def test_alert_values_that_could_never_work_are_refused(tmp_path: Path,
                                                        changes: dict[str, Any],
                                                        expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_alert_config(alert_file(tmp_path, **changes))
    assert expected in str(info.value)


def test_hours_windows_that_work_still_load(tmp_path: Path) -> None:
    config = load_alert_config(alert_file(tmp_path, rule={"hours": ["22:00-06:30",
                                                                     "8:00-9:15"]}))
    assert config.rules[0].hours == ("22:00-06:30", "8:00-9:15")


@pytest.mark.parametrize(("changes", "expected"), [
    ({"allow_insecure": "false"}, "$.allow_insecure: 'false': expected `bool`, got `str`"),
    ({"alow_insecure": True}, "$.alow_insecure: unknown key; allowed keys here: publish"),
    ({"sensors": {"a": {"publish": "tcp://127.0.0.1:1", "catchup": 5}}},
     "$.sensors.a.catchup: 5: expected `str | null`, got `int`"),
])
def test_fleet_values_are_typed(tmp_path: Path, changes: dict[str, Any],
                                expected: str) -> None:
    """`allow_insecure: "false"` used to be taken as true, and unknown keys were accepted."""
    path = write(tmp_path, "fleet.yaml", {"publish": "tcp://127.0.0.1:5560", **changes})
    with pytest.raises(ConfigError) as info:
        load_proxy_config(path)
    assert expected in str(info.value)


def test_ack_port_in_use_is_one_line_exit_2(tmp_path: Path) -> None:
    """It used to end with a traceback."""
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        config = alert_config(tmp_path, "http://127.0.0.1:9/", [(f"ipc://{tmp_path}/s.pub",
                                                               None)],  # type: ignore[list-item]
                              ack_endpoint=f"tcp://127.0.0.1:{port}")
        result = subprocess.run([sys.executable, "-m", "monitor", "alert", "--config",
                                 str(config)], capture_output=True, text=True, env=ENV,
                                timeout=60)
    finally:
        taken.close()
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"audio-monitor: error: $.ack_endpoint: cannot bind 'tcp://127.0.0.1:{port}': "
        "Address already in use; is another alert daemon running?")


def test_full_disk_sets_status_degraded(tmp_path: Path, recording: Path,  # noqa: F811
                                        tiny_model: Path) -> None:
    """The journal cannot grow: `status` used to stay `running` with the event unjournaled."""
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nmodel:\n  path: {tiny_model}\n"
                      "publish:\n  status_interval_s: 0.2\n")
    endpoint = f"ipc://{tmp_path}/full.sock"
    sub = subscriber(endpoint)
    process = subprocess.Popen(
        [sys.executable, "-m", "monitor", "run", "--config", str(config), "--source",
         f"file:{recording}", "--publish", endpoint],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                              (60 * 1024, resource.RLIM_INFINITY)))
    statuses: list[Status] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sub.poll(100):
                message = decode(sub.recv_multipart())
                if isinstance(message, Status):
                    statuses.append(message)
                    if message.state == "stopped":
                        break
        assert process.wait(30) == 0, process.communicate(timeout=10)[1][-2000:]
    finally:
        sub.close()
        if process.poll() is None:
            process.kill()
    degraded = [s for s in statuses if s.state == "degraded"]
    assert degraded, [(s.state, s.last_error) for s in statuses]
    assert degraded[-1].counters["journal_errors"] >= 1
    error = degraded[-1].last_error or ""
    assert error.startswith(f"journal {tmp_path / 'state' / 'journal.db'}: ")
    assert "free disk space, or make" in error


@pytest.mark.parametrize("command", ["listen", "dashboard"])
def test_subscribers_survive_wrongly_typed_events(tmp_path: Path, command: str) -> None:
    """`"label": 123`, `"peak_score": "high"` and 200,000 nested `[` used to end `listen` and
    `dashboard --once` (and the alert daemon); now they are counted and the good one shown.
    A body without `v` used to be taken as version 1; now it is refused as `version`."""
    import zmq

    from monitor.protocol.messages import Event, encode

    context = zmq.Context()
    pub = context.socket(zmq.XPUB)
    pub.bind(f"ipc://{tmp_path}/p.sock")
    args = {"listen": ["--count", "1", "--timeout", "30"],
            "dashboard": ["--once", "--once-wait", "4"]}[command]
    process = subprocess.Popen([sys.executable, "-m", "monitor", command,
                                f"ipc://{tmp_path}/p.sock", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert pub.poll(20_000), "no subscription"
        pub.recv()
        good = Event(sensor_id="room-1", seq=1, ts=time.time(), event_id="e1", label="Cough",
                     phase="start", onset_s=0.0, offset_s=None, onset_time=time.time(),
                     offset_time=None, peak_score=0.9, threshold=0.5)
        topic, body = encode(good)
        fields = json.loads(body)
        for bad in ({**fields, "label": 123}, {**fields, "peak_score": "high"}):
            pub.send_multipart([topic, json.dumps(bad).encode()])
        pub.send_multipart([topic, b"[" * 200_000])
        no_version = {**fields, "event_id": "no-v"}  # would be shown first if accepted
        del no_version["v"]
        pub.send_multipart([topic, json.dumps(no_version).encode()])
        pub.send_multipart([topic, body])
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        pub.close()
        context.term()
    assert process.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    if command == "listen":
        assert json.loads(out)["event_id"] == "e1"
        assert "bad_messages by reason: {'schema': 3, 'version': 1}" in err
    else:
        assert "room-1" in out and "bad 4 (schema 3, version 1)" in out
