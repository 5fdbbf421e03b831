"""Production daemon: systemd units, sd_notify watchdog, reload, drain, metrics, soak, JACK.

Real processes and real sockets: the daemon runs as a subprocess with NOTIFY_SOCKET
pointing at a unix datagram socket this test binds, exactly what systemd does.
Faults are injected from outside: SIGUSR2 freezes the processing stage while the loop
keeps running (the daemon runs through `tests/fault_daemon.py`, the CLI with that switch);
a stdin writer goes quiet; a private JACK server is paused and resumed under a live `mic:`
source.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zmq
from jack_server import JackServer, require_jackd, stop_stale

from monitor.protocol.messages import Event, Message, Scores, Status, decode
from monitor.service.sdnotify import Notifier
from monitor.service.systemd import UNITS, install_units
from monitor.service.watchdog import Progress, StageWatch

RATE = 16000
REPO = Path(__file__).resolve().parents[1]


# --- sd_notify and the stage watch, in process -----------------------------------------

class NotifySocket:
    """A unix datagram socket standing in for systemd; records every notification."""

    def __init__(self, path: str) -> None:
        self.address = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + path[1:] if path.startswith("@") else path)
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-recv", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.received.append((time.monotonic(), fields))

    def with_key(self, key: str, since: float = 0.0) -> list[tuple[float, dict[str, str]]]:
        return [(t, f) for t, f in list(self.received) if key in f and t >= since]

    def wait_for(self, key: str, value: str | None = None, *, since: float = 0.0,
                 timeout: float = 60.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, fields in self.with_key(key, since):
                if value is None or value in fields[key]:
                    return fields
            time.sleep(0.02)
        raise AssertionError(f"no {key}={value} within {timeout} s; got {self.received[-5:]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_datagrams(tmp_path: Path, abstract: bool) -> None:
    address = f"@am-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    systemd = NotifySocket(address)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3000000"})
        assert notifier.ping_interval_s == 1.5
        assert notifier.ready("warm\nand ready")
        assert notifier.watchdog()
        got = systemd.wait_for("READY", timeout=5)
        assert got["STATUS"] == "warm and ready" and got["MAINPID"] == str(os.getpid())
        systemd.wait_for("WATCHDOG", "1", timeout=5)
    finally:
        systemd.close()
    assert not Notifier.from_env({}).ready("x"), "no NOTIFY_SOCKET must be a no-op"
    other = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000",
                               "WATCHDOG_PID": "1"})
    assert other.ping_interval_s is None, "a watchdog meant for another pid is ignored"


def _p(captured: int, processed: int, backlog: int, *, done: bool = False, sent: int = 0,
       attempts: int = 0) -> Progress:
    return Progress(captured=captured, capture_done=done, backlog=backlog, ring_capacity=1024,
                    processed=processed, sent=sent, attempts=attempts)


def test_stage_watch_tells_hung_from_idle() -> None:
    watch = StageWatch(stall_s=5.0, capture_may_idle=True)
    watch.update(0.0, _p(1, 100, 0))
    watch.update(6.0, _p(1, 100, 0))  # nothing arrives: idle capture, nothing to process
    assert watch.stalled == () and watch.idle == ("capture",)
    watch.update(7.0, _p(2, 100, 50))  # audio waits in the ring...
    watch.update(12.5, _p(3, 100, 300))  # ...and is not processed: processing is hung
    assert watch.stalled == ("processing",)
    watch.update(13.0, _p(4, 400, 0))
    assert watch.stalled == () and watch.idle == ()

    file_watch = StageWatch(stall_s=5.0, capture_may_idle=False)
    file_watch.update(0.0, _p(1, 0, 0))
    file_watch.update(6.0, _p(1, 0, 0))
    assert file_watch.stalled == ("capture",), "a file source must keep delivering"
    file_watch.update(7.0, _p(2, 0, 600))
    file_watch.update(13.0, _p(2, 0, 600))  # ring full: back-pressure, processing's fault
    assert file_watch.stalled == ("processing",)
    file_watch.update(14.0, _p(2, 600, 0, done=True, sent=5, attempts=9))
    file_watch.update(20.0, _p(2, 600, 0, done=True, sent=5, attempts=12))
    assert file_watch.stalled == ("publishing",), "every send failing is a stall"


# --- systemd units -----------------------------------------------------------------------

def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd); units unverified")
    executable = REPO / ".venv" / "bin" / "audio-monitor"
    if not executable.is_file():
        executable = Path(sys.executable)
    written = install_units(tmp_path, executable=executable)
    assert [p.name for p in written] == list(UNITS)
    main = (tmp_path / "audio-monitor.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "MemoryDenyWriteExecute=no", "DynamicUser=yes",
                 "NUMBA_CACHE_DIR=%C/audio-monitor/numba", "ExecReload=/bin/kill -HUP $MAINPID",
                 f"ExecStart={executable.resolve()} run"):
        assert line in main, line
    (tmp_path / "audio-monitor@ward-3.service").symlink_to("audio-monitor@.service")
    units = [str(p) for p in written if "@." not in p.name]
    units.append(str(tmp_path / "audio-monitor@ward-3.service"))
    result = subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True,
                            text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values; it only warns: so no output at all.
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), \
        result.stderr + result.stdout
    for unit in units:
        security = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", unit],
                                  capture_output=True, text=True, timeout=60)
        if security.returncode != 0 and "offline" in security.stderr:
            pytest.skip(f"systemd-analyze security --offline unsupported: {security.stderr}")
        match = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
        assert match, security.stdout[-500:] + security.stderr
        assert float(match[1]) <= 2.5, f"{unit}: exposure {match[1]}"


# --- the daemon under a fake systemd -------------------------------------------------------

@pytest.fixture(scope="module")
def speech(shared_data: Path) -> np.ndarray:
    """Real recordings (a fall and silence), 16 kHz mono, as the stdin feeder's material."""
    path = sorted((shared_data / "safe" / "fall").glob("*.flac"))[0]
    audio, rate = sf.read(str(path), dtype="float32")
    assert rate == RATE
    return np.concatenate([np.zeros(RATE, np.float32), audio, np.zeros(RATE, np.float32)])


