"""Publishing on real ZeroMQ sockets: numbering, never blocking, surviving subscribers."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import zmq

from monitor.errors import ConfigError
from monitor.outputs.publisher import Publisher
from monitor.protocol.messages import Level, Status, decode


def level_fields(n_bands: int = 32) -> dict[str, object]:
    return {"t_audio_s": 0.1, "rms_dbfs": -30.0, "peak_dbfs": -10.0, "mel": [-3.0] * n_bands}


def connect_sub(context: zmq.Context, endpoint: str, *, rcvhwm: int = 1000) -> zmq.Socket:
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, rcvhwm)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt_string(zmq.SUBSCRIBE, "")
    sub.connect(endpoint)
    return sub


def wait_until_subscribed(publisher: Publisher, sub: zmq.Socket) -> None:
    """Slow-joiner handshake: publish probes until one arrives."""
    for _ in range(200):
        publisher.publish(Level, **level_fields())
        if sub.poll(20):
            while sub.poll(20):
                sub.recv_multipart()
            return
    raise AssertionError("subscriber never connected")


def test_subscriber_receives_numbered_messages(tmp_path: Path) -> None:
    context = zmq.Context()
    endpoint = f"ipc://{tmp_path}/pub.sock"
    publisher = Publisher(endpoint, sensor_id="room-1", send_hwm=100, context=context)
    sub = connect_sub(context, endpoint)
    try:
        wait_until_subscribed(publisher, sub)
        first = publisher.publish(Level, **level_fields())
        publisher.publish(Status, state="running", source="x", uptime_s=1.0, t_audio_s=1.0,
                          counters={}, inference_ms_p50=0.0, inference_ms_max=0.0,
                          dc_offset=0.0, last_error=None)
        got = [decode(sub.recv_multipart()) for _ in range(2)]
        assert [m.seq for m in got] == [first.seq, first.seq + 1]
        assert got[0] == first
        assert got[1].sensor_id == "room-1" and got[1].topic == "status"
    finally:
        sub.close()
        publisher.close()
        context.term()


def test_a_stuck_subscriber_costs_it_messages_not_our_time(tmp_path: Path) -> None:
    """ZeroMQ PUB drops per subscriber at its high-water mark and never blocks the sender;
    the subscriber sees the loss as a gap in `seq`."""
    context = zmq.Context()
    endpoint = f"ipc://{tmp_path}/pub.sock"
    publisher = Publisher(endpoint, sensor_id="room-1", send_hwm=10, context=context)
    sub = connect_sub(context, endpoint, rcvhwm=10)
    try:
        wait_until_subscribed(publisher, sub)
        attempts = 20000
        for _ in range(attempts):  # the subscriber reads nothing meanwhile
            publisher.publish(Level, **level_fields(256))
        assert publisher.sent + publisher.dropped >= attempts
        seqs = []
        while sub.poll(200):
            seqs.append(decode(sub.recv_multipart()).seq)
        assert 0 < len(seqs) < attempts
        # The next message that gets through reveals the loss, wherever it happened.
        last = publisher.publish(Level, **level_fields())
        assert sub.poll(5000), "the queue drained, so the next message must arrive"
        seqs.append(decode(sub.recv_multipart()).seq)
        assert seqs[-1] == last.seq
        gaps = sum(1 for a, b in itertools.pairwise(seqs) if b != a + 1)
        assert gaps >= 1
    finally:
        sub.close()
        publisher.close()
        context.term()


def test_subscriber_dying_does_not_hurt_the_publisher(tmp_path: Path) -> None:
    context = zmq.Context()
    endpoint = f"ipc://{tmp_path}/pub.sock"
    publisher = Publisher(endpoint, sensor_id="room-1", send_hwm=100, context=context)
    try:
        doomed = connect_sub(context, endpoint)
        wait_until_subscribed(publisher, doomed)
        doomed.close()
        for _ in range(100):
            publisher.publish(Level, **level_fields())
        survivor = connect_sub(context, endpoint)
        wait_until_subscribed(publisher, survivor)
        sent = publisher.publish(Level, **level_fields())
        assert decode(survivor.recv_multipart()).seq == sent.seq
        survivor.close()
    finally:
        publisher.close()
        context.term()


def test_unencodable_message_is_counted_not_raised_and_leaves_no_seq_gap(
        tmp_path: Path) -> None:
    context = zmq.Context()
    endpoint = f"ipc://{tmp_path}/pub.sock"
    publisher = Publisher(endpoint, sensor_id="a", send_hwm=10, context=context)
    sub = connect_sub(context, endpoint)
    try:
        wait_until_subscribed(publisher, sub)
        sent = publisher.sent
        first = publisher.publish(Level, **level_fields())
        publisher.publish(Level, t_audio_s=0.0, rms_dbfs=float("nan"), peak_dbfs=0.0, mel=[])
        last = publisher.publish(Level, **level_fields())
        assert (publisher.unencodable, publisher.dropped, publisher.sent - sent) == (1, 0, 2)
        got = [decode(sub.recv_multipart()).seq for _ in range(2)]
        assert got == [first.seq, first.seq + 1] == [first.seq, last.seq]  # no gap
    finally:
        sub.close()
        publisher.close()
        context.term()


def test_bad_or_busy_endpoint_is_a_config_error(tmp_path: Path) -> None:
    context = zmq.Context()
    try:
        with pytest.raises(ConfigError, match="publish.endpoint: 'udp://x' is not a ZeroMQ"):
            Publisher("udp://x", sensor_id="a", send_hwm=10, context=context)
        first = Publisher("tcp://127.0.0.1:*", sensor_id="a", send_hwm=10, context=context)
        with pytest.raises(ConfigError, match="cannot bind .* pick a free port"):
            Publisher(first.bound_endpoint, sensor_id="a", send_hwm=10, context=context)
        first.close()
    finally:
        time.sleep(0)
        context.term()
