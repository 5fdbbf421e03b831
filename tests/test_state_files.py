"""State files fail without taking a process down: a full disk, a damaged file, a reset
journal, two daemons on one file. Real processes on loopback where the failure was in one."""

from __future__ import annotations

import logging
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from test_alert import ENV, Webhook, alert_config, alert_daemon, sensor, stop

from monitor.apps.alert.outbox import Outbox
from monitor.outputs.journal import Journal
from monitor.outputs.publisher import Publisher
from monitor.protocol.messages import Event, decode, encode


def limited(limit_bytes: int) -> None:
    """preexec_fn: writes past `limit_bytes` fail with EFBIG, as on a full disk (Python
    ignores SIGXFSZ); the hard limit stays open so the test can lift it again."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))


def _source(tmp: Path, name: str = "s1") -> list[tuple[str, str]]:
    return [(f"ipc://{tmp}/{name}.pub", f"ipc://{tmp}/{name}.cu")]


def test_journal_reset_is_noticed_and_its_events_caught_up(tmp_path: Path) -> None:
    """A sensor's journal is deleted between two runs, while the alert daemon is down: the
    new journal's seq starts below the daemon's cursor. Before epochs, catch-up returned
    nothing and all 100 events of the second run were lost."""
    hook = Webhook()
    config = alert_config(tmp_path, hook.url, _source(tmp_path))
    alert = alert_daemon(config)
    first = sensor(tmp_path, "s1", events=100, rate=200.0, run="a")
    try:
        hook.wait_for(100, timeout_s=60)
        time.sleep(1.0)  # a heartbeat's catch-up moves the cursor past run a
        stop(alert)
        stop(first)
        for path in (tmp_path / "state-s1").glob("journal.db*"):
            path.unlink()
        second = sensor(tmp_path, "s1", events=100, rate=400.0, run="b")
        try:
            time.sleep(1.0)  # run b is over before the alert daemon is back
            alert = alert_daemon(config)
            hook.wait_for(200, timeout_s=60)
            time.sleep(0.5)
        finally:
            stop(second)
    finally:
        errors = stop(alert)
        hook.close()
    b = {k for k in hook.hits if "|b-" in k}
    assert len(b) == 100, errors[-2000:]
    assert "its journal was reset" in errors
    assert all(v == 1 for v in hook.hits.values())


def test_second_alert_daemon_on_one_state_file_is_refused(tmp_path: Path) -> None:
    hook = Webhook()
    config = alert_config(tmp_path, hook.url, _source(tmp_path))
    first = alert_daemon(config)
    try:
        time.sleep(1.5)
        assert first.poll() is None
        second = subprocess.run([sys.executable, "-m", "monitor", "alert", "--config",
                                 str(config)], capture_output=True, text=True, env=ENV,
                                timeout=60)
        assert second.returncode == 2
        assert second.stderr.strip() == (
            f"audio-monitor: error: state: {tmp_path / 'alert.db'} is in use by another alert "
            f"daemon (pid {first.pid}); stop that one, or give this one its own `state:` in "
            "alert.yaml")
        assert first.poll() is None
    finally:
        stop(first)
        hook.close()


def test_damaged_alert_state_is_refused_with_the_cure(tmp_path: Path) -> None:
    (tmp_path / "alert.db").write_bytes(b"this is not a database, it is a shopping list" * 100)
    config = alert_config(tmp_path, "http://127.0.0.1:9/", _source(tmp_path))
    result = subprocess.run([sys.executable, "-m", "monitor", "alert", "--config", str(config)],
                            capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 2
    message = result.stderr.strip()
    assert "Traceback" not in result.stderr and "\n" not in message
    assert f"state: {tmp_path / 'alert.db'} is damaged (file is not a database); move it " \
           f"aside (mv {tmp_path / 'alert.db'} {tmp_path / 'alert.db'}.damaged)" in message


def test_damaged_journal_is_moved_aside_and_a_fresh_one_started(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "journal.db"
    old = Journal(path, max_age_days=1, max_mb=1)
    old_epoch = old.epoch
    old.close()
    with open(path, "r+b") as f:  # the header survives, the pages do not
        f.seek(100)
        f.write(b"\xde\xad" * 4000)
    with caplog.at_level(logging.WARNING):
        journal = Journal(path, max_age_days=1, max_mb=1)
    try:
        assert journal.epoch is not None and journal.epoch != old_epoch
        aside = list(tmp_path.glob("journal.db.damaged-*"))
        assert len(aside) == 1
        assert [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()] == [
            f"{path} is damaged (database disk image is malformed): moved it to "
            f"{aside[0].name} and started a fresh one"]
        assert journal.append("s", 1, 1.0, [b"event.x", b"{}"])
    finally:
        journal.close()


def test_unwritable_journal_degrades_the_publisher_and_recovers(tmp_path: Path) -> None:
    """A read-only journal used to end the daemon at its first event (seq reservation)."""
    journal = Journal(tmp_path / "journal.db", max_age_days=1, max_mb=1)
    context = zmq.Context()
    publisher = Publisher(f"ipc://{tmp_path}/p.sock", sensor_id="s", journal=journal,
                          context=context, send_hwm=1000)
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{tmp_path}/p.sock")
    time.sleep(0.3)
    try:
        journal._conn.execute("PRAGMA query_only=1")  # SQLite refuses every write, as read-only
        fields = {"label": "Cough", "phase": "start", "onset_s": 0.0, "offset_s": None,
                  "onset_time": 1.0, "offset_time": None, "peak_score": 0.9, "threshold": 0.5}
        for i in range(3):
            publisher.publish(Event, event_id=f"e{i}", **fields)
        assert journal.errors == 4 and journal.written == 0  # the seq block and 3 events
        assert journal.last_error is not None
        assert journal.last_error.startswith(f"journal {journal.path}: writing s seq ")
        assert "events are published but not kept for catch-up" in journal.last_error
        assert "free disk space, or make" in journal.last_error
        received = [decode(sub.recv_multipart()) for _ in range(3)]
        assert [m.event_id for m in received if isinstance(m, Event)] == ["e0", "e1", "e2"]
        journal._conn.execute("PRAGMA query_only=0")
        publisher.publish(Event, event_id="e3", **fields)
        assert journal.last_error is None and journal.written == 1
    finally:
        sub.close()
        publisher.close()
        journal.close()
        context.term()


def test_full_disk_degrades_the_alert_daemon_and_nothing_is_lost(tmp_path: Path) -> None:
    """The alert daemon's state file cannot grow (a full disk): it degrades, logs which
    file and the cure, stays up; once there is room, every event is acted on, once."""
    from test_alert_status import wait_state
    from test_production import NotifySocket

    hook = Webhook()
    systemd = NotifySocket(str(tmp_path / "notify"))
    ack = f"ipc://{tmp_path}/ack.sock"
    config = alert_config(tmp_path, hook.url, _source(tmp_path), ack_endpoint=ack)
    alert = subprocess.Popen([sys.executable, "-m", "monitor", "alert", "--config",
                              str(config), "--log-level", "WARNING"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**ENV, "NOTIFY_SOCKET": systemd.address},
                             preexec_fn=lambda: limited(96 * 1024))
    source = sensor(tmp_path, "s1", events=300, rate=300.0)
    try:
        time.sleep(4.0)
        assert alert.poll() is None, "a full disk must not end the daemon"
        assert hook.distinct() < 300, "the limit was never reached: nothing tested"
        degraded = wait_state(ack, "degraded")  # the status surface says so, and why
        line = systemd.wait_for("STATUS", "degraded; ", timeout=10)["STATUS"]
        lifted = time.monotonic()
        resource.prlimit(alert.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        hook.wait_for(300, timeout_s=60)
        running = wait_state(ack, "running")  # after 5 s without a failure
        assert systemd.wait_for("STATUS", "running; ", since=lifted, timeout=10)
        assert alert.poll() is None
    finally:
        errors = stop(alert)
        stop(source)
        hook.close()
        systemd.close()
    assert hook.distinct() == 300, errors[-3000:]
    cure = (f"state {tmp_path / 'alert.db'}: OperationalError: disk I/O error; events are "
            "judged again")
    assert (degraded["last_error"] or "").startswith(cure)
    assert f"last_error: {cure}" in line
    assert running["last_error"] is None
    assert running["destinations"]["cough/webhook0"]["delivered"] == 300
    assert f"alert daemon degraded (1 failures so far): state {tmp_path / 'alert.db'}: " \
           "OperationalError: disk I/O error; events are judged again" in errors
    assert "free disk space, or make" in errors
    with sqlite3.connect(tmp_path / "alert.db") as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state"))
    assert states == {"delivered": 300}


def test_outbox_of_an_older_version_gains_the_epoch_column(tmp_path: Path) -> None:
    path = tmp_path / "alert.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE cursors (sensor_id TEXT PRIMARY KEY, source TEXT NOT NULL, "
                     "seq INTEGER NOT NULL)")
        conn.execute("INSERT INTO cursors VALUES ('s1', 'ipc://x', 42)")
    outbox = Outbox(path, check=True)
    try:
        assert outbox.cursor("s1") == (42, "ipc://x") and outbox.epoch("s1") is None
        outbox.set_cursor("s1", "ipc://x", 43, epoch="abc")
        assert outbox.epoch("s1") == "abc"
    finally:
        outbox.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_journal_that_cannot_be_created_is_retried_with_backoff(tmp_path: Path) -> None:
    """A journal that could not be opened at start used to exit 2; now the publisher runs
    without it, numbers above any journal-backed run, and takes it back once it opens."""
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where state_dir's parent should be a folder")
    path = blocker / "state" / "journal.db"
    clock = FakeClock()
    journal = Journal(path, max_age_days=1, max_mb=1, clock=clock)
    context = zmq.Context()
    publisher = Publisher(f"ipc://{tmp_path}/p.sock", sensor_id="s", journal=journal,
                          context=context, send_hwm=1000)
    fields = {"label": "Cough", "phase": "start", "onset_s": 0.0, "offset_s": None,
              "onset_time": 1.0, "offset_time": None, "peak_score": 0.9, "threshold": 0.5}
    try:
        assert journal.generation == 0 and journal.epoch is None
        error = journal.last_error or ""
        assert error.startswith(f"journal {path}: cannot open it (")
        assert f"make {path.parent} writable by the daemon's user" in error
        assert "events are published but not kept for catch-up" in error
        before = publisher.publish(Event, event_id="e0", **fields)
        assert before.seq > 10**12  # the wall clock in ms: above any journal-backed run
        assert journal.written == 0 and journal.errors >= 2
        blocker.unlink()
        clock.now = 0.9  # before the first retry (1 s)
        publisher.publish(Event, event_id="e1", **fields)
        assert journal.generation == 0 and journal.last_error is not None
        clock.now = 1.0
        after = publisher.publish(Event, event_id="e2", **fields)
        assert journal.generation == 1 and journal.last_error is None
        assert journal.epoch is not None and journal.written == 1
        assert after.seq == before.seq + 2
        assert journal.start_seq("s") > after.seq  # reserved anew: a restart goes above
    finally:
        publisher.close()
        journal.close()
        context.term()
    again = Journal(path, max_age_days=1, max_mb=1)
    try:
        assert [decode(list(pair)).event_id for pair in  # type: ignore[union-attr]
                again.open_events("s")] == ["e2"]
    finally:
        again.close()


def test_journal_backoff_doubles_up_to_a_minute(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("")
    clock = FakeClock()
    journal = Journal(blocker / "journal.db", max_age_days=1, max_mb=1, clock=clock)
    attempts = []
    for second in range(400):
        clock.now = float(second)
        errors = journal.errors
        journal.ready()
        if journal.errors > errors:
            attempts.append(second)
    assert attempts == [1, 3, 7, 15, 31, 63, 123, 183, 243, 303, 363]


def test_sensor_starts_degraded_without_its_journal_and_takes_it_back(
        tmp_path: Path, tiny_model: Path) -> None:
    """Over a real `run`: state_dir cannot be reached (a file is in the way), so the daemon
    starts `degraded` and publishes events live, its catch-up endpoint says why it has
    nothing; once the way is clear it opens the journal, ends the event a killed run left
    open in it, goes back to `running`, and the next event is journaled and served by
    catch-up. It used to exit 2 at start."""
    import numpy as np

    from monitor.errors import MessageError
    from monitor.outputs.catchup import CatchupClient
    from monitor.protocol.messages import Status

    rate = 16000
    blocker = tmp_path / "blocked"
    blocker.write_text("")
    state = blocker / "state"
    kept = tmp_path / "kept"  # the journal of a killed run, out of the daemon's reach
    killed = Journal(kept / "state" / "journal.db", max_age_days=1, max_mb=1)
    left_open = Event(sensor_id="s1", seq=killed.reserve("s1", 5), ts=time.time(),
                      event_id="old-run-loud-1", label="loud", phase="start", onset_s=1.0,
                      offset_s=None, onset_time=time.time(), offset_time=None,
                      peak_score=0.9, threshold=0.5)
    assert killed.append("s1", left_open.seq, left_open.ts, encode(left_open),
                         opens=left_open.event_id)
    killed.close()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"sensor_id: s1\nstate_dir: {state}\nmodel:\n  path: {tiny_model}\n  stride_ms: 50\n"
        f"publish:\n  endpoint: ipc://{tmp_path}/p.sock\n  catchup_endpoint: "
        f"ipc://{tmp_path}/c.sock\n  status_interval_s: 0.2\n")
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{tmp_path}/p.sock")
    process = subprocess.Popen(
        [sys.executable, "-m", "monitor", "run", "--config", str(config), "--source", "stdin",
         "--rate", str(rate)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env=ENV)
    assert process.stdin is not None
    rng = np.random.default_rng(0)
    quiet = np.zeros(rate // 10, dtype="<i2").tobytes()
    loud = (0.3 * 32767 * rng.standard_normal(rate)).clip(-32767, 32767).astype("<i2")

    def until(wanted: Any, timeout_s: float = 30.0) -> Any:
        """Feed silence in real time until a message satisfies `wanted`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            process.stdin.write(quiet)  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]
            while sub.poll(100):
                message = decode(sub.recv_multipart())
                if wanted(message):
                    return message
        raise AssertionError(f"timed out; daemon rc={process.poll()}")

    client = CatchupClient(f"ipc://{tmp_path}/c.sock", context=context, timeout_s=10)
    try:
        degraded = until(lambda m: isinstance(m, Status) and m.state == "degraded")
        assert (degraded.last_error or "").startswith(
            f"journal {state / 'journal.db'}: cannot open it (")
        assert "or set another state_dir" in degraded.last_error
        process.stdin.write(loud.tobytes())
        first = until(lambda m: isinstance(m, Event) and m.phase == "end")
        with pytest.raises(MessageError, match="journal not available"):
            client.fetch("s1", 0)
        blocker.unlink()
        kept.rename(blocker)
        closed = until(lambda m: isinstance(m, Event) and m.event_id == left_open.event_id)
        assert closed.phase == "end" and closed.end_reason == "restart"
        running = until(lambda m: isinstance(m, Status) and m.state == "running")
        assert running.last_error is None and running.counters["journal_errors"] >= 1
        process.stdin.write(loud.tobytes())
        second = until(lambda m: isinstance(m, Event) and m.phase == "end")
        page = client.fetch("s1", 0)
        assert page is not None
        served = [decode(pair) for pair in page[1]]
        assert [(m.event_id, m.phase) for m in served if isinstance(m, Event)] == [
            (left_open.event_id, "start"), (left_open.event_id, "end"),
            (second.event_id, "start"), (second.event_id, "end")]
        assert first.event_id != second.event_id and second.seq > first.seq
        process.stdin.close()
        assert process.wait(30) == 0
        assert (state / "journal.db").is_file()
    finally:
        client.close()
        sub.close()
        if process.poll() is None:
            process.kill()
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        context.term()
    assert "Traceback" not in stderr, stderr[-2000:]
