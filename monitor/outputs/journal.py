"""Durable event journal: every event is on disk, with its `seq`, before it is published.

SQLite in WAL mode with ``synchronous=FULL``: once `append` returns, the event survives
a crash or a power cut. Only events are journaled (a few per minute), never levels or
scores, so the processing thread pays one fsync per event and nothing per hop.

The journal also keeps `seq` monotonic across restarts. `seq` counts every message
(levels too), so instead of writing each one the publisher *reserves* blocks of
numbers (`reserve`) and a restart starts after the highest reserved number. Subscribers
see that jump as a gap, ask the catch-up endpoint, and get exactly the events they
missed, none of the never-sent numbers.

The journal also knows which events are open (a `start` without its `end`), so a
daemon that was killed (kill -9, power cut) closes them when it starts again: see
`Publisher.close_open_events`.

One connection per thread: the publisher's thread writes, the catch-up thread opens
its own read connection (`JournalReader`).

Failures never end the daemon. A journal that cannot be written (read-only, disk full)
is counted (`journal_errors`) and named in `last_error` (status `degraded`); events are
still published, and writing resumes by itself once the cause is gone. A journal that
cannot be opened or created at start (permissions, a full disk, a read-only directory) is
the same: the daemon starts `degraded` without it and opens it once it can, retrying with
backoff (1 s doubling to 60 s); meanwhile `seq` starts at the wall clock in milliseconds,
above the numbers any journal-backed run of this sensor used. A damaged file is
moved aside (`journal.db.damaged-TIME`) with one warning and a fresh journal started; it
gets a new `epoch` (a random id kept in the file, sent in every catch-up reply), so a
subscriber whose cursor belongs to the old journal starts over instead of waiting for
`seq` to pass it.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from monitor.errors import ConfigError

logger = logging.getLogger(__name__)

SEQ_BLOCK = 100_000
"""Sequence numbers reserved per journal write: at ~25 messages/s, one write an hour."""
PRUNE_EVERY = 256
"""Appends between two age/size checks."""
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
"""Backoff between attempts to open a journal that could not be opened: doubling, capped."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    sensor_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    topic BLOB NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (sensor_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE TABLE IF NOT EXISTS seq_reserved (
    sensor_id TEXT PRIMARY KEY,
    high INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS open_events (
    sensor_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    topic BLOB NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (sensor_id, event_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def move_aside(path: Path, reason: str) -> Path:
    """Rename a damaged SQLite file (and its -wal/-shm) to PATH.damaged-TIME; returns it."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            side.rename(Path(f"{target}{suffix}"))
    logger.warning("%s is damaged (%s): moved it to %s and started a fresh one", path, reason,
                   target.name)
    return target


def is_damage(err: sqlite3.Error) -> bool:
    """True for a damaged file (not a permission or locking problem)."""
    text = str(err).lower()
    return type(err) is sqlite3.DatabaseError or "malformed" in text or "not a database" in text


def _open(path: Path, *, readonly: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10,
                               isolation_level=None, check_same_thread=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=10, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=10000")
        if not readonly:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed ({check})")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)",
                         (uuid.uuid4().hex[:16],))
        conn.execute("PRAGMA synchronous=FULL")
    except BaseException:
        conn.close()
        raise
    return conn


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the journal; a damaged one is moved aside and a fresh one started (writer)."""
    try:
        try:
            return _open(path, readonly=readonly)
        except sqlite3.DatabaseError as err:
            if readonly or not is_damage(err):
                raise
            move_aside(path, str(err))
            return _open(path, readonly=readonly)
    except (sqlite3.Error, OSError) as err:
        raise ConfigError(f"journal: cannot open {path}: {err}; make state_dir "
                          f"({path.parent}) writable by the daemon's user, or set another "
                          "state_dir") from err


def read_epoch(conn: sqlite3.Connection) -> str | None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
    except sqlite3.OperationalError:  # a journal from before epochs, opened read-only
        return None
    return None if row is None else str(row[0])


class Journal:
    """Writer side of the journal; one instance per process, used from one thread.

    A journal that cannot be opened is not an error here: `last_error` says why and what
    to do, writes are counted as `errors`, and `ready()` opens it once it can (backoff).
    `clock` (monotonic seconds) times the retries.
    """

    def __init__(self, path: Path, *, max_age_days: float, max_mb: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.max_age_s = max_age_days * 86400.0
        self.max_bytes = int(max_mb * 1024 * 1024)
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self.epoch: str | None = None
        """Random id of this journal file; a new file (reset, moved aside) has a new one."""
        self.generation = 0
        """+1 each time the file is opened: a user that read `start_seq` reads it again."""
        self._appends = 0
        self.written = 0
        self.errors = 0
        self.last_error: str | None = None
        """Why the latest open or write failed, and what to do; None once one succeeds."""
        self._retry_s = RETRY_FIRST_S
        self._retry_at = 0.0
        self._open()

    def _open(self) -> bool:
        try:
            conn = _connect(self.path)
        except ConfigError as err:
            self.errors += 1
            first = self.last_error is None
            self.last_error = (f"journal {self.path}: cannot open it ({err.__cause__}); events "
                               "are published but not kept for catch-up until it opens: make "
                               f"{self.path.parent} writable by the daemon's user and free disk "
                               f"space there, or set another state_dir (retrying, every "
                               f"{RETRY_MAX_S:.0f} s at most)")
            self._retry_at = self._clock() + self._retry_s
            self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
            if first:
                logger.error("%s", self.last_error)
            return False
        self._conn, self.epoch = conn, read_epoch(conn)
        self.generation += 1
        self._retry_s = RETRY_FIRST_S
        if self.last_error is not None:
            logger.warning("journal %s is open again", self.path)
            self.last_error = None
        self.prune()
        return True

    def ready(self) -> bool:
        """True when the file is open; if it is not, tries again once the backoff is over."""
        if self._conn is not None:
            return True
        return self._clock() >= self._retry_at and self._open()

    def start_seq(self, sensor_id: str) -> int:
        """Last `seq` this sensor may have used: the publisher continues after it. Without
        an open journal: the wall clock in milliseconds (above any journal-backed run's)."""
        if self._conn is None:
            return int(time.time() * 1000)
        row = self._conn.execute(
            "SELECT max(coalesce((SELECT high FROM seq_reserved WHERE sensor_id = ?), 0), "
            "coalesce((SELECT max(seq) FROM events WHERE sensor_id = ?), 0))",
            (sensor_id, sensor_id)).fetchone()
        return int(row[0])

    def reserve(self, sensor_id: str, high: int) -> int:
        """Durably claim every seq up to `high` (a crash never reuses one); returns `high`.

        If the disk refuses, the failure is counted and reported (`last_error`) and `high`
        is returned anyway: this process goes on numbering, a restart may reuse numbers."""
        if not self.ready():
            self.errors += 1
            return high
        assert self._conn is not None
        try:
            self._conn.execute(
                "INSERT INTO seq_reserved (sensor_id, high) VALUES (?, ?) ON CONFLICT(sensor_id) "
                "DO UPDATE SET high = max(high, excluded.high)", (sensor_id, high))
        except sqlite3.Error as err:
            self._failed(f"reserving seq up to {high}", err)
        return high

    def _failed(self, what: str, err: sqlite3.Error) -> None:
        self.errors += 1
        first = self.last_error is None
        self.last_error = (f"journal {self.path}: {what} failed: {err}; events are published "
                           "but not kept for catch-up until it is writable again (free disk "
                           f"space, or make {self.path.parent} writable)")
        if first or self.errors % 1000 == 0:
            logger.error("%s (%d failures so far)", self.last_error, self.errors)

    def append(self, sensor_id: str, seq: int, ts: float, frames: list[bytes], *,
               opens: str | None = None, closes: str | None = None) -> bool:
        """Write one event durably (fsync) before it is sent; False if the disk refused
        (counted and logged: the event is still published). `opens`/`closes`: the event
        id this message starts or ends, kept in the open set in the same transaction."""
        if not self.ready():
            self.errors += 1
            return False
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?, ?)",
                             (sensor_id, seq, ts, frames[0], frames[1]))
                if opens is not None:
                    conn.execute("INSERT OR REPLACE INTO open_events VALUES (?, ?, ?, ?, ?)",
                                 (sensor_id, opens, seq, frames[0], frames[1]))
                if closes is not None:
                    conn.execute("DELETE FROM open_events WHERE sensor_id = ? AND event_id = ?",
                                 (sensor_id, closes))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            self._failed(f"writing {sensor_id} seq {seq}", err)
            return False
        if self.last_error is not None:
            logger.warning("journal %s is writable again", self.path)
            self.last_error = None
        self.written += 1
        self._appends += 1
        if self._appends >= PRUNE_EVERY:
            self._appends = 0
            self.prune()
        return True

    def open_events(self, sensor_id: str) -> list[tuple[bytes, bytes]]:
        """[topic, json] of this sensor's events that started and have not ended, oldest
        first (after a crash: the events it left open)."""
        if self._conn is None:
            return []
        try:
            rows = self._conn.execute("SELECT topic, body FROM open_events WHERE sensor_id = ? "
                                      "ORDER BY seq", (sensor_id,)).fetchall()
        except sqlite3.Error as err:
            logger.error("journal: cannot read open events of %s: %s", sensor_id, err)
            return []
        return [(bytes(topic), bytes(body)) for topic, body in rows]

    def prune(self, *, now: float | None = None) -> int:
        """Drop events older than `max_age_days`, then the oldest until under `max_mb`."""
        now = time.time() if now is None else now
        if self._conn is None:
            return 0
        try:
            removed = self._conn.execute("DELETE FROM events WHERE ts < ?",
                                         (now - self.max_age_s,)).rowcount
            while self._size_bytes() > self.max_bytes:
                count = self._conn.execute("SELECT count(*) FROM events").fetchone()[0]
                if count == 0:
                    break
                removed += self._delete_oldest(max(1, count // 10))
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._conn.execute("VACUUM")
        except sqlite3.Error as err:
            logger.warning("journal prune failed: %s", err)
            return 0
        if removed:
            logger.info("journal: pruned %d old events", removed)
        return removed

    def _delete_oldest(self, n: int) -> int:
        assert self._conn is not None
        rows = self._conn.execute("SELECT sensor_id, seq FROM events ORDER BY ts LIMIT ?",
                                  (n,)).fetchall()
        self._conn.executemany("DELETE FROM events WHERE sensor_id = ? AND seq = ?", rows)
        return len(rows)

    def _size_bytes(self) -> int:
        assert self._conn is not None
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        size = self._conn.execute("PRAGMA page_size").fetchone()[0]
        return int(pages) * int(size)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class JournalReader:
    """Read side: events of one sensor after a given seq, oldest first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = _connect(path, readonly=True)

    @property
    def epoch(self) -> str | None:
        """The journal file's id (None if unreadable); read per request, so a reset shows."""
        try:
            return read_epoch(self._conn)
        except sqlite3.Error:
            return None

    def since(self, sensor_id: str, after_seq: int, *, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to `limit` events of `sensor_id` with seq > `after_seq`, as [topic, json]."""
        rows = self._conn.execute(
            "SELECT topic, body FROM events WHERE sensor_id = ? AND seq > ? ORDER BY seq "
            "LIMIT ?", (sensor_id, after_seq, limit)).fetchall()
        return [(bytes(t), bytes(b)) for t, b in rows]

    def last_seq(self, sensor_id: str) -> int:
        row = self._conn.execute("SELECT max(seq) FROM events WHERE sensor_id = ?",
                                 (sensor_id,)).fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        self._conn.close()
