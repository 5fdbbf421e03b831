"""The alert daemon's durable state: decisions, the action outbox, cursors, cooldowns, acks.

One SQLite file (WAL, ``synchronous=FULL``). Exactly-once rests on two keys:

* ``decisions (rule, sensor_id, event_id, phase)``: a rule judges each event phase once;
  a replay (catch-up, restart) finds the decision and does nothing.
* ``outbox.key = sensor_id|event_id|phase|rule/action``: one row per action to run; the
  row is written in the same transaction as the decision, then delivered, retried with
  backoff and finally marked ``delivered`` or ``expired`` (kept as the record).

A crash between an action succeeding and its row being marked is the one window where an
action can run twice; webhooks carry the key as ``Idempotency-Key`` so a receiver can
drop that repeat. Each thread opens its own `Outbox` (SQLite connections stay in one thread).

One daemon per file: `StateLock` holds an exclusive lock on ``STATE.lock`` for the
daemon's life. A damaged file is refused at start with the cure (move it aside); errors
at run time are the caller's to contain (the alert daemon degrades and retries).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.errors import ConfigError
from monitor.outputs.journal import is_damage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    rule TEXT NOT NULL, sensor_id TEXT NOT NULL, event_id TEXT NOT NULL, phase TEXT NOT NULL,
    fired INTEGER NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (rule, sensor_id, event_id, phase)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, action TEXT NOT NULL, sensor_id TEXT NOT NULL,
    event_id TEXT NOT NULL, phase TEXT NOT NULL, payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, next_at REAL NOT NULL, expires_at REAL NOT NULL,
    done_at REAL, last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_at);
CREATE TABLE IF NOT EXISTS cursors (
    sensor_id TEXT PRIMARY KEY, source TEXT NOT NULL, seq INTEGER NOT NULL, epoch TEXT
);
CREATE TABLE IF NOT EXISTS cooldowns (
    rule TEXT NOT NULL, sensor_id TEXT NOT NULL, label TEXT NOT NULL, last_time REAL NOT NULL,
    PRIMARY KEY (rule, sensor_id, label)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS acks (event_id TEXT PRIMARY KEY, at REAL NOT NULL, by TEXT);
"""


@dataclass(frozen=True)
class Item:
    """One action to run for one event phase."""

    key: str
    kind: str
    """"alert" or "escalation"."""
    action: str
    """Rule-qualified action name, e.g. "night-cough/webhook0"."""
    sensor_id: str
    event_id: str
    phase: str
    payload: dict[str, Any]
    next_at: float
    expires_at: float


class StateLock:
    """An exclusive lock on STATE.lock: one alert daemon per state file."""

    def __init__(self, state: Path) -> None:
        self.path = state.with_name(state.name + ".lock")
        try:
            state.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"state: cannot create {self.path}: {err.strerror}; make "
                              f"{state.parent} writable by the daemon's user") from err
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise ConfigError(f"state: {state} is in use by another alert daemon (pid "
                              f"{holder}); stop that one, or give this one its own `state:` "
                              "in alert.yaml") from err
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self._fd)  # closing drops the lock