def write_config(folder: Path, tiny_model: Path, *, threshold: float | str = 0.5) -> Path:
    path = folder / "config.yaml"
    path.write_text(f"sensor_id: prod\nstate_dir: {folder / 'state'}\nmodel:\n"
                    f"  path: {tiny_model}\n  stride_ms: 50\n  top_k: 2\n"
                    "publish:\n  status_interval_s: 0.5\n"
                    f"events:\n  classes:\n    loud:\n      threshold: {threshold}\n")
    return path


class Daemon:
    """`audio-monitor run` as systemd would start it, plus a SUB socket and stderr reader."""

    def __init__(self, config: Path, source: str, tmp: Path, *extra: str,
                 watchdog_usec: int = 200_000, stdin: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.systemd = NotifySocket(str(tmp / "notify.sock"))
        self.endpoint = f"ipc://{tmp}/pub.sock"
        self.sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt_string(zmq.SUBSCRIBE, "")
        self.sub.connect(self.endpoint)
        full_env = dict(os.environ, NOTIFY_SOCKET=self.systemd.address,
                        WATCHDOG_USEC=str(watchdog_usec),
                        **(env or {}))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "fault_daemon.py"), "run", "--config",
             str(config), "--source", source, "--publish", self.endpoint, *extra],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=full_env, cwd=REPO, start_new_session=True)
        self.stderr: list[str] = []
        self.messages: list[Message] = []
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace"))

    def pump(self, seconds: float) -> None:
        """Receive published messages for `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.sub.poll(50):
                self.messages.append(decode(self.sub.recv_multipart()))

    def statuses(self) -> list[Status]:
        return [m for m in self.messages if isinstance(m, Status)]

    def proc_stats(self) -> dict[str, int]:
        pid = self.proc.pid
        status = Path(f"/proc/{pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+) kB", status)[1])  # type: ignore[index]
        return {"rss_kb": rss, "threads": len(os.listdir(f"/proc/{pid}/task")),
                "fds": len(os.listdir(f"/proc/{pid}/fd"))}

    def log(self) -> str:
        return "".join(self.stderr)[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.sub.close()
        self.systemd.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for d in made:
        d.close()


class Feeder(threading.Thread):
    """Writes s16le PCM of `audio` to the daemon's stdin, looping, paced `speed` x real time
    (0: as fast as the pipe takes it); `quiet` pauses it, `stop_after_s` ends the feed."""

    def __init__(self, proc: subprocess.Popen[bytes], audio: np.ndarray, *, speed: float,
                 stop_after_s: float = 1e9) -> None:
        super().__init__(name="feeder", daemon=True)
        self.proc = proc
        self.pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        self.speed = speed
        self.stop_after = int(stop_after_s * RATE * 2)
        self.quiet = threading.Event()
        self.done = threading.Event()
        self.sent = 0

    def run(self) -> None:
        assert self.proc.stdin is not None
        chunk = RATE // 10 * 2
        began = time.monotonic()
        try:
            while self.sent < self.stop_after:
                if self.quiet.is_set():
                    time.sleep(0.02)
                    began = time.monotonic() - self.sent / 2 / RATE / max(self.speed, 1e-9)
                    continue
                at = self.sent % len(self.pcm)
                piece = self.pcm[at:at + chunk] if self.speed else self.pcm[at:]
                piece = piece[:self.stop_after - self.sent]
                self.proc.stdin.write(piece)
                self.sent += len(piece)
                if self.speed:
                    delay = began + self.sent / 2 / RATE / self.speed - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass
        self.done.set()


def pings_between(d: Daemon, start: float, end: float) -> int:
    return sum(1 for t, f in d.systemd.with_key("WATCHDOG") if start <= t < end)


def test_ready_watchdog_freeze_reload_and_stop(tmp_path: Path, tiny_model: Path,
                                               speech: np.ndarray, daemons: list[Daemon]) -> None:
    config = write_config(tmp_path, tiny_model)
    d = Daemon(config, "stdin", tmp_path, "--rate", "16000", "--metrics", "127.0.0.1:0",
               stdin=True)
    daemons.append(d)
    ready = d.systemd.wait_for("READY", "1")
    assert "MAINPID" in ready
    feeder = Feeder(d.proc, speech, speed=4.0)
    feeder.start()
    d.pump(2.0)
    t0 = time.monotonic()
    d.pump(1.5)
    assert pings_between(d, t0, time.monotonic()) >= 5, d.log()

    # Metrics: scraped over real HTTP while the daemon runs.
    port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", d.log())[1])  # type: ignore[index]
    d.pump(2.5)  # the fall clip recurs every ~5 s of audio: an event by now
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) ([\d.e+-]+)$", body, re.M)}
    assert values["audio_monitor_samples_total"] > RATE
    assert values["audio_monitor_inference_seconds_count"] > 10
    assert values['audio_monitor_events_total{class="loud"}'] >= 1
    assert values['audio_monitor_state{state="running"}'] == 1.0
    assert values["audio_monitor_processing_seconds_total"] > 0
    assert values["audio_monitor_watchdog_pings_total"] > 5

    # The writer goes quiet: idle, not hung. Pings go on, STATUS says degraded.
    feeder.quiet.set()
    d.pump(6.5)
    t0 = time.monotonic()
    d.pump(1.0)
    assert pings_between(d, t0, time.monotonic()) >= 5
    d.systemd.wait_for("STATUS", "degraded (capture idle)", since=t0 - 2, timeout=5)
    feeder.quiet.clear()

    # Processing frozen (fault_daemon.py) while audio keeps arriving: pings stop, then resume.
    d.pump(1.0)
    d.proc.send_signal(signal.SIGUSR2)
    stalled = d.systemd.wait_for("STATUS", "stalled: processing", timeout=15)
    assert "no progress" in stalled["STATUS"]
    t0 = time.monotonic()
    d.pump(1.5)
    assert pings_between(d, t0, time.monotonic()) == 0, "a hung stage must not be pinged for"
    assert d.proc.poll() is None
    d.proc.send_signal(signal.SIGUSR2)
    d.pump(1.0)
    t0 = time.monotonic()
    d.pump(1.0)
    assert pings_between(d, t0, time.monotonic()) >= 5, "pings resume after recovery"

    # SIGHUP with a NaN threshold: refused with one logged line naming the key; the
    # running rules stay and the daemon runs on.
    write_config(tmp_path, tiny_model, threshold=".nan")
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGHUP)
    d.systemd.wait_for("READY", "1", since=t0, timeout=10)
    d.pump(1.0)
    assert d.proc.poll() is None
    assert "reload refused, keeping the running rules: $.events.classes.loud.threshold: " \
        "nan: NaN and infinity are refused" in d.log()
    latest = [m for m in d.messages if isinstance(m, Scores)][-1]
    assert ("loud", 0.5) in {(label, thr) for label, _, thr in latest.top}

    # SIGHUP: a new threshold is applied between blocks, audio keeps flowing.
    write_config(tmp_path, tiny_model, threshold=0.7)
    samples_before = d.statuses()[-1].counters["samples"]
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGHUP)
    d.systemd.wait_for("RELOADING", "1", since=t0, timeout=10)
    d.systemd.wait_for("READY", "1", since=t0, timeout=10)
    d.pump(1.5)
    latest = [m for m in d.messages if isinstance(m, Scores)][-1]
    assert ("loud", 0.7) in {(label, thr) for label, _, thr in latest.top}
    assert d.statuses()[-1].counters["samples"] > samples_before
    assert d.statuses()[-1].counters["overrun_samples"] == 0

    # SIGTERM: STOPPING=1, final status, exit 0.
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    d.systemd.wait_for("STOPPING", "1", since=t0, timeout=10)
    d.pump(1.0)
    assert d.proc.wait(20) == 0, d.log()
    assert d.statuses()[-1].state == "stopped"
    assert "Traceback" not in d.log()


def test_sigterm_drains_and_ends_open_events(tmp_path: Path, tiny_model: Path,
                                             speech: np.ndarray, daemons: list[Daemon]) -> None:
    path = tmp_path / "fall.wav"
    sf.write(str(path), np.concatenate([speech, np.zeros(5 * RATE, np.float32)]), RATE)
    d = Daemon(write_config(tmp_path, tiny_model), f"file:{path}", tmp_path)
    daemons.append(d)
    d.systemd.wait_for("READY", "1")
    deadline = time.monotonic() + 30
    while not any(isinstance(m, Event) for m in d.messages) and time.monotonic() < deadline:
        d.pump(0.05)
    starts = [m for m in d.messages if isinstance(m, Event)]
    assert [e.phase for e in starts] == ["start"], "the event is open when SIGTERM comes"
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    d.systemd.wait_for("STOPPING", "1", since=t0, timeout=10)
    d.pump(2.0)
    assert d.proc.wait(20) == 0, d.log()
    events = [m for m in d.messages if isinstance(m, Event)]
    assert [e.phase for e in events] == ["start", "end"]
    assert events[0].event_id == events[1].event_id
    final = d.statuses()[-1]
    assert final.state == "stopped" and final.counters["samples"] < 7 * RATE


def test_soak_one_hour_of_audio_flat_memory(tmp_path: Path, tiny_model: Path,
                                            speech: np.ndarray, daemons: list[Daemon]) -> None:
    """1 h of real audio through stdin as fast as the daemon takes it: no leak."""
    hour = 3600.0
    d = Daemon(write_config(tmp_path, tiny_model), "stdin", tmp_path, "--rate", "16000",
               stdin=True, watchdog_usec=1_000_000)
    daemons.append(d)
    d.systemd.wait_for("READY", "1")
    feeder = Feeder(d.proc, speech, speed=0.0, stop_after_s=hour)
    feeder.start()
    early: dict[str, int] = {}
    deadline = time.monotonic() + 300
    while not feeder.done.is_set() and time.monotonic() < deadline:
        d.pump(0.5)
        if not early and d.statuses() and d.statuses()[-1].t_audio_s > 300:
            early = d.proc_stats()
    assert feeder.done.is_set(), "soak feed did not finish in 300 s"
    d.pump(1.0)  # the ring and pipe drain (< 5 s of audio)
    late = d.proc_stats()
    final_t = d.statuses()[-1].t_audio_s
    assert d.proc.stdin is not None
    d.proc.stdin.close()
    d.pump(1.0)
    assert d.proc.wait(30) == 0, d.log()
    final = d.statuses()[-1]
    assert final.state == "stopped" and final.t_audio_s == pytest.approx(hour, abs=0.01)
    assert final_t > hour - 5
    assert final.counters["overrun_samples"] == 0
    assert final.counters["events"] >= 600  # the fall recurs every ~5 s
    print(f"\nsoak: RSS {early['rss_kb']} kB at 300 s of audio, {late['rss_kb']} kB at "
          f"{final_t:.0f} s; threads {early['threads']}->{late['threads']}; "
          f"fds {early['fds']}->{late['fds']}")
    assert late["threads"] == early["threads"]
    assert late["fds"] == early["fds"]
    assert late["rss_kb"] - early["rss_kb"] < 8 * 1024, (early, late)


# --- a live microphone whose server freezes and comes back ---------------------------------

@contextlib.contextmanager
def mic_daemon_on_jack(tmp_path: Path, tiny_model: Path, daemons: list[Daemon],
                       name: str) -> Iterator[tuple[JackServer, Daemon]]:
    """A JACK dummy server and the daemon capturing from it, READY; the server is stopped
    (and any stale one reaped) afterwards."""
    require_jackd()
    server = JackServer(name, rate=RATE, period=160, log_dir=tmp_path)
    server.start()
    try:
        d = Daemon(write_config(tmp_path, tiny_model), "mic:system", tmp_path, "--rate",
                   "16000", env={"JACK_DEFAULT_SERVER": name, "JACK_NO_START_SERVER": "1",
                                 "JACK_NO_AUDIO_RESERVATION": "1"})
        daemons.append(d)
        d.systemd.wait_for("READY", "1", timeout=60)
        yield server, d
    finally:
        server.stop()
        stop_stale(tmp_path / f"jackd-{name}.pid")


def test_jack_outage_is_degraded_then_healed(tmp_path: Path, tiny_model: Path,
                                             daemons: list[Daemon]) -> None:
    with mic_daemon_on_jack(tmp_path, tiny_model, daemons, "am-prod") as (server, d):
        d.pump(1.5)
        assert d.statuses()[-1].state == "running", d.log()
        server.pause()  # the device stops delivering, like a hung driver
        d.pump(4.0)
        t0 = time.monotonic()
        d.pump(1.0)
        assert pings_between(d, t0, time.monotonic()) >= 5, "a healing mic is not hung"
        degraded = [s for s in d.statuses() if s.state == "degraded"]
        assert degraded and "no audio from input device" in str(degraded[-1].last_error)
        server.resume()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                d.statuses()[-1].counters["reconnects"] >= 1
                and d.statuses()[-1].state == "running"):
            d.pump(0.5)
        final = d.statuses()[-1]
        assert final.counters["reconnects"] >= 1 and final.state == "running", d.log()
        samples = final.counters["samples"]
        d.pump(1.5)
        assert d.statuses()[-1].counters["samples"] > samples + RATE // 2, "capture resumed"
        assert d.proc.poll() is None, "the daemon never exits"
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(20) == 0, d.log()


def test_jack_restart_recovers_or_hands_over_to_the_service_manager(
        tmp_path: Path, tiny_model: Path, daemons: list[Daemon]) -> None:
    """The server dies and comes back. Either capture reconnects in-process, or PortAudio's
    JACK backend holds the dead stream (it can for ten minutes): then the daemon reports it
    and exits with 75 (EX_TEMPFAIL) for systemd to restart it, instead of hanging."""
    with mic_daemon_on_jack(tmp_path, tiny_model, daemons, "am-prod-restart") as (server, d):
        d.pump(1.0)
        server.stop()
        server.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and d.proc.poll() is None \
                and d.statuses()[-1].counters["reconnects"] == 0:
            d.pump(0.5)
        final = d.statuses()[-1]
        assert final.counters["source_errors"] >= 1 and final.last_error, d.log()
        if final.counters["reconnects"]:
            samples = final.counters["samples"]
            d.pump(1.5)
            assert d.statuses()[-1].counters["samples"] > samples + RATE // 2
            assert d.proc.poll() is None, "a recovered daemon keeps running"
        else:
            assert d.proc.wait(20) == 75, d.log()
            assert "has not released the dead stream" in str(final.last_error), final
