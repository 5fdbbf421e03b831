"""MQTT output against a real Mosquitto broker and the real daemon process.

Events at QoS 1 with their journal seq, retained status and availability, the last will,
events of a broker outage delivered after it returns, events of a run the broker never
saw sent at the next start, and Home Assistant's view through MQTT discovery.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from mqtt_broker import Broker, Received, Subscriber

from monitor.config import load_config
from monitor.errors import ConfigError
from monitor.outputs.journal import JournalReader
from monitor.outputs.mqtt import MqttOutput, wire_topic
from monitor.protocol.messages import Event, Level, Status, decode

RATE = 16000
SENSOR = "test-room"
BASE = f"audio-monitor/{SENSOR}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path / "broker")
    broker.start()
    yield broker
    broker.stop()


def write_config(tmp_path: Path, model: Path, port: int, **mqtt: Any) -> Path:
    settings = {"enabled": True, "port": port, "level_hz": 2, "reconnect_max_s": 1, **mqtt}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({
        "sensor_id": SENSOR, "state_dir": str(tmp_path / "state"),
        "model": {"path": str(model), "stride_ms": 50, "top_k": 2},
        "publish": {"endpoint": f"ipc://{tmp_path}/pub.sock", "status_interval_s": 0.5},
        "mqtt": settings}))
    return path


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal(round(seconds * RATE))).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), dtype=np.float32)


def loud_file(tmp_path: Path, bursts: int) -> Path:
    """`bursts` seconds of noise, each between 1 s of silence: one `loud` event each."""
    pieces = [silence(1.0)]
    for i in range(bursts):
        pieces += [noise(1.0, i), silence(2.0)]
    path = tmp_path / f"loud{bursts}.wav"
    sf.write(str(path), np.concatenate(pieces), RATE, subtype="FLOAT")
    return path


def pcm(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def run_file(config: Path, audio: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "monitor", "run", "--config", str(config),
                             "--source", f"file:{audio}", "--fast"],
                            capture_output=True, timeout=120, env=dict(os.environ))
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]


def stdin_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config", str(config),
                             "--source", "stdin", "--rate", str(RATE)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=log.open("wb"), env=dict(os.environ))


def as_message(received: Received) -> Any:
    """Decode an MQTT payload with the ZeroMQ wire contract's decoder."""
    return decode([wire_topic(received.topic.removeprefix(f"{BASE}/")).encode(),
                   received.payload])


def events_in(got: list[Received]) -> list[Event]:
    return [as_message(m) for m in got if m.topic.startswith(f"{BASE}/event/")]


def count_phase(phase: str, n: int) -> Any:
    """Until `n` distinct events (by seq: QoS 1 may repeat one) of `phase` arrived."""
    return lambda got: len({e.seq for e in events_in(got) if e.phase == phase}) >= n


