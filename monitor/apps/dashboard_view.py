"""What the dashboard draws: level meters, the spectrogram, scores, health, the sensor and event
tables, and the whole screen, from a `DashboardState` (pure: no I/O, the time passed in).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.layout import Layout
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

from monitor.apps.dashboard_state import DashboardState, LoggedEvent, SensorState

LEVEL_FLOOR_DB = -60.0
"""Left end of the level meters; quieter input shows an empty bar."""
MEL_RANGE = (-6.5, 2.5)
"""Natural-log mel values mapped onto the shade ramp (what the front end produces for
silence .. a loud close source); fixed, so a column keeps its look as it scrolls."""
SHADES = " ░░▒▒▓▓██"
COLOURS = ("grey15", "dark_blue", "blue", "purple", "magenta", "red", "dark_orange", "yellow",
           "bright_white")
_SHADE_STYLES = [Style(color=c) for c in COLOURS]
HEALTH_STYLES = {
    "RUNNING": "bold green", "LIVE": "bold green", "DEGRADED": "bold yellow",
    "STALE": "bold black on yellow", "OFFLINE": "bold white on red", "STOPPED": "dim",
}
KEYS_HELP = "q quit  p pause  c class filter  s sensor filter  d/Enter detail/list  1-9 sensor"


# -- pieces ------------------------------------------------------------------------------------


def _ago(now: float, then: float | None) -> str:
    return "-" if then is None else f"{max(0.0, now - then):.1f}s"


def _bar(fraction: float, width: int, *, style: str, marker: float | None = None,
         marker_style: str = "bold white") -> Text:
    """A horizontal bar `width` cells wide, filled to `fraction`, with an optional marker."""
    width = max(1, width)
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    text = Text("█" * filled, style=style)
    text.append("─" * (width - filled), style="grey35")
    if marker is not None:
        at = min(width - 1, max(0, round(marker * width)))
        text = text[:at] + Text("┃", style=marker_style) + text[at + 1:]
    return text


def _level_fraction(dbfs: float | None) -> float:
    return 0.0 if dbfs is None else (dbfs - LEVEL_FLOOR_DB) / -LEVEL_FLOOR_DB


def _level_style(dbfs: float | None) -> str:
    if dbfs is None or dbfs < -18:
        return "green"
    return "yellow" if dbfs < -6 else "red"


def _db(value: float | None) -> str:
    return "   -  " if value is None else f"{value:6.1f}"


def level_meter(sensor: SensorState, width: int) -> Text:
    """RMS bar with the held peak marked, then the numbers."""
    numbers = (f" rms {_db(sensor.rms_dbfs)} dBFS  peak {_db(sensor.peak_dbfs)}"
               f"  hold {_db(sensor.peak_hold_dbfs)}")
    text = Text("level ", style="bold")
    hold = sensor.peak_hold_dbfs
    text.append_text(_bar(_level_fraction(sensor.rms_dbfs), width - len(numbers) - 6,
                          style=_level_style(sensor.rms_dbfs),
                          marker=None if hold is None else _level_fraction(hold)))
    text.append(numbers)
    return text


class Spectrogram:
    """The last published mel frames as shaded, coloured cells; newest column at the right,
    low bands at the bottom. One column per `level` message, so it scrolls as audio flows."""

    def __init__(self, frames: Sequence[list[float]], *, rows: int) -> None:
        self.frames = frames
        self.rows = rows

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        frames = list(self.frames)[-width:] if width > 0 else []
        pad = width - len(frames)
        if frames:
            mel = np.asarray(frames, dtype=np.float64)
            edges = np.linspace(0, mel.shape[1], self.rows + 1).astype(int)
            bands = np.add.reduceat(mel, edges[:-1], axis=1) / np.diff(edges)
            lo, hi = MEL_RANGE
            scaled = np.clip((bands - lo) / (hi - lo) * len(SHADES), 0, len(SHADES) - 1)
            levels = scaled.astype(np.int64).T[::-1]  # rows top (high bands) to bottom
        for row in range(self.rows):
            if pad:
                yield Segment(" " * pad)
            if frames:
                yield from _runs(levels[row])
            yield Segment.line()


def _runs(levels: np.ndarray) -> Iterator[Segment]:
    """Consecutive equal levels as one segment each (few segments, low CPU)."""
    change = np.flatnonzero(np.diff(levels)) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [levels.size]))
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        level = int(levels[start])
        yield Segment(SHADES[level] * (end - start), _SHADE_STYLES[level])


def score_lines(sensor: SensorState, width: int) -> list[Text]:
    """One bar per class score, the event threshold marked with ┃."""
    lines = []
    for name, score, threshold in sensor.top:
        above = threshold is not None and score >= threshold
        tail = f" {score:4.2f}" + (f" thr {threshold:.2f}" if threshold is not None else "")
        line = Text(f"{name[:14]:<14} ", style="bold red" if above else "")
        line.append_text(_bar(score, width - 15 - len(tail) - 2,
                              style="red" if above else "cyan", marker=threshold))
        line.append(tail + (" ◀" if above else ""), style="bold red" if above else "")
        lines.append(line)
    return lines


def machine_lines(sensor: SensorState, width: int) -> list[Text]:
    """Machine health: anomaly scores have their own units, so the bar puts the alarm
    threshold at its middle."""
    lines = []
    for name in sorted(sensor.machines):
        m = sensor.machines[name]
        above = m.running and m.score >= m.threshold
        scale = 2 * m.threshold if m.threshold > 0 else 1.0
        tail = f" {m.score:5.2f} thr {m.threshold:.2f}" + ("" if m.running else " idle")
        line = Text(f"{('⚙ ' + name)[:14]:<14} ", style="bold red" if above else "")
        line.append_text(_bar(m.score / scale, width - 15 - len(tail) - 2,
                              style="red" if above else "magenta" if m.running else "grey50",
                              marker=m.threshold / scale))
        line.append(tail + (" ◀" if above else ""), style="bold red" if above else "")
        lines.append(line)
    return lines


def health_label(state: DashboardState, sensor: SensorState, now: float) -> Text:
    health = state.health(sensor, now=now)
    return Text(f" {health} ", style=HEALTH_STYLES.get(health, ""))


def health_line(state: DashboardState, sensor: SensorState, now: float) -> Text:
    status = sensor.status
    counters = status.counters if status is not None else {}
    parts = [f"infer {status.inference_ms_p50:.1f}/{status.inference_ms_max:.1f}ms"
             if status is not None else "infer -",
             f"overrun {counters.get('overrun_samples', '-')}",
             f"dropped {counters.get('publish_dropped', '-')}",
             f"lost {sensor.lost}",
             f"overflow {counters.get('input_overflow', '-')}",
             f"reconnect {counters.get('reconnects', '-')}",
             f"nonfinite {counters.get('nonfinite_samples', '-')}"]
    text = Text("  ".join(parts))
    problems = sensor.lost + sum(int(counters.get(k, 0)) for k in
                                 ("overrun_samples", "publish_dropped", "input_overflow"))
    if problems:
        text.stylize("yellow")
    return text


def sensor_title(state: DashboardState, sensor: SensorState, now: float) -> Text:
    text = Text(sensor.sensor_id, style="bold reverse")
    text.append(" ")
    text.append_text(health_label(state, sensor, now))
    text.append(f"  msg {_ago(now, sensor.last_message)} ago"
                f" · heartbeat {_ago(now, sensor.last_status)} ago")
    if sensor.status is not None:
        text.append(f" · up {sensor.status.uptime_s:.0f}s · {sensor.status.source}", style="dim")
    return text


def detail_lines(state: DashboardState, sensor: SensorState, now: float, *, width: int,
                 spec_rows: int) -> list[RenderableType]:
    lines: list[RenderableType] = [sensor_title(state, sensor, now), level_meter(sensor, width),
                                   Spectrogram(sensor.mel, rows=spec_rows)]
    lines += score_lines(sensor, width)
    lines += machine_lines(sensor, width)
    lines.append(health_line(state, sensor, now))
    if sensor.status is not None and sensor.status.last_error:
        lines.append(Text(f"last error: {sensor.status.last_error}", style="yellow"))
    for line in lines:  # one terminal row each: the layout counts on it
        if isinstance(line, Text):
            line.no_wrap, line.overflow = True, "ellipsis"
    return lines


def sensor_table(state: DashboardState, now: float, *, width: int,
                 max_rows: int | None = None) -> Table:
    """The many-sensors view: one line per sensor."""
    sensors = state.visible_sensors()
    table = Table(box=None, padding=(0, 1), expand=True, show_edge=False)
    table.add_column("#", justify="right", style="dim", no_wrap=True)
    table.add_column("sensor", no_wrap=True, overflow="ellipsis",
                     width=min(20, max((len(s.sensor_id) for s in sensors), default=6)))
    table.add_column("state", no_wrap=True, width=9)
    table.add_column("level", no_wrap=True)
    table.add_column("dBFS", justify="right", no_wrap=True, width=6)
    table.add_column("top class", no_wrap=True, overflow="ellipsis", ratio=1)
    table.add_column("last event", no_wrap=True, overflow="ellipsis", ratio=1)
    table.add_column("heard", justify="right", no_wrap=True, width=6)
    shown = sensors if max_rows is None or len(sensors) <= max_rows else sensors[:max_rows - 1]
    bar_width = 10 if width < 100 else 16
    for number, sensor in enumerate(shown, start=1):
        top = ""
        if sensor.top:
            name, score, _ = sensor.top[0]
            top = f"{name} {score:.2f}"
        event = sensor.last_event
        last = "" if event is None else (f"{event.label} {event.peak_score:.2f} "
                                         f"{_clock(event.onset_time)}")
        table.add_row(str(number), sensor.sensor_id, health_label(state, sensor, now),
                      _bar(_level_fraction(sensor.rms_dbfs), bar_width,
                           style=_level_style(sensor.rms_dbfs),
                           marker=None if sensor.peak_hold_dbfs is None
                           else _level_fraction(sensor.peak_hold_dbfs)),
                      _db(sensor.rms_dbfs), top,
                      Text(last, style="bold yellow" if event is not None
                           and state.is_new(event, now=now) else ""),
                      _ago(now, sensor.last_message))
    if len(shown) < len(sensors):
        table.add_row("", f"+{len(sensors) - len(shown)}", "more", "", "",
                      "s: one sensor", "1-9: detail")
    return table


def event_table(state: DashboardState, now: float, *, max_rows: int | None = None) -> Table:
    """Newest first; rows younger than `highlight_s` are marked ● and highlighted."""
    table = Table(box=None, padding=(0, 1), expand=True, show_edge=False)
    for name in ("", "time", "sensor", "class", "score", "duration"):
        table.add_column(name, justify="right" if name in ("score", "duration") else "left",
                         no_wrap=True, overflow="ellipsis",
                         ratio=1 if name in ("sensor", "class") else None)
    events = state.visible_events()
    if max_rows is not None:
        events = events[:max(0, max_rows)]
    for event in events:
        new = state.is_new(event, now=now)
        table.add_row(*_event_cells(event, new=new),
                      style="bold black on yellow" if new else None)
    return table


def _clock(unix_time: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix_time))


def _event_cells(event: LoggedEvent, *, new: bool) -> list[str]:
    clock = _clock(event.onset_time)
    if event.duration_s is not None:
        duration = f"{event.duration_s:.2f}s"
    else:
        duration = f"ended ({event.end_reason})" if event.ended else "ongoing"
    label = event.label if event.machine is None else f"{event.label} ({event.machine})"
    return ["●" if new else " ", clock, event.sensor_id, label,
            f"{event.peak_score:.2f}", duration]


def header(state: DashboardState, now: float, endpoints: Sequence[str]) -> Text:
    counts: dict[str, int] = {}
    for sensor in state.sensors.values():
        health = state.health(sensor, now=now)
        counts[health] = counts.get(health, 0) + 1
    text = Text("audio-monitor dashboard", style="bold cyan")
    text.append(f"  {len(state.sensors)} sensor(s)")
    for health in sorted(counts):
        text.append(" ")
        text.append(f"{counts[health]} {health.lower()}", style=HEALTH_STYLES.get(health, ""))
    text.append(f"  msgs {state.received}")
    if state.decode_errors:
        reasons = ", ".join(f"{r} {n}" for r, n in state.bad_messages.most_common())
        text.append(f"  bad {state.decode_errors} ({reasons})", style="yellow")
    if state.class_filter or state.sensor_filter:
        text.append(f"  filter class={state.class_filter or '*'} sensor="
                    f"{state.sensor_filter or '*'}", style="bold magenta")
    if state.paused:
        text.append("  PAUSED", style="bold black on white")
    text.append("  " + " ".join(endpoints), style="dim")
    return text


def events_title(state: DashboardState) -> Text:
    text = Text("events", style="bold")
    text.append(" newest first", style="dim")
    if state.class_filter or state.sensor_filter:
        text.append(f" (class={state.class_filter or '*'}, sensor={state.sensor_filter or '*'})",
                    style="magenta")
    return text


# -- whole views ---------------------------------------------------------------------------------


def _one_row(text: Text) -> Text:
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


def render_screen(state: DashboardState, now: float, endpoints: Sequence[str], *, width: int,
                  height: int) -> Layout:
    """The live view, sized to the terminal: header, sensors, events, keys."""
    layout = Layout()
    body_height = max(3, height - 2)
    detail = state.detail_sensor() if state.show_detail() else None
    if detail is not None:
        fixed = 4 + len(detail.top) + len(detail.machines) + (
            1 if detail.status is not None and detail.status.last_error else 0)
        spec_rows = max(2, min(8, body_height - fixed - 6))
        upper: RenderableType = Group(*detail_lines(state, detail, now, width=width,
                                                    spec_rows=spec_rows))
        upper_height = min(body_height - 2, fixed + spec_rows - 1)
    else:
        rows = max(2, min(len(state.visible_sensors()) + 1, body_height * 2 // 3))
        upper = (sensor_table(state, now, width=width, max_rows=rows - 1) if state.sensors
                 else Text(f"waiting for messages from {', '.join(endpoints)} …", style="dim"))
        upper_height = rows
    events_height = max(1, body_height - upper_height)
    layout.split_column(
        Layout(_one_row(header(state, now, endpoints)), name="header", size=1),
        Layout(upper, name="sensors", size=upper_height),
        Layout(Group(_one_row(events_title(state)),
                     event_table(state, now, max_rows=events_height - 2)),
               name="events", size=events_height),
        Layout(_one_row(Text(KEYS_HELP, style="dim")), name="keys", size=1),
    )
    return layout


def render_snapshot(state: DashboardState, now: float, endpoints: Sequence[str], *,
                    width: int, max_events: int = 50) -> Group:
    """The `--once` view: every sensor and the event log at their natural height."""
    parts: list[RenderableType] = [header(state, now, endpoints)]
    if not state.sensors:
        parts.append(Text(f"no messages from {', '.join(endpoints)}"))
    elif state.show_detail() or len(state.sensors) <= 3:
        for sensor in state.visible_sensors():
            parts += detail_lines(state, sensor, now, width=width, spec_rows=8)
    else:
        parts.append(sensor_table(state, now, width=width))
    parts += [events_title(state), event_table(state, now, max_rows=max_events)]
    return Group(*parts)
