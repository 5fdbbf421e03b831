"""What the dashboard knows: a pure state object fed wire messages, with `now` passed in.

No sockets, no terminal, no clock: `DashboardState.ingest(frames, now=...)` decodes one
``[topic, json]`` message and updates the per-sensor view model, so every transition
(stale, offline, event highlighting, filters) is testable with a fake clock. `now` is
the dashboard's monotonic receive time; liveness is judged by when *we* last heard a
sensor, never by the sensor's own clock (sensor clocks may be off).

Machine health (``anomaly.<machine>`` topics) is kept per sensor and machine. Anything that
does not decode (including message types newer than this dashboard) is counted in
`decode_errors`, never raised.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from monitor.errors import MessageError
from monitor.protocol.messages import Anomaly, Event, Level, Message, Scores, Status, decode

logger = logging.getLogger(__name__)

MEL_HISTORY = 240
"""Level frames kept per sensor for the spectrogram (24 s at 10/s; wider than any screen)."""
EVENT_LOG = 500
PEAK_HOLD_S = 2.0


@dataclass
class LoggedEvent:
    """One row of the event log; the start and end phases of an event share a row."""

    sensor_id: str
    event_id: str
    label: str
    onset_time: float
    peak_score: float
    threshold: float
    received: float
    """Monotonic `now` when the row was created (drives the "new" highlight)."""
    duration_s: float | None = None
    """None while the event is still going on, or when its end is unknown (`end_reason`)."""
    ended: bool = False
    end_reason: str | None = None
    """Why an end came without a known offset, e.g. "restart" (see `Event.reason`)."""
    machine: str | None = None
    """For machine-fault events: which machine."""


@dataclass
class MachineHealth:
    machine: str
    score: float
    threshold: float
    """Alarm level, in the units of `score` (not necessarily 0..1)."""
    running: bool
    received: float


@dataclass
class SensorState:
    """Everything shown for one sensor; plain values, updated in place."""

    sensor_id: str
    first_seen: float
    last_message: float
    last_status: float | None = None
    status: Status | None = None
    rms_dbfs: float | None = None
    peak_dbfs: float | None = None
    peak_hold_dbfs: float | None = None
    peak_hold_at: float = 0.0
    mel: deque[list[float]] = field(default_factory=lambda: deque(maxlen=MEL_HISTORY))
    top: list[tuple[str, float, float | None]] = field(default_factory=list)
    machines: dict[str, MachineHealth] = field(default_factory=dict)
    last_event: LoggedEvent | None = None
    last_seq: int | None = None
    lost: int = 0
    """Messages missing from the seq sequence (lost to a full queue or the network)."""


class DashboardState:
    """Per-sensor state, the event log, filters and liveness, from decoded messages."""

    def __init__(self, *, stale_s: float = 15.0, offline_s: float = 60.0,
                 highlight_s: float = 5.0, peak_hold_s: float = PEAK_HOLD_S) -> None:
        if not 0 < stale_s < offline_s:
            raise ValueError(f"need 0 < stale_s < offline_s, got {stale_s} and {offline_s}")
        self.stale_s = stale_s
        self.offline_s = offline_s
        self.highlight_s = highlight_s
        self.peak_hold_s = peak_hold_s
        self.sensors: dict[str, SensorState] = {}
        self.events: deque[LoggedEvent] = deque(maxlen=EVENT_LOG)
        """Oldest first; `visible_events` gives the newest-first, filtered view."""
        self._by_id: dict[tuple[str, str], LoggedEvent] = {}
        self.classes: set[str] = set()
        self.received = 0
        self.decode_errors = 0
        self.bad_messages: Counter[str] = Counter()
        """`decode_errors` by reason (frames, too_large, not_json, version, schema, topic)."""
        self.last_decode_error: str | None = None
        self.class_filter: str | None = None
        self.sensor_filter: str | None = None
        self.paused = False
        self.detail: bool | None = None
        """None: automatic (detail when one sensor is known or a sensor filter is set)."""

    # -- feeding ---------------------------------------------------------------------------

    def ingest(self, frames: list[bytes], *, now: float) -> bool:
        """Decode and apply one message; a bad one is counted and ignored. True if applied."""
        try:
            message = decode(frames)
        except MessageError as err:
            self.decode_errors += 1
            self.bad_messages[err.reason] += 1
            self.last_decode_error = str(err)
            logger.debug("dropped a bad message: %s", err)
            return False
        self.apply(message, now=now)
        return True

    def apply(self, message: Message, *, now: float) -> None:
        """Apply an already decoded message."""
        sensor = self._touch(message.sensor_id, message.seq, now=now)
        if isinstance(message, Level):
            self._apply_level(sensor, message, now=now)
        elif isinstance(message, Scores):
            sensor.top = [(str(row[0]), float(row[1]),
                           None if row[2] is None else float(row[2])) for row in message.top]
            self.classes.update(name for name, _, _ in sensor.top)
        elif isinstance(message, Status):
            sensor.status = message
            sensor.last_status = now
        elif isinstance(message, Event):
            self._apply_event(sensor, message, now=now)
        elif isinstance(message, Anomaly):
            sensor.machines[message.machine] = MachineHealth(
                message.machine, message.score, message.threshold, message.running, now)

    def _touch(self, sensor_id: str, seq: int, *, now: float) -> SensorState:
        self.received += 1
        sensor = self.sensors.get(sensor_id)
        if sensor is None:
            sensor = self.sensors[sensor_id] = SensorState(sensor_id, first_seen=now,
                                                          last_message=now)
        sensor.last_message = now
        if sensor.last_seq is not None and seq > sensor.last_seq + 1:
            sensor.lost += seq - sensor.last_seq - 1
        sensor.last_seq = seq  # a smaller seq means the daemon restarted: start over
        return sensor

    def _apply_level(self, sensor: SensorState, level: Level, *, now: float) -> None:
        sensor.rms_dbfs = level.rms_dbfs
        sensor.peak_dbfs = level.peak_dbfs
        held = sensor.peak_hold_dbfs
        if held is None or level.peak_dbfs >= held or now - sensor.peak_hold_at > self.peak_hold_s:
            sensor.peak_hold_dbfs = level.peak_dbfs
            sensor.peak_hold_at = now
        sensor.mel.append(level.mel)

    def _apply_event(self, sensor: SensorState, event: Event, *, now: float) -> None:
        self.classes.add(event.label)
        key = (event.sensor_id, event.event_id)
        row = self._by_id.get(key)
        if row is None:  # a start, or an end whose start we missed
            row = LoggedEvent(event.sensor_id, event.event_id, event.label, event.onset_time,
                              event.peak_score, event.threshold, received=now,
                              machine=event.machine)
            if len(self.events) == self.events.maxlen:
                oldest = self.events[0]
                self._by_id.pop((oldest.sensor_id, oldest.event_id), None)
            self.events.append(row)
            self._by_id[key] = row
        row.peak_score = max(row.peak_score, event.peak_score)
        if event.phase == "end":
            row.ended = True
            row.end_reason = event.end_reason
            if event.offset_s is not None:
                row.duration_s = event.offset_s - event.onset_s
        sensor.last_event = row

    # -- reading ---------------------------------------------------------------------------

    def health(self, sensor: SensorState, *, now: float) -> str:
        """STOPPED after a final status; OFFLINE / STALE when silent longer than the limits;
        otherwise the daemon's own state (RUNNING, DEGRADED), or LIVE before its first status."""
        if sensor.status is not None and sensor.status.state == "stopped":
            return "STOPPED"
        silent = now - sensor.last_message
        if silent > self.offline_s:
            return "OFFLINE"
        if silent > self.stale_s:
            return "STALE"
        return sensor.status.state.upper() if sensor.status is not None else "LIVE"

    def sensor_ids(self) -> list[str]:
        return sorted(self.sensors)

    def visible_sensors(self) -> list[SensorState]:
        if self.sensor_filter is not None:
            chosen = self.sensors.get(self.sensor_filter)
            return [chosen] if chosen is not None else []
        return [self.sensors[s] for s in self.sensor_ids()]

    def visible_events(self) -> list[LoggedEvent]:
        """Newest first, after the class and sensor filters."""
        return [e for e in reversed(self.events)
                if (self.class_filter is None or e.label == self.class_filter)
                and (self.sensor_filter is None or e.sensor_id == self.sensor_filter)]

    def is_new(self, event: LoggedEvent, *, now: float) -> bool:
        return now - event.received < self.highlight_s

    def show_detail(self) -> bool:
        if self.detail is not None:
            return self.detail
        return self.sensor_filter is not None or len(self.sensors) == 1

    def detail_sensor(self) -> SensorState | None:
        if self.sensor_filter is not None:
            return self.sensors.get(self.sensor_filter)
        ids = self.sensor_ids()
        return self.sensors[ids[0]] if ids else None

    # -- keys --------------------------------------------------------------------------------

    def cycle_class_filter(self) -> None:
        self.class_filter = _next(self.class_filter, sorted(self.classes))

    def cycle_sensor_filter(self) -> None:
        self.sensor_filter = _next(self.sensor_filter, self.sensor_ids())

    def select_sensor(self, index: int) -> None:
        """Show sensor number `index` (1-based, list order) in the detail view."""
        ids = self.sensor_ids()
        if 1 <= index <= len(ids):
            self.sensor_filter = ids[index - 1]
            self.detail = True

    def toggle_detail(self) -> None:
        self.detail = not self.show_detail()

    def toggle_pause(self) -> None:
        self.paused = not self.paused


def _next(current: str | None, options: Iterable[str]) -> str | None:
    """None -> first -> ... -> last -> None."""
    cycle: list[str | None] = [None, *options]
    try:
        return cycle[(cycle.index(current) + 1) % len(cycle)]
    except ValueError:  # the current choice disappeared
        return None

