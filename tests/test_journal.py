"""The event journal and the catch-up endpoint, on a real SQLite file and real sockets."""

from __future__ import annotations

import json
import time
from pathlib import Path

import zmq

from monitor.outputs.catchup import CatchupClient, CatchupServer
from monitor.outputs.composer import Composer, ZmqOutput
from monitor.outputs.journal import SEQ_BLOCK, Journal, JournalReader
from monitor.outputs.publisher import Publisher
from monitor.protocol.messages import Event, Level, decode


def event_fields(i: int) -> dict[str, object]:
    return {"event_id": f"e{i}", "label": "Cough", "phase": "start", "onset_s": 0.0,
            "offset_s": None, "onset_time": time.time(), "offset_time": None,
            "peak_score": 0.9, "threshold": 0.5}


def level() -> dict[str, object]:
    return {"t_audio_s": 0.0, "rms_dbfs": -30.0, "peak_dbfs": -10.0, "mel": [0.0]}


def test_events_are_journaled_before_sending_and_seq_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path, max_age_days=1, max_mb=10)
    publisher = Publisher(f"ipc://{tmp_path}/p.sock", sensor_id="s1", send_hwm=10,
                          journal=journal)
    sent = [publisher.publish(Level, **level()), publisher.publish(Event, **event_fields(0)),
            publisher.publish(Level, **level()), publisher.publish(Event, **event_fields(1))]
    publisher.close()
    journal.close()  # no subscriber ever connected: the events exist only in the journal
    reader = JournalReader(path)
    rows = reader.since("s1", 0, limit=100)
    assert [decode(list(r)) for r in rows] == [sent[1], sent[3]]
    assert reader.since("s1", sent[1].seq, limit=100) == rows[1:]
    reader.close()
    again = Journal(path, max_age_days=1, max_mb=10)
    restarted = Publisher(f"ipc://{tmp_path}/p.sock", sensor_id="s1", send_hwm=10,
                          journal=again)
    first = restarted.publish(Level, **level())
    assert first.seq > sent[-1].seq  # never reused, even for unjournaled levels
    assert first.seq <= sent[0].seq + SEQ_BLOCK + 1
    restarted.close()
    again.close()


def test_events_left_open_are_closed_once_at_the_next_start(tmp_path: Path) -> None:
    """A run killed mid-event (nothing closed: the publisher just disappears) leaves it open
    in the journal; the next start publishes its `end` with reason "restart", once."""
    path = tmp_path / "journal.db"
    journal = Journal(path, max_age_days=1, max_mb=10)
    publisher = Publisher(f"ipc://{tmp_path}/p.sock", sensor_id="s1", send_hwm=10,
                          journal=journal)
    started = [publisher.publish(Event, **event_fields(i)) for i in range(3)]
    publisher.publish(Event, **{**event_fields(1), "phase": "end", "offset_s": 1.0,
                                "offset_time": time.time()})
    publisher.close()
    journal.close()
    for attempt in range(2):
        again = Journal(path, max_age_days=1, max_mb=10)
        restarted = Publisher(f"ipc://{tmp_path}/p.sock", sensor_id="s1", send_hwm=10,
                              journal=again)
        other = Publisher(f"ipc://{tmp_path}/q.sock", sensor_id="s2", send_hwm=10,
                          journal=again)
        assert other.open_events() == []  # another sensor's events are its own
        left_open = restarted.open_events()
        composer = Composer([ZmqOutput(restarted)], header=restarted.next_header,
                            give_back=restarted.give_back, sample_rate=16000, top_k=1,
                            classes=("Cough",), mel_bands=4, n_mels=64)
        closed = composer.close_left_open(left_open)
        restarted.close()
        other.close()
        again.close()
        if attempt == 0:
            assert closed == 2 and left_open == [started[0], started[2]]
        else:
            assert closed == 0, "closed twice"
    reader = JournalReader(path)
    ends = [decode(list(r)) for r in reader.since("s1", started[-1].seq + 1, limit=100)]
    reader.close()
    assert [(e.event_id, e.phase, e.end_reason) for e in ends] == [  # type: ignore[union-attr]
        ("e0", "end", "restart"), ("e2", "end", "restart")]
    for end, start in zip(ends, (started[0], started[2]), strict=True):
        assert isinstance(end, Event) and isinstance(start, Event)
        assert (end.label, end.onset_s, end.onset_time, end.peak_score, end.threshold) == \
            (start.label, start.onset_s, start.onset_time, start.peak_score, start.threshold)
        assert end.offset_s is None and end.offset_time is None


def test_journal_is_bounded_by_age_and_size(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", max_age_days=1, max_mb=1)
    now = time.time()
    body = b"x" * 2000
    for seq in range(1, 1001):
        ts = now - 3 * 86400 if seq <= 100 else now
        journal.append("s1", seq, ts, [b"event.cough", body])
    journal.prune(now=now)
    reader = JournalReader(tmp_path / "j.db")
    rows = reader.since("s1", 0, limit=2000)
    assert 0 < len(rows) < 900  # the 100 old ones by age, then the oldest by size
    assert (tmp_path / "j.db").stat().st_size <= 1.2 * 1024 * 1024
    assert reader.last_seq("s1") == 1000  # the newest survive
    reader.close()
    journal.close()


def test_catchup_server_pages_events_and_refuses_bad_requests(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path, max_age_days=1, max_mb=10)
    publisher = Publisher(f"ipc://{tmp_path}/p.sock", sensor_id="s1", send_hwm=10,
                          journal=journal)
    events = [publisher.publish(Event, **event_fields(i)) for i in range(25)]
    context = zmq.Context()
    server = CatchupServer(f"ipc://{tmp_path}/c.sock", journal_path=path, sensor_ids=("s1",),
                           context=context)
    server.start()
    client = CatchupClient(f"ipc://{tmp_path}/c.sock", context=context)
    raw = context.socket(zmq.REQ)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(f"ipc://{tmp_path}/c.sock")
    try:
        got, after, pages = [], events[4].seq, 0
        while True:
            page = client.fetch("s1", after, limit=10)
            assert page is not None
            header, pairs = page
            got += [decode(p) for p in pairs]
            pages += 1
            if not header.more:
                break
            after = got[-1].seq
        assert got == events[5:] and pages == 3  # 10, 10, then an empty last page
        assert header.last_seq == events[-1].seq
        raw.send(b"not json")
        assert json.loads(raw.recv_multipart()[0])["ok"] is False
        raw.send(json.dumps({"sensor_id": "other", "after_seq": 0}).encode())
        reply = json.loads(raw.recv_multipart()[0])
        assert reply["ok"] is False and "unknown sensor_id 'other'" in reply["error"]
        assert server.bad_requests == 2
    finally:
        raw.close()
        client.close()
        server.stop()
        publisher.close()
        journal.close()
        context.term()
