"""The output seam: every output sees the same numbered messages; one failing output
neither stops detection nor the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zmq

from monitor.detect.events import Transition
from monitor.outputs.composer import Composer, Output, ZmqOutput
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
