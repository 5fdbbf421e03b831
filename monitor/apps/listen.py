"""`audio-monitor listen`: print a daemon's messages, one JSON object per line.

Each line is the message's body with its `topic` added. Refused messages are counted by
reason and summed up at exit; with no `--topic`, a gap in a sensor's `seq` (lost messages)
is reported on stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

import zmq

from monitor.errors import MessageError
from monitor.protocol.messages import decode, to_dict
from monitor.protocol.schema import Refusals

logger = logging.getLogger(__name__)


def listen_command(endpoint: str, *, topics: Sequence[str], count: int, timeout_s: float) -> int:
    """Print messages from `endpoint` until `count` have arrived (0: forever); returns 1 after
    `timeout_s` seconds without a message (0: wait forever), else 0."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="audio-monitor: %(message)s")
    refusals = Refusals(logger, "listen")
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    for topic in topics or [""]:
        socket.setsockopt_string(zmq.SUBSCRIBE, topic)
    socket.connect(endpoint)
    received = 0
    last_seq: dict[str, int] = {}  # seq counts every topic, so gaps show only without topics
    timeout_ms = int(timeout_s * 1000) if timeout_s > 0 else -1
    try:
        while count == 0 or received < count:
            if not socket.poll(timeout_ms):
                print(f"audio-monitor: no message from {endpoint} for {timeout_s} s",
                      file=sys.stderr)
                return 1
            frames = socket.recv_multipart()
            try:
                message = decode(frames)
            except MessageError as err:  # counted by reason, logged (rate-limited), ignored
                refusals.count(err.reason, str(err))
                continue
            previous = last_seq.get(message.sensor_id)
            if not topics and previous is not None and message.seq > previous + 1:
                print(f"audio-monitor: {message.sensor_id}: {message.seq - previous - 1} "
                      f"message(s) lost before seq {message.seq}", file=sys.stderr)
            last_seq[message.sensor_id] = message.seq
            body = {"topic": message.topic, **to_dict(message)}
            print(json.dumps(body), flush=True)
            received += 1
    finally:
        socket.close()
        if refusals.total:
            print(f"audio-monitor: bad_messages by reason: {dict(refusals.by_reason)}",
                  file=sys.stderr)
    return 0
