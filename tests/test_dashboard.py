"""The dashboard: its pure state with a fake clock, its rendering at 80x24, a `--once`
snapshot of a real daemon, and the real dashboard in a real terminal (tmux)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest
import soundfile as sf
from rich.console import Console

from monitor.apps.dashboard import handle_key
from monitor.apps.dashboard_state import DashboardState
from monitor.apps.dashboard_view import _event_cells, render_screen, render_snapshot
from monitor.protocol.messages import Anomaly, Event, Level, Message, Scores, Status, decode, encode

RATE = 16000
REPO = Path(__file__).resolve().parents[1]


# -- messages as the daemon encodes them --------------------------------------------------------

class Sensor:
    """Builds real wire frames for one sensor, with its own seq counter."""

    def __init__(self, sensor_id: str) -> None:
        self.sensor_id = sensor_id
        self.seq = 0

    def _next(self) -> dict[str, object]:
        self.seq += 1
        return {"sensor_id": self.sensor_id, "seq": self.seq, "ts": 1_700_000_000.0 + self.seq}

    def level(self, rms: float = -30.0, peak: float = -20.0, mel: float = -2.0) -> list[bytes]:
        return frames(Level(**self._next(), t_audio_s=1.0, rms_dbfs=rms,  # type: ignore[arg-type]
                            peak_dbfs=peak, mel=[mel] * 32))

    def scores(self, loud: float) -> list[bytes]:
        return frames(Scores(**self._next(), t_audio_s=1.0,  # type: ignore[arg-type]
                             top=[["loud", loud, 0.5], ["quiet", 1 - loud, None]]))

    def status(self, state: str = "running", **counters: int) -> list[bytes]:
        return frames(Status(**self._next(), state=state,  # type: ignore[arg-type]
                             source="file:x.wav", uptime_s=1.0, t_audio_s=1.0,
                             counters={"overrun_samples": 0, "publish_dropped": 0, **counters},
                             inference_ms_p50=0.4, inference_ms_max=1.5, dc_offset=0.0,
                             last_error=None))

    def event(self, event_id: str, label: str, phase: str, onset_s: float,
              offset_s: float | None = None, score: float = 0.8) -> list[bytes]:
        return frames(Event(**self._next(), event_id=event_id,  # type: ignore[arg-type]
                            label=label, phase=phase, onset_s=onset_s, offset_s=offset_s,
                            onset_time=1_700_000_000.0 + onset_s,
                            offset_time=None if offset_s is None else 1_700_000_000.0 + offset_s,
                            peak_score=score, threshold=0.5))


def frames(message: Message) -> list[bytes]:
    return encode(message)


def test_stale_then_offline_then_back() -> None:
    state, room = DashboardState(stale_s=15, offline_s=60), Sensor("room")
    assert state.ingest(room.level(), now=100.0)
    sensor = state.sensors["room"]
    assert state.health(sensor, now=100.0) == "LIVE"
    assert state.ingest(room.status("running"), now=101.0)
    assert state.health(sensor, now=115.9) == "RUNNING"
    assert state.health(sensor, now=116.1) == "STALE"
    assert state.health(sensor, now=160.9) == "STALE"
    assert state.health(sensor, now=161.1) == "OFFLINE"
    state.ingest(room.level(), now=200.0)  # heard again: back to the daemon's own state
    assert state.health(sensor, now=200.0) == "RUNNING"
    state.ingest(room.status("degraded"), now=201.0)
    assert state.health(sensor, now=201.0) == "DEGRADED"
    state.ingest(room.status("stopped"), now=202.0)
    assert state.health(sensor, now=999.0) == "STOPPED"  # a clean stop is not a failure


def test_event_log_newest_first_with_durations_and_highlight() -> None:
    state, a, b = DashboardState(highlight_s=5), Sensor("a"), Sensor("b")
    state.ingest(a.event("e1", "Cough", "start", onset_s=1.0, score=0.6), now=10.0)
    state.ingest(b.event("e1", "Glass", "start", onset_s=2.0), now=11.0)
    state.ingest(a.event("e1", "Cough", "end", onset_s=1.0, offset_s=1.75, score=0.9), now=12.0)
    rows = state.visible_events()
    assert [(r.sensor_id, r.label) for r in rows] == [("b", "Glass"), ("a", "Cough")]
    assert rows[1].duration_s == pytest.approx(0.75) and rows[1].peak_score == 0.9
    assert rows[0].duration_s is None  # still going on
    assert state.is_new(rows[1], now=14.9) and not state.is_new(rows[1], now=15.1)
    # An end whose start was lost still makes a row.
    state.ingest(a.event("e2", "Cough", "end", onset_s=5.0, offset_s=6.0), now=20.0)
    assert state.visible_events()[0].event_id == "e2"
    assert state.sensors["a"].last_event is state.visible_events()[0]
    # An event closed by a restart (end unknown) is no longer "ongoing".
    state.ingest(frames(msgspec.structs.replace(decode(b.event("e1", "Glass", "end", onset_s=2.0)),
                                reason="restart")), now=21.0)
    glass = next(r for r in state.visible_events() if r.label == "Glass")
    assert glass.duration_s is None and glass.ended and glass.end_reason == "restart"
    assert "ended (restart)" in _event_cells(glass, new=False)


def test_class_and_sensor_filters_cycle() -> None:
    state, a, b = DashboardState(), Sensor("a"), Sensor("b")
    state.ingest(a.event("1", "Cough", "start", 1.0), now=1.0)
    state.ingest(b.event("1", "Glass", "start", 1.0), now=1.0)
    state.ingest(b.event("2", "Cough", "start", 2.0), now=1.0)
    labels = [(e.sensor_id, e.label) for e in state.visible_events()]
    assert labels == [("b", "Cough"), ("b", "Glass"), ("a", "Cough")]
    assert handle_key(state, "c") and state.class_filter == "Cough"
    assert [(e.sensor_id, e.label) for e in state.visible_events()] == [("b", "Cough"),
                                                                       ("a", "Cough")]
    handle_key(state, "s")
    assert state.sensor_filter == "a" and state.show_detail()
    assert [(e.sensor_id, e.label) for e in state.visible_events()] == [("a", "Cough")]
    handle_key(state, "c")
    assert state.class_filter == "Glass" and state.visible_events() == []
    for key in "css":
        handle_key(state, key)
    assert state.class_filter is None and state.sensor_filter is None
    assert len(state.visible_events()) == 3 and not state.show_detail()
    handle_key(state, "2")
    assert state.sensor_filter == "b" and state.show_detail()
    handle_key(state, "d")
    assert not state.show_detail()
    handle_key(state, "p")
    assert state.paused
    assert not handle_key(state, "q")


def test_bad_messages_are_counted_not_raised() -> None:
    state, room = DashboardState(), Sensor("room")
    good = room.level()
    body = json.loads(good[1])
    for bad in ([b"level"], [b"level", b"{not json"], [b"level", b"[1]"],
                [b"level", json.dumps({**body, "v": 99}).encode()],
                [b"thing", json.dumps({**body, "type": "thing"}).encode()],
                [b"anomaly.pump", json.dumps({**body, "type": "anomaly"}).encode()]):
        assert not state.ingest(bad, now=1.0)
    assert state.decode_errors == 6 and state.sensors == {}
    assert "$.rms_dbfs: unknown key" in (state.last_decode_error or "")
    assert state.ingest(good, now=1.0) and state.received == 1


def test_machine_health_is_shown() -> None:
    state = DashboardState()
    for machine, score, running in (("pump 3", 4.2, True), ("fan", 0.5, False)):
        state.ingest(frames(Anomaly(sensor_id="m1", seq=1, ts=1.0, machine=machine,
                                    t_audio_s=1.0, score=score, threshold=3.0,
                                    running=running)), now=1.0)
    assert set(state.sensors["m1"].machines) == {"pump 3", "fan"}
    console = Console(file=io.StringIO(), width=80, record=True)
    console.print(render_snapshot(state, 1.0, ["tcp://x:1"], width=80))
    text = console.export_text()
    assert re.search(r"⚙ pump 3 .*┃.* 4\.20 thr 3\.00 ◀", text), text
    assert re.search(r"⚙ fan .* 0\.50 thr 3\.00 idle$", text, re.MULTILINE), text


def test_lost_messages_and_peak_hold() -> None:
    state, room = DashboardState(peak_hold_s=2.0), Sensor("room")
    state.ingest(room.level(peak=-6.0), now=0.0)
    room.seq += 3  # three messages never arrive
    state.ingest(room.level(peak=-30.0), now=1.0)
    sensor = state.sensors["room"]
    assert sensor.lost == 3
    assert sensor.peak_hold_dbfs == -6.0  # held
    state.ingest(room.level(peak=-30.0), now=2.5)
    assert sensor.peak_hold_dbfs == -30.0  # released after the hold time
    assert len(sensor.mel) == 3


def screen_text(state: DashboardState, now: float, *, width: int = 80,
                height: int = 24) -> list[str]:
    console = Console(file=io.StringIO(), width=width, height=height, record=True,
                      color_system="truecolor")
    console.print(render_screen(state, now, ["tcp://127.0.0.1:5557"], width=width,
                                height=height))
    return console.export_text().splitlines()


def test_fifty_sensors_fit_80x24_one_line_each() -> None:
    state = DashboardState()
    sensors = [Sensor(f"sensor-{i:02d}") for i in range(50)]
    for i, s in enumerate(sensors):
        state.ingest(s.level(rms=-60 + i), now=0.0)
        state.ingest(s.scores(0.9 if i % 2 else 0.1), now=0.0)
        state.ingest(s.status(), now=0.0 if i != 7 else -20.0)
    state.ingest(sensors[3].event("e", "loud", "start", 1.0), now=0.0)
    lines = screen_text(state, 1.0)
    assert len(lines) == 24 and all(len(line) <= 80 for line in lines)
    assert "50 sensor(s)" in lines[0]
    rows = [line for line in lines if re.match(r"\s*\d+\s+sensor-\d\d\s", line)]
    assert len(rows) >= 10  # one line per sensor, as many as fit
    assert any("sensor-03" in r and "loud 0.90" in r for r in rows)
    assert any(re.search(r"\+\d+ +more", line) for line in lines)
    assert lines[-1].startswith("q quit")


def test_detail_view_fits_80x24() -> None:
    state, room = DashboardState(stale_s=1, offline_s=3), Sensor("room")
    for i in range(30):
        state.ingest(room.level(mel=-6.0 + i * 0.25), now=0.0)
    state.ingest(room.scores(0.7), now=0.0)
    state.ingest(room.status(overrun_samples=5), now=0.0)
    state.ingest(room.event("e", "loud", "start", 1.0), now=0.0)
    lines = screen_text(state, 2.0)
    assert len(lines) == 24 and all(len(line) <= 80 for line in lines)
    text = "\n".join(lines)
    assert "room  STALE" in text and "overrun 5" in text
    assert re.search(r"loud .*┃.* 0\.70 thr 0\.50", text)
    assert re.search(r"●\s+\S+\s+room\s+loud\s+0\.80\s+ongoing", text)
    spectrogram = [line for line in lines if re.fullmatch(r" *[ ░▒▓█]+", line)]
    assert len(spectrogram) >= 4
    assert all(len(line) == 80 and line.startswith(" " * 50) for line in spectrogram)
    assert "█" in spectrogram[0][-5:]  # the loudest (newest) frames on the right


# -- against the real daemon ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def recording(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.5 s of silence, a real fall, then real everyday sounds: ~21 s, 16 kHz mono."""
    fall = sorted((shared_data / "safe" / "fall").glob("*.flac"))[0]
    others = sorted((shared_data / "safe" / "non_fall").glob("*.flac"))[:6]
    clips = [sf.read(str(p), dtype="float32")[0] for p in [fall, *others]]
    path = tmp_path_factory.mktemp("audio") / "room.wav"
    sf.write(str(path), np.concatenate([np.zeros(RATE // 2, np.float32), *clips]), RATE,
             subtype="FLOAT")
    return path


def start_daemon(config: Path, recording: Path, endpoint: str,
                 log: Path) -> subprocess.Popen[bytes]:
    """The real daemon replaying `recording` at real-time pace once a subscriber connects;
    returns when it is bound (its start-up takes seconds on a busy machine)."""
    with log.open("wb") as stderr:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "--config", str(config), "--source",
             f"file:{recording}", "--publish", endpoint, "--wait-subscriber", "30"],
            stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO)
    deadline = time.monotonic() + 60
    while "publishing on" not in log.read_text(errors="replace"):  # logged after the bind
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            raise AssertionError(f"daemon did not start (rc={daemon.wait(10)}):\n"
                                 f"{log.read_text(errors='replace')}")
        time.sleep(0.05)
    return daemon


def test_once_snapshot_of_a_real_daemon(config_file: Path, recording: Path,
                                        tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/d.sock"
    daemon = start_daemon(config_file, recording, endpoint, tmp_path / "daemon.log")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "monitor", "dashboard", endpoint, "--once", "--once-wait", "3"],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env={**os.environ, "COLUMNS": "100"})
    finally:
        daemon.kill()
        daemon.wait(10)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\x1b[" not in out  # plain text into a pipe
    assert "test-room  RUNNING" in out
    level = re.search(r"rms\s+(-?\d+\.\d) dBFS\s+peak\s+(-?\d+\.\d)", out)
    assert level and -60 < float(level.group(1)) < 0, out
    assert re.search(r"loud .* thr 0\.50", out)
    assert re.search(r"\d\d:\d\d:\d\d\s+test-room\s+loud\s+0\.\d\d", out), out


def test_once_with_nobody_publishing_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "dashboard", f"ipc://{tmp_path}/none.sock", "--once",
         "--once-wait", "0.3"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert "no messages from" in result.stdout and "no messages from" in result.stderr


class Tmux:
    """A private tmux server (own socket) running one command in a WxH pane."""

    def __init__(self, name: str, command: str, *, width: int, height: int) -> None:
        self.base = ["tmux", "-L", name, "-f", "/dev/null"]
        self.run("new-session", "-d", "-s", "dash", "-x", str(width), "-y", str(height),
                 "-c", str(REPO), command)
        self.run("set-option", "-w", "-t", "dash", "remain-on-exit", "on")

    def run(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True,
                              text=True, timeout=10).stdout

    def screen(self) -> list[str]:
        return self.run("capture-pane", "-p", "-t", "dash").splitlines()

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "dash", *keys)

    def wait_for(self, predicate: Callable[[list[str]], bool], what: str, *,
                 timeout_s: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; screen:\n" + "\n".join(screen))

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=10)


