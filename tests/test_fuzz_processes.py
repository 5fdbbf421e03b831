"""Thousands of generated and mutated messages thrown at running processes: the alert
daemon (through the proxy's bus, and at its ack endpoint), the proxy's catch-up router and
a sensor's catch-up server. Afterwards each still works: a new sensor's events are acted on,
once each, live and by catch-up through the proxy. Real processes, real sockets.

Hypothesis draws the mutations (`st.data()` per batch), so every run tries new ones.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_alert import ENV, SIM, Webhook, alert_config, alert_daemon, stop
from test_fuzz import VALID, json_values

from monitor.apps.alert.ack import parse_ack
from monitor.errors import MessageError
from monitor.outputs.catchup import parse_request
from monitor.protocol.messages import encode

BATCHES = 60
"""Hypothesis examples; each sends a batch of mutated messages to every target."""
PER_BATCH = 40


@st.composite
def mutated_frames(data: st.DrawFn) -> list[bytes]:
    """Wire messages of every kind of wrong: mutated fields, bytes, nesting, size, frames."""
    topic, body = encode(data(st.sampled_from(VALID)))
    fields = {**json.loads(body), "sensor_id": "evil"}
    how = data(st.sampled_from(["replace", "delete", "add", "bytes", "truncate",
                                     "nest", "huge", "frames", "topic", "nan"]))
    key = data(st.sampled_from(sorted(fields)))
    if how == "replace":
        fields[key] = data(json_values)
    elif how == "delete":
        del fields[key]
    elif how == "add":
        fields[data(st.text(max_size=8))] = data(json_values)
    elif how == "bytes":
        return [topic, data(st.binary(max_size=300))]
    elif how == "truncate":
        return [topic, body[:data(st.integers(0, len(body)))]]
    elif how == "nest":
        return [topic, b"[" * data(st.integers(1000, 200_000))]
    elif how == "huge":
        return [topic, b'{"v": 1, "pad": "' + b"x" * (2 << 20) + b'"}']
    elif how == "frames":
        return data(st.lists(st.binary(max_size=50), min_size=1, max_size=4))
    elif how == "topic":
        return [data(st.binary(max_size=30)), body]
    else:
        fields[key] = float("nan")
    return [topic, json.dumps(fields).encode()]


def request_strategy(keys: list[str]) -> st.SearchStrategy[bytes]:
    """Catch-up or ack requests: JSON objects with the right keys and wrong values, or bytes."""
    return st.one_of(
        st.binary(max_size=200),
        st.dictionaries(st.sampled_from([*keys, "x"]), json_values).map(
            lambda d: json.dumps(d).encode()),
        st.integers(1000, 200_000).map(lambda n: b"[" * n))


def well_formed(target: str, payload: bytes) -> bool:
    """Whether a drawn request is one its endpoint may accept, by the endpoints' own parsers:
    the strategy's dictionaries sometimes draw a valid one (an ack needs only a non-empty
    `event_id` string; a catch-up a served sensor and a count)."""
    try:
        if target == "ack":
            parse_ack(payload)
            return True
        return parse_request([payload])[0] in ("s1", "s2")
    except MessageError:
        return False


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("storm")
    context = zmq.Context()
    evil = context.socket(zmq.XPUB)  # a "sensor" that sends anything
    evil.setsockopt(zmq.LINGER, 0)
    evil.setsockopt(zmq.SNDHWM, 0)
    evil.bind(f"ipc://{tmp}/evil.pub")
    sensors = {"evil": {"publish": f"ipc://{tmp}/evil.pub"}}
    sensors.update({s: {"publish": f"ipc://{tmp}/{s}.pub", "catchup": f"ipc://{tmp}/{s}.cu"}
                    for s in ("s1", "s2")})
    config = {"publish": f"ipc://{tmp}/bus.pub", "catchup": f"ipc://{tmp}/bus.cu",
              "sensors": sensors}
    (tmp / "fleet.yaml").write_text(json.dumps(config))
    proxy = subprocess.Popen([sys.executable, "-m", "monitor", "proxy", "--config",
                              str(tmp / "fleet.yaml"), "--log-level", "WARNING"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    hook = Webhook()
    alert = alert_daemon(alert_config(tmp, hook.url, [(config["publish"], config["catchup"])],
                                      ack_endpoint=f"ipc://{tmp}/ack.sock"))
    s1 = subprocess.Popen(
        [sys.executable, str(SIM), "--state", str(tmp / "state-s1"), "--sensor", "s1",
         "--publish", f"ipc://{tmp}/s1.pub", "--catchup", f"ipc://{tmp}/s1.cu",
         "--events", "50", "--rate", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert s1.stdout is not None and s1.stdout.readline().startswith("ready")
    assert evil.poll(10_000), "the proxy never subscribed to the evil sensor"
    evil.recv()
    sockets = {}
    for name, endpoint in (("sensor_catchup", f"ipc://{tmp}/s1.cu"),
                           ("proxy_catchup", f"ipc://{tmp}/bus.cu"),
                           ("ack", f"ipc://{tmp}/ack.sock")):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sockets[name] = sock
    state = {"tmp": tmp, "context": context, "evil": evil, "sockets": sockets, "hook": hook,
             "procs": {"proxy": proxy, "alert": alert, "s1": s1}, "sent": 0, "requests": 0,
             "replies": 0, "refused_replies": 0}
    yield state
    for sock in sockets.values():
        sock.close()
    evil.close()
    for process in state["procs"].values():
        if process.poll() is None:
            stop(process)
    hook.close()
    context.term()


@settings(max_examples=BATCHES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(messages=st.lists(mutated_frames(), min_size=PER_BATCH, max_size=PER_BATCH),
       catchups=st.lists(request_strategy(["sensor_id", "after_seq", "limit"]),
                         min_size=5, max_size=5),
       acks=st.lists(request_strategy(["event_id", "by"]), min_size=5, max_size=5))
def test_storm(fleet: dict[str, Any], messages: list[list[bytes]], catchups: list[bytes],
               acks: list[bytes]) -> None:
    for frames in messages:
        fleet["evil"].send_multipart(frames)
    fleet["sent"] += len(messages)
    for name, payloads in (("sensor_catchup", catchups), ("proxy_catchup", catchups),
                           ("ack", acks)):
        sock = fleet["sockets"][name]
        for payload in payloads:
            sock.send_multipart([b"", payload])  # as a REQ socket would
            fleet["requests"] += 1
        for payload in payloads:  # every request is answered, in order
            assert sock.poll(10_000), f"{name} stopped answering"
            reply = sock.recv_multipart()
            fleet["replies"] += 1
            if json.loads(reply[1]).get("ok") is False:
                fleet["refused_replies"] += 1
            else:
                assert well_formed(name, payload), f"{name} accepted {payload[:200]!r}"
    for name, process in fleet["procs"].items():
        assert process.poll() is None, f"{name} died: {process.stderr.read()[-3000:]}"


def test_after_the_storm_every_process_still_delivers(fleet: dict[str, Any]) -> None:
    """Runs after `test_storm`: a sensor that starts now has its events acted on, live and
    (for those published before its first heartbeat was seen) by catch-up via the proxy."""
    tmp, hook = fleet["tmp"], fleet["hook"]
    assert fleet["sent"] >= BATCHES * PER_BATCH * 0.9, "the storm did not run"
    s2 = subprocess.Popen(
        [sys.executable, str(SIM), "--state", str(tmp / "state-s2"), "--sensor", "s2",
         "--publish", f"ipc://{tmp}/s2.pub", "--catchup", f"ipc://{tmp}/s2.cu",
         "--events", "40", "--rate", "200"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    fleet["procs"]["s2"] = s2
    expected = ({f"s1|r-s1-{i}|start|cough/webhook0" for i in range(50)} |
                {f"s2|r-s2-{i}|start|cough/webhook0" for i in range(40)})
    deadline = time.monotonic() + 90
    while not expected <= set(hook.hits) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    for name, process in fleet["procs"].items():
        assert process.poll() is None, f"{name} died"
    alert_log = stop(fleet["procs"]["alert"])
    ours = {k: v for k, v in hook.hits.items() if not k.startswith("evil|")}
    assert set(ours) == expected, alert_log[-3000:]
    assert all(v == 1 for v in ours.values()), "an event was acted on twice"
    assert "Traceback" not in alert_log, alert_log[alert_log.find("Traceback") - 300:][:3000]
    reasons = json.loads(re.search(r"bad_messages by reason: (\{.*\})", alert_log)[1]  # type: ignore[index]
                         .replace("'", '"'))
    print(f"\nstorm: {fleet['sent']} mutated wire messages through the proxy, "
          f"{fleet['requests']} mutated catch-up/ack requests ({fleet['refused_replies']} "
          f"refused); alert daemon bad_messages by reason {reasons}; processes alive: "
          f"{len(fleet['procs'])}; events {len(expected)} delivered, lost 0, duplicates 0")
    wire = sum(n for reason, n in reasons.items() if not reason.startswith("ack_"))
    assert wire >= fleet["sent"] // 4, "most mutations never reached the daemon"
    assert fleet["replies"] == fleet["requests"]
    assert fleet["refused_replies"] >= fleet["requests"] * 0.9, "most drawn requests are malformed"
