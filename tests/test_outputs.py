"""The output seam: every output sees the same numbered messages; one failing output
neither stops detection nor the others."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zmq

from monitor.config import load_config
from monitor.detect.events import Transition
from monitor.errors import ConfigError
from monitor.outputs.composer import Composer, Live, Output, OutputContext, ZmqOutput, build_outputs
from monitor.outputs.metrics import MetricsOutput
from monitor.outputs.publisher import Publisher
from monitor.protocol.messages import Event, Message, Scores, decode, encode

RATE = 16000


class Recorder(Output):
    name = "recorder"

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.inference_ms: list[float] = []

    def send(self, message: Message) -> None:
        self.messages.append(message)

    def scored(self, inference_ms: float) -> None:
        self.inference_ms.append(inference_ms)

    def stats(self) -> dict[str, int]:
        return {"recorder_messages": len(self.messages)}


class Broken(Output):
    name = "broken"

    def send(self, message: Message) -> None:
        raise RuntimeError("a bug in an output")


def test_outputs_share_numbered_messages_and_a_broken_one_is_counted(tmp_path: Path) -> None:
    context = zmq.Context()
    endpoint = f"ipc://{tmp_path}/p.sock"
    publisher = Publisher(endpoint, sensor_id="s", send_hwm=100, context=context)
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    assert publisher.wait_for_subscriber(5)
    recorder = Recorder()
    composer = Composer([ZmqOutput(publisher), Broken(), recorder], header=publisher.next_header,
                        give_back=publisher.give_back, sample_rate=RATE, top_k=1,
                        classes=("cough", "other"), mel_bands=4, n_mels=64)
    composer.anchor(0, now=1000.0, caught_up=False)
    try:
        composer.on_scores(RATE, np.array([0.9, 0.1], dtype=np.float32), 0.25)
        composer.on_transition(Transition(label="cough", phase="start", onset=RATE // 2,
                                          offset=None, peak_score=0.9, threshold=0.5,
                                          event_number=1))
        wire = [decode(sub.recv_multipart()) for _ in range(2)]
    finally:
        sub.close()
        publisher.close()
        context.term()
    assert [encode(m) for m in wire] == [encode(m) for m in recorder.messages]  # seq too
    assert [type(m) for m in wire] == [Scores, Event] and [m.seq for m in wire] == [1, 2]
    event = wire[1]
    assert isinstance(event, Event) and event.onset_time == 1000.5
    assert recorder.inference_ms == [0.25]
    stats = composer.stats()
    assert stats["output_errors"] == 2 and stats["recorder_messages"] == 2
    assert stats["publish_sent"] == 2 and stats["events"] == 1


def test_an_unencodable_message_reaches_no_output_and_leaves_no_seq_gap(tmp_path: Path) -> None:
    """A non-finite number (a bug upstream) is counted in `publish_unencodable`; its number
    is given back, so the next message takes it and subscribers see no loss."""
    context = zmq.Context()
    publisher = Publisher(f"ipc://{tmp_path}/p.sock", sensor_id="s", send_hwm=100,
                          context=context)
    recorder = Recorder()
    composer = Composer([ZmqOutput(publisher), recorder], header=publisher.next_header,
                        give_back=publisher.give_back, sample_rate=RATE, top_k=1,
                        classes=("cough", "other"), mel_bands=4, n_mels=64)
    try:
        composer.on_scores(RATE, np.array([0.9, 0.1], dtype=np.float32), 0.25)
        composer.publish(Scores, t_audio_s=float("nan"), top=[])
        composer.on_scores(2 * RATE, np.array([0.9, 0.1], dtype=np.float32), 0.25)
    finally:
        publisher.close()
        context.term()
    assert [m.seq for m in recorder.messages] == [1, 2]
    stats = composer.stats()
    assert stats["publish_unencodable"] == 1 and stats["publish_sent"] == 2
    assert stats["publish_dropped"] == 0


def test_outputs_are_chosen_by_config_sections(tmp_path: Path) -> None:
    """`metrics:` in the config builds the metrics output; started, it serves the daemon's
    counters, state and gauges (read at scrape time) and what it counted itself."""
    (tmp_path / "config.yaml").write_text("metrics:\n  enabled: true\n  address: 127.0.0.1:0\n")
    config = load_config(tmp_path / "config.yaml")
    context = OutputContext(sensor_id="s1", state_dir=tmp_path)
    assert build_outputs(load_config(None), context) == []  # every optional output is off
    (output,) = build_outputs(config, context)
    assert isinstance(output, MetricsOutput)
    counters = {"samples": 16000, "windows": 3}
    composer = Composer([output], header=iter(
        {"v": 1, "sensor_id": "s1", "seq": seq, "ts": 1.0} for seq in range(1, 100)).__next__,
        give_back=lambda seq: None, sample_rate=RATE, top_k=0, classes=("cough",),
        mel_bands=32, n_mels=64)
    composer.start(Live(counters=lambda: counters, state=lambda: "running",
                        gauges=lambda: {"uptime_seconds": 2.5, "processing_seconds_total": 0.25}))
    try:
        composer.on_transition(Transition(label="cough", phase="start", onset=8000,
                                          offset=None, peak_score=0.9, threshold=0.5,
                                          event_number=1))
        composer.on_scores(16000, np.array([0.9], np.float32), inference_ms=2.0)
        counters["samples"] = 32000  # read at scrape time, not copied at start
        assert output.address is not None
        host, port = output.address
        body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    finally:
        composer.close()
    values = {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) ([\d.e+-]+)$", body, re.M)}
    assert values["audio_monitor_samples_total"] == 32000
    assert values["audio_monitor_windows_total"] == 3
    assert values['audio_monitor_events_total{class="cough"}'] == 1
    assert values["audio_monitor_inference_seconds_count"] == 1
    assert values['audio_monitor_state{state="running"}'] == 1.0
    assert values["audio_monitor_uptime_seconds"] == 2.5
    assert values["audio_monitor_processing_seconds_total"] == 0.25


def test_a_bad_metrics_address_is_refused_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("metrics:\n  address: localhost\n")
    with pytest.raises(ConfigError, match=r"^\$\.metrics\.address: 'localhost': expected ADDR"):
        load_config(tmp_path / "config.yaml")