def field(screen: list[str], prefix: str) -> str:
    return next((line for line in screen if line.startswith(prefix)), "")


def spectrogram(screen: list[str], width: int) -> list[str]:
    """The rows between the level meter and the first score bar, padded to the pane width."""
    start = next(i for i, line in enumerate(screen) if line.startswith("level ")) + 1
    end = next(i for i, line in enumerate(screen) if line.startswith(("loud ", "quiet ")))
    assert end - start >= 4
    return [line.ljust(width) for line in screen[start:end]]


def scrolled(before: list[str], after: list[str]) -> int:
    """How many columns `after` is `before` moved left by (0: not a scroll of it)."""
    width = len(before[0])
    for shift in range(1, width - 10):
        if all(a[:width - shift] == b[shift:] for a, b in zip(after, before, strict=True)):
            return shift
    return 0


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_live_dashboard_in_a_real_terminal(config_file: Path, recording: Path,
                                           tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/d.sock"
    width, height = 100, 30
    daemon = start_daemon(config_file, recording, endpoint, tmp_path / "daemon.log")
    exit_file = tmp_path / "dashboard.exit"
    tmux = Tmux(f"dash-test-{os.getpid()}",
                f"{sys.executable} -m monitor dashboard {endpoint} --stale 1 --offline 3; "
                f"echo $? > {exit_file}", width=width, height=height)
    try:
        screen = tmux.wait_for(lambda s: "test-room  RUNNING" in "\n".join(s), "the sensor")
        assert len(screen) <= height and all(len(line) <= width for line in screen)

        # The event appears in the log, highlighted as new.
        tmux.wait_for(lambda s: any(re.match(r" ●\s+\d\d:\d\d:\d\d\s+test-room\s+loud\s", x)
                                    for x in s), "the event in the log")

        # Levels move.
        first = field(tmux.screen(), "level ")
        assert re.search(r"rms\s+-?\d+\.\d dBFS", first), first
        tmux.wait_for(lambda s: field(s, "level ") not in ("", first), "the level to change")

        # The spectrogram scrolls left, newest column at the right.
        for _ in range(50):
            before = spectrogram(tmux.screen(), width)
            time.sleep(0.35)
            after = spectrogram(tmux.screen(), width)
            if len(before) == len(after) >= 4 and before != after and scrolled(before, after):
                break
        else:
            raise AssertionError("the spectrogram never scrolled:\n" + "\n".join(before + after))

        # p pauses the screen (it stops changing), p again resumes.
        tmux.keys("p")
        paused = tmux.wait_for(lambda s: "PAUSED" in s[0], "PAUSED")
        time.sleep(0.5)
        assert tmux.screen() == paused
        tmux.keys("p")
        tmux.wait_for(lambda s: "PAUSED" not in s[0] and s != paused, "resume")

        # c filters the log by class: "loud" first, then "quiet" (no such events).
        tmux.keys("c")
        tmux.wait_for(lambda s: "filter class=loud" in s[0], "the class filter")
        tmux.keys("c")
        tmux.wait_for(lambda s: "filter class=quiet" in s[0]
                      and not any(re.search(r"test-room\s+loud\s", x) for x in s), "an empty log")
        tmux.keys("c")

        # A daemon that dies without a word turns STALE, then OFFLINE.
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        tmux.wait_for(lambda s: "test-room  STALE" in "\n".join(s), "STALE", timeout_s=10)
        tmux.wait_for(lambda s: "test-room  OFFLINE" in "\n".join(s), "OFFLINE", timeout_s=10)

        # q quits cleanly.
        tmux.keys("q")
        deadline = time.monotonic() + 10
        while not exit_file.is_file() or not exit_file.read_text().strip():
            assert time.monotonic() < deadline, f"q did not quit: {tmux.screen()}"
            time.sleep(0.1)
        assert exit_file.read_text().strip() == "0"
    finally:
        tmux.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