def test_events_status_and_availability_on_a_real_broker(broker: Broker, tmp_path: Path,
                                                         tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, broker.port)
    subscriber = Subscriber(broker.port, [f"{BASE}/#"])
    run_file(config, loud_file(tmp_path, 2))
    got = subscriber.until(lambda got: any(m.topic == f"{BASE}/availability" and
                                           m.payload == b"offline" for m in got))
    subscriber.close()

    event_messages = [m for m in got if m.topic.startswith(f"{BASE}/event/")]
    assert {(m.topic, m.qos, m.retain) for m in event_messages} == \
        {(f"{BASE}/event/loud", 1, False)}
    events = events_in(got)
    assert [(e.label, e.phase) for e in events] == [("loud", "start"), ("loud", "end")] * 2
    assert events[0].event_id == events[1].event_id != events[2].event_id
    # The seq on MQTT is the journal's: a consumer de-duplicates by (sensor_id, seq).
    reader = JournalReader(tmp_path / "state" / "journal.db")
    journaled = [decode(list(pair)) for pair in reader.since(SENSOR, 0, limit=100)]
    reader.close()
    assert [(e.seq, e.event_id, e.phase) for e in events] == \
        [(e.seq, e.event_id, e.phase) for e in journaled if isinstance(e, Event)]
    levels = [as_message(m) for m in got if m.topic == f"{BASE}/level"]
    assert all(isinstance(level, Level) for level in levels) and len(levels) >= 8
    assert np.allclose(np.diff([level.t_audio_s for level in levels]), 0.5)  # level_hz: 2
    assert [m.payload for m in got if m.topic == f"{BASE}/availability"] == \
        [b"online", b"offline"]
    statuses = [as_message(m) for m in got if m.topic == f"{BASE}/status"]
    assert statuses[-1].state == "stopped" and statuses[-1].counters["events"] == 2
    # Every event was acknowledged before exit, and the cursor on disk says so.
    with sqlite3.connect(tmp_path / "state" / "mqtt.db") as db:
        assert db.execute("SELECT seq FROM delivered").fetchall() == [(events[-1].seq,)]

    # A client that connects later gets the retained state, and no stale event.
    late = Subscriber(broker.port, [f"{BASE}/#"])
    retained = late.until(lambda got: len(got) >= 2, timeout_s=10)
    time.sleep(0.3)
    while not late.messages.empty():
        retained.append(late.messages.get())
    late.close()
    assert {m.topic: (m.retain, m.payload[:40]) for m in retained} == {
        f"{BASE}/availability": (True, b"offline"),
        f"{BASE}/status": (True, [m for m in got if m.topic == f"{BASE}/status"][-1]
                           .payload[:40])}


