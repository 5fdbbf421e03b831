"""Stage progress tracking behind the systemd watchdog: ping only while every stage moves.

The processing loop calls `Health.tick` about ten times a second; a loop that hangs
(a stuck inference, a blocked call) therefore stops the pings by itself. `StageWatch`
adds what a running loop can still hide:

- processing: audio waits in the ring but the processed-sample count stands still;
- capture: a file source (must flow until its end) delivers nothing; a microphone or
  stdin that delivers nothing is *degraded*, not hung: the microphone heals itself in
  `poll` (reopen with backoff, counted in `reconnects`) and a silent stdin writer is
  upstream's business. Restarting the process would not bring either back sooner, and
  a restart loop would trip systemd's start limit and stop the service for good;
- publishing: messages are produced but every send fails.

A stage with no progress for `stall_s` is *stalled*: pings stop, `STATUS=` says which
stage, and systemd restarts the service after `WatchdogSec`. Pings resume if it recovers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from monitor.service.sdnotify import Notifier

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "Health", "Progress", "StageWatch"]

STAGES = ("capture", "processing", "publishing")
STATUS_EVERY_S = 2.0


@dataclass(frozen=True)
class Progress:
    """One snapshot of the stages' counters, taken by the processing thread."""

    captured: int
    """Blocks delivered by the source (PortAudio callbacks or reader blocks)."""
    capture_done: bool
    """A finite source has delivered its last block."""
    backlog: int
    """Samples waiting in the ring."""
    ring_capacity: int
    processed: int
    """Samples processed (front-end rate)."""
    sent: int
    """Messages the publisher handed to ZeroMQ."""
    attempts: int
    """Messages the publisher tried to send (sent + dropped)."""


class StageWatch:
    """Remembers when each stage last made progress; time is a parameter (testable)."""

    def __init__(self, *, stall_s: float, capture_may_idle: bool) -> None:
        self.stall_s = stall_s
        self.capture_may_idle = capture_may_idle
        self._last: Progress | None = None
        self._ok_at = dict.fromkeys(STAGES, 0.0)
        self.stalled: tuple[str, ...] = ()
        """Stages without progress for `stall_s` that a restart may cure."""
        self.idle: tuple[str, ...] = ()
        """Stages without progress that are allowed to wait (degraded, not hung)."""

    def update(self, now: float, p: Progress) -> None:
        last = self._last
        if last is None:
            self._ok_at = dict.fromkeys(STAGES, now)
        else:
            processing_ok = p.processed != last.processed or p.backlog == 0
            # A full ring means capture waits for processing (back-pressure): not its fault.
            capture_ok = (p.captured != last.captured or p.capture_done
                          or p.backlog * 2 >= p.ring_capacity)
            publishing_ok = p.sent != last.sent or p.attempts == last.attempts
            for stage, ok in (("capture", capture_ok), ("processing", processing_ok),
                              ("publishing", publishing_ok)):
                if ok:
                    self._ok_at[stage] = now
        self._last = p
        late = tuple(s for s in STAGES if now - self._ok_at[s] > self.stall_s)
        if self.capture_may_idle:
            self.idle = tuple(s for s in late if s == "capture")
            self.stalled = tuple(s for s in late if s != "capture")
        else:
            self.idle, self.stalled = (), late

    def since_progress(self, stage: str, now: float) -> float:
        return now - self._ok_at[stage]


class Health:
    """Turns stage progress into sd_notify messages: READY, WATCHDOG, STATUS, STOPPING."""

    def __init__(self, notifier: Notifier, *, stall_s: float, capture_may_idle: bool) -> None:
        self.notifier = notifier
        self.watch = StageWatch(stall_s=stall_s, capture_may_idle=capture_may_idle)
        self.pings = 0
        self._next_ping = 0.0
        self._next_status = 0.0
        self._reported: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        """`running`, `degraded` (a stage may wait) or `stalled` (watchdog pings withheld)."""
        if self.watch.stalled:
            return "stalled"
        return "degraded" if self.watch.idle else "running"

    def ready(self, status: str) -> None:
        """The model is loaded, kernels are loaded or compiled and the source is started."""
        self.notifier.ready(status)
        logger.debug("READY=1 sent (%s)", status)

    def tick(self, now: float, progress: Progress, describe: Callable[[], str]) -> None:
        """Called from the processing loop; `describe` builds the STATUS= line when needed."""
        watch = self.watch
        watch.update(now, progress)
        if watch.stalled != self._reported:
            if watch.stalled:
                logger.error("stage(s) %s made no progress for %.1f s; watchdog pings withheld",
                             ", ".join(watch.stalled), watch.stall_s)
            elif self._reported:
                logger.warning("stage(s) %s progress again; watchdog pings resume",
                               ", ".join(self._reported))
            self._reported = watch.stalled
            self._next_status = now
        interval = self.notifier.ping_interval_s
        if interval is not None and not watch.stalled and now >= self._next_ping:
            if self.notifier.watchdog():
                self.pings += 1
            self._next_ping = now + interval
        if self.notifier.enabled and now >= self._next_status:
            self.notifier.status(self.status_line(now, describe))
            self._next_status = now + STATUS_EVERY_S

    def status_line(self, now: float, describe: Callable[[], str]) -> str:
        watch = self.watch
        if watch.stalled:
            return "stalled: " + ", ".join(
                f"{s} no progress for {watch.since_progress(s, now):.0f} s" for s in watch.stalled)
        prefix = f"degraded ({', '.join(watch.idle)} idle): " if watch.idle else ""
        return prefix + describe()

    def reloading(self) -> None:
        self.notifier.reloading()

    def reloaded(self, status: str) -> None:
        self.notifier.ready(status)

    def stopping(self, status: str) -> None:
        self.notifier.stopping(status)