class Outbox:
    def __init__(self, path: Path, *, check: bool = False, any_thread: bool = False) -> None:
        """Open (or create) the state file; `check`: verify it first (at start-up);
        `any_thread`: may be closed by another thread than the one using it.

        ConfigError if it cannot be opened, or is damaged (naming the cure)."""
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(path), timeout=30, isolation_level=None,
                                         check_same_thread=not any_thread)
            self._conn.execute("PRAGMA busy_timeout=30000")
            if check:
                result = self._conn.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise sqlite3.DatabaseError(f"database disk image is malformed ({result})")
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            columns = {r[1] for r in self._conn.execute("PRAGMA table_info(cursors)")}
            if "epoch" not in columns:  # a state file from before journal epochs
                self._conn.execute("ALTER TABLE cursors ADD COLUMN epoch TEXT")
        except sqlite3.DatabaseError as err:
            if is_damage(err):
                raise ConfigError(
                    f"state: {path} is damaged ({err}); move it aside (mv {path} "
                    f"{path}.damaged) and start again: a fresh file is created, and events "
                    "still in the sensors' journals are judged again, so an alert already "
                    "sent may be sent once more") from err
            raise ConfigError(f"state: cannot open alert state {path}: {err}; make "
                              f"{path.parent} writable by the daemon's user") from err
        except OSError as err:
            raise ConfigError(f"state: cannot open alert state {path}: {err}") from err

    # --- decisions (main thread) -------------------------------------------------------

    def decided(self, rule: str, sensor_id: str, event_id: str, phase: str) -> bool | None:
        """None if never judged, else whether the rule fired."""
        row = self._conn.execute(
            "SELECT fired FROM decisions WHERE rule=? AND sensor_id=? AND event_id=? AND "
            "phase=?", (rule, sensor_id, event_id, phase)).fetchone()
        return None if row is None else bool(row[0])

    def last_fired(self, rule: str, sensor_id: str, label: str) -> float | None:
        row = self._conn.execute(
            "SELECT last_time FROM cooldowns WHERE rule=? AND sensor_id=? AND label=?",
            (rule, sensor_id, label)).fetchone()
        return None if row is None else float(row[0])

    def decide(self, *, rule: str, sensor_id: str, event_id: str, phase: str, label: str,
               fired: bool, at: float, event_time: float, items: list[Item]) -> None:
        """Record a decision and its actions atomically (all or nothing, durable)."""
        with self._tx():
            self._conn.execute("INSERT OR IGNORE INTO decisions VALUES (?, ?, ?, ?, ?, ?)",
                               (rule, sensor_id, event_id, phase, int(fired), at))
            if fired and phase == "start":
                self._conn.execute(
                    "INSERT INTO cooldowns VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                    "last_time = max(last_time, excluded.last_time)",
                    (rule, sensor_id, label, event_time))
            self._conn.executemany(
                "INSERT OR IGNORE INTO outbox (key, kind, action, sensor_id, event_id, phase, "
                "payload, created, next_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(i.key, i.kind, i.action, i.sensor_id, i.event_id, i.phase,
                  json.dumps(i.payload), at, i.next_at, i.expires_at) for i in items])

    def cursor(self, sensor_id: str) -> tuple[int, str] | None:
        row = self._conn.execute("SELECT seq, source FROM cursors WHERE sensor_id=?",
                                 (sensor_id,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def cursors(self) -> dict[str, tuple[int, str]]:
        return {r[0]: (int(r[1]), str(r[2]))
                for r in self._conn.execute("SELECT sensor_id, seq, source FROM cursors")}

    def set_cursor(self, sensor_id: str, source: str, seq: int, *,
                   epoch: str | None = None) -> None:
        """Every event of `sensor_id` up to `seq` has been judged (of journal `epoch`)."""
        self._conn.execute(
            "INSERT INTO cursors VALUES (?, ?, ?, ?) ON CONFLICT(sensor_id) DO UPDATE SET "
            "source = excluded.source, seq = max(seq, excluded.seq), "
            "epoch = coalesce(excluded.epoch, epoch)", (sensor_id, source, seq, epoch))

    def epoch(self, sensor_id: str) -> str | None:
        """The journal epoch the sensor's cursor belongs to (None: not known)."""
        row = self._conn.execute("SELECT epoch FROM cursors WHERE sensor_id=?",
                                 (sensor_id,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def reset_cursor(self, sensor_id: str, source: str, *, epoch: str | None) -> None:
        """The sensor's journal was reset: its cursor starts over at 0 in `epoch`."""
        self._conn.execute(
            "INSERT INTO cursors VALUES (?, ?, 0, ?) ON CONFLICT(sensor_id) DO UPDATE SET "
            "source = excluded.source, seq = 0, epoch = excluded.epoch",
            (sensor_id, source, epoch))

    def ack(self, event_id: str, *, at: float, by: str) -> int:
        """Acknowledge an event: its pending escalations are cancelled; returns how many."""
        with self._tx():
            self._conn.execute("INSERT OR IGNORE INTO acks VALUES (?, ?, ?)", (event_id, at, by))
            return self._conn.execute(
                "UPDATE outbox SET state='cancelled', done_at=? WHERE event_id=? AND "
                "kind='escalation' AND state='pending'", (at, event_id)).rowcount

    # --- delivery (dispatcher thread) --------------------------------------------------

    def due(self, now: float, *, limit: int, busy: set[str],
            skip_actions: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        """Pending rows whose time has come, oldest first, skipping those in flight and
        those of `skip_actions` (destinations with no free worker)."""
        self._conn.execute(
            "UPDATE outbox SET state='cancelled', done_at=? WHERE state='pending' AND "
            "kind='escalation' AND event_id IN (SELECT event_id FROM acks)", (now,))
        self._conn.execute("UPDATE outbox SET state='expired', done_at=? WHERE "
                           "state='pending' AND expires_at < ?", (now, now))
        skip = ",".join("?" * len(skip_actions))
        rows = self._conn.execute(
            "SELECT key, kind, action, payload, attempts, expires_at FROM outbox WHERE "
            f"state='pending' AND next_at <= ? AND action NOT IN ({skip}) "
            "ORDER BY next_at LIMIT ?", (now, *sorted(skip_actions), limit + len(busy))).fetchall()
        out = [{"key": r[0], "kind": r[1], "action": r[2], "payload": json.loads(r[3]),
                "attempts": r[4], "expires_at": r[5]} for r in rows if r[0] not in busy]
        return out[:limit]

    def next_due(self) -> float | None:
        row = self._conn.execute(
            "SELECT min(next_at) FROM outbox WHERE state='pending'").fetchone()
        return None if row[0] is None else float(row[0])

    def attempts(self, key: str) -> int:
        row = self._conn.execute("SELECT attempts FROM outbox WHERE key=?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def delivered(self, key: str, *, now: float) -> None:
        self._conn.execute("UPDATE outbox SET state='delivered', attempts=attempts+1, "
                           "done_at=?, last_error=NULL WHERE key=?", (now, key))

    def failed(self, key: str, *, now: float, error: str, retry_at: float) -> str:
        """Count a failed attempt; retry at `retry_at`, or expire past the deadline."""
        row = self._conn.execute("SELECT expires_at FROM outbox WHERE key=?", (key,)).fetchone()
        state = "expired" if row is None or retry_at > row[0] else "pending"
        self._conn.execute(
            "UPDATE outbox SET state=?, attempts=attempts+1, next_at=?, last_error=?, "
            "done_at=CASE WHEN ?='expired' THEN ? ELSE NULL END WHERE key=?",
            (state, retry_at, error[:500], state, now, key))
        return state

    def prune(self, *, before: float) -> int:
        """Forget finished rows and decisions older than `before`."""
        with self._tx():
            n = self._conn.execute("DELETE FROM outbox WHERE state != 'pending' AND done_at < ?",
                                   (before,)).rowcount
            self._conn.execute("DELETE FROM decisions WHERE at < ?", (before,))
        return int(n)

    def pending_by_action(self) -> dict[str, int]:
        """Rows still to deliver (due now or later), per action (`rule/action`)."""
        return {r[0]: int(r[1]) for r in self._conn.execute(
            "SELECT action, count(*) FROM outbox WHERE state = 'pending' GROUP BY action")}

    def counts(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in
                self._conn.execute("SELECT state, count(*) FROM outbox GROUP BY state")}

    def rows(self) -> list[dict[str, Any]]:
        cur = self._conn.execute("SELECT key, kind, action, state, attempts, last_error "
                                 "FROM outbox ORDER BY created")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur]

    def _tx(self) -> _Tx:
        return _Tx(self._conn)

    def close(self) -> None:
        self._conn.close()


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self._conn.execute("ROLLBACK" if kind is not None else "COMMIT")