def test_events_during_a_broker_outage_are_delivered_when_it_returns(
        broker: Broker, tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, broker.port)
    # A plant system's persistent session: the broker keeps what arrives while it is away.
    subscriber = Subscriber(broker.port, [f"{BASE}/event/#"], client_id="historian")
    daemon = stdin_daemon(config, tmp_path / "daemon.log")
    assert daemon.stdin is not None
    try:
        daemon.stdin.write(pcm(np.concatenate([silence(1.0), noise(1.0), silence(2.0)])))
        daemon.stdin.flush()
        before = events_in(subscriber.until(count_phase("end", 1)))
        broker.stop()
        daemon.stdin.write(pcm(np.concatenate([noise(1.0, 1), silence(2.0)])))
        daemon.stdin.flush()
        # The daemon found the second event while the broker was down (its journal has it).
        deadline = time.monotonic() + 30
        while len(journaled_events(tmp_path)) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [e.phase for e in journaled_events(tmp_path)] == ["start", "end"] * 2
        time.sleep(1.5)  # the daemon tries to reconnect and fails at least once
        broker.start()
        # At least once: the broker may first repeat what was in flight when it stopped.
        seen = {e.event_id for e in before}
        after = events_in(subscriber.until(lambda got: any(
            e.phase == "end" and e.event_id not in seen for e in events_in(got))))
        daemon.stdin.close()
        assert daemon.wait(60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        subscriber.close()
    delivered = {(e.seq, e.event_id, e.phase) for e in before + after}
    assert delivered == {(e.seq, e.event_id, e.phase) for e in journaled_events(tmp_path)}
    assert [e.phase for e in after if e.event_id not in seen] == ["start", "end"]
    assert "lost 127.0.0.1" in (tmp_path / "daemon.log").read_text()


def journaled_events(tmp_path: Path) -> list[Event]:
    path = tmp_path / "state" / "journal.db"
    if not path.exists():
        return []
    reader = JournalReader(path)
    try:
        return [m for m in (decode(list(p)) for p in reader.since(SENSOR, 0, limit=100))
                if isinstance(m, Event)]
    finally:
        reader.close()


def test_events_of_a_run_the_broker_never_saw_are_sent_at_the_next_start(
        broker: Broker, tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, broker.port)
    subscriber = Subscriber(broker.port, [f"{BASE}/event/#"], client_id="historian")
    run_file(config, loud_file(tmp_path, 0))  # first run: the MQTT cursor starts here
    broker.stop()
    run_file(config, loud_file(tmp_path, 2))  # the broker is down the whole run
    missed = journaled_events(tmp_path)
    assert len(missed) == 4
    broker.start()
    run_file(config, loud_file(tmp_path, 0))  # a quiet run: nothing new, the backlog goes
    got = events_in(subscriber.until(count_phase("end", 2)))
    subscriber.close()
    got = list({e.seq: e for e in got}.values())  # at least once: repeats share the seq
    assert [(e.seq, e.event_id, e.phase) for e in got] == \
        [(e.seq, e.event_id, e.phase) for e in missed]
    # Acknowledged now: a further start sends nothing again.
    again = Subscriber(broker.port, [f"{BASE}/event/#"])
    run_file(config, loud_file(tmp_path, 0))
    time.sleep(0.5)
    assert again.messages.empty()
    again.close()


def render(template: str, payload: bytes) -> str:
    """Home Assistant's value_template, for the one form discovery uses here."""
    field = template.removeprefix("{{ value_json.").removesuffix(" }}")
    assert template == f"{{{{ value_json.{field} }}}}", template
    return str(json.loads(payload)[field])


def test_home_assistant_discovery_drives_a_view(broker: Broker, tmp_path: Path,
                                                tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, broker.port)
    daemon = stdin_daemon(config, tmp_path / "daemon.log")
    assert daemon.stdin is not None
    probe = Subscriber(broker.port, [f"{BASE}/availability"])
    probe.until(lambda got: [m.payload for m in got] == [b"online"])
    probe.close()
    # Home Assistant starts later: retained config topics first, then the state topics.
    home = Subscriber(broker.port, ["homeassistant/#"])
    try:
        configs = home.until(lambda got: len(got) >= 4)
        assert all(m.retain and m.qos == 1 for m in configs)
        entities = {m.topic: json.loads(m.payload) for m in configs}
        node = "audio-monitor_test-room"
        assert set(entities) == {f"homeassistant/binary_sensor/{node}/loud/config",
                                 f"homeassistant/sensor/{node}/level/config",
                                 f"homeassistant/sensor/{node}/state/config",
                                 f"homeassistant/sensor/{node}/inference/config"}
        assert {json.dumps(e["device"]) for e in entities.values()} == \
            {json.dumps({"identifiers": [node], "name": "audio-monitor test-room",
                         "manufacturer": "audio-monitor", "model": "tiny"})}
        assert len({e["unique_id"] for e in entities.values()}) == 4
        by_topic: dict[str, list[dict[str, Any]]] = {}
        for entity in entities.values():
            by_topic.setdefault(entity["state_topic"], []).append(entity)
        availability = {e["availability_topic"] for e in entities.values()}
        home.subscribe(sorted(by_topic) + sorted(availability))
        daemon.stdin.write(pcm(np.concatenate([silence(1.0), noise(1.0), silence(2.0)])))
        daemon.stdin.flush()
        fall = entities[f"homeassistant/binary_sensor/{node}/loud/config"]
        view: dict[str, list[str]] = {}
        states = home.until(lambda got: view_of(got, by_topic, view).get("loud", [])[-1:] ==
                            ["OFF"])
        view_of(states, by_topic, view)
        assert view["loud"] == ["ON", "OFF"]  # fall["payload_on"] / ["payload_off"]
        assert fall["device_class"] == "sound"
        assert min(map(float, view["Level"])) == -120.0 and max(map(float, view["Level"])) > -20
        # Between writes to its stdin the daemon sees no audio: `degraded` until more comes.
        assert "running" in view["State"] and set(view["State"]) <= {"running", "degraded"}
        assert [m.payload for m in states if m.topic in availability][:1] == [b"online"]
        # The process dies without a word: the broker publishes its last will.
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        gone = home.until(lambda got: any(m.topic in availability for m in got))
        assert [m.payload for m in gone if m.topic in availability] == [b"offline"]
    finally:
        if daemon.poll() is None:
            daemon.kill()
        home.close()


def view_of(got: list[Received], by_topic: dict[str, list[dict[str, Any]]],
            view: dict[str, list[str]]) -> dict[str, list[str]]:
    """Entity name -> states shown, as Home Assistant derives them from state topics."""
    view.clear()
    for message in got:
        for entity in by_topic.get(message.topic, []):
            value = render(entity["value_template"], message.payload)
            if "payload_on" in entity:
                value = {entity["payload_on"]: "ON", entity["payload_off"]: "OFF"}[value]
            view.setdefault(entity["name"], []).append(value)
    return view


def test_unreadable_credentials_fail_at_start_naming_the_key(tmp_path: Path) -> None:
    config = load_config(None, overrides={"mqtt.enabled": True,
                                          "mqtt.password_file": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"mqtt\.password_file: cannot read"):
        MqttOutput(config.mqtt, sensor_id=SENSOR, state_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^\$\.mqtt\.port: 0: expected `int` >= 1$"):
        load_config(None, overrides={"mqtt.port": 0})
    with pytest.raises(ConfigError, match=r"^\$\.mqtt\.topic_prefix: 'a/#': expected an MQTT "
                                          r"topic prefix: not empty, without # or \+$"):
        load_config(None, overrides={"mqtt.topic_prefix": "a/#"})
    with pytest.raises(ConfigError, match=r"^\$\.mqtt: reconnect_min_s 9 is above "):
        load_config(None, overrides={"mqtt.reconnect_min_s": 9, "mqtt.reconnect_max_s": 2})


def test_status_is_decodable_and_counts_mqtt(broker: Broker, tmp_path: Path,
                                             tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, broker.port, discovery=False)
    home = Subscriber(broker.port, ["homeassistant/#", f"{BASE}/status"])
    run_file(config, loud_file(tmp_path, 1))
    got = home.until(lambda got: any(isinstance(as_message(m), Status) and
                                     as_message(m).state == "stopped" for m in got))
    home.close()
    assert not [m for m in got if m.topic.startswith("homeassistant/")]  # discovery: false
    final = as_message(got[-1])
    assert final.counters["mqtt_connects"] == 1 and final.counters["mqtt_dropped"] == 0


def test_alert_daemon_acts_on_mqtt_events_once(broker: Broker, tmp_path: Path,
                                               tiny_model: Path) -> None:
    from monitor.apps.alert.config import load_alert_config
    from monitor.apps.alert.daemon import AlertDaemon

    path = tmp_path / "alert.yaml"
    path.write_text(json.dumps({
        "subscribe": [{"mqtt": {"port": broker.port, "client_id": "alert-test"}}],
        "state": str(tmp_path / "alert.db"),
        "rules": [{"name": "loud", "classes": ["loud"], "actions": [{"type": "log"}]}]}))
    alert = AlertDaemon(load_alert_config(path))
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=alert.run, args=(stop,), kwargs={"ready": ready})
    thread.start()
    wire = Subscriber(broker.port, [f"{BASE}/event/#"])
    try:
        assert ready.wait(10) and alert.bridges[0].subscribed.wait(10)
        run_file(write_config(tmp_path, tiny_model, broker.port), loud_file(tmp_path, 1))
        start = next(m for m in wire.until(count_phase("end", 1)) if b'"start"' in m.payload)
        wait_until(lambda: alert.counters["events"] == 2 and alert.dispatcher.delivered == 1)
        # The same event again on the wire (a resend after a lost PUBACK): judged once.
        wire.client.publish(start.topic, start.payload, qos=1).wait_for_publish(5)
        wait_until(lambda: alert.counters["duplicates"] == 1)
        assert alert.dispatcher.delivered == 1 and alert.counters["bad_messages"] == 0
    finally:
        stop.set()
        thread.join(30)
        wire.close()


def wait_until(done: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
