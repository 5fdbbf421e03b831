"""A private JACK server (dummy driver) for tests of the real PortAudio capture path.

Not a conftest: tests import it. The server gets its own name so it never
touches a user's JACK; clients (PortAudio included) find it through the
JACK_DEFAULT_SERVER environment variable, which must be set before PortAudio
initialises (see `portaudio_on`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

READY_TIMEOUT_S = 20.0
START_ATTEMPTS = 2
REQUIRE_ENV = "AUDIO_MONITOR_REQUIRE_JACK"  # set to 1 in CI: a missing jackd fails, not skips


def require_jackd() -> str:
    """Path of jackd; skip the test (visibly, with the reason) or fail in CI if it is missing."""
    path = shutil.which("jackd")
    missing = [name for name in ("jackd", "jack_lsp") if shutil.which(name) is None]
    if missing:
        reason = f"{', '.join(missing)} not installed (Debian package jackd2); real PortAudio path"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} untested but {REQUIRE_ENV}=1")
        pytest.skip(reason)
    assert path is not None
    return path


class JackServer:
    """One jackd process with the dummy driver; `start`/`stop` may be repeated (same name).

    Use a fixed name per test: JACK's registry reclaims a dead server's slot
    only for a server of the same name.
    """

    def __init__(self, name: str, *, rate: int, period: int, log_dir: Path) -> None:
        self.name = name
        self.rate = rate
        self.period = period
        self.log_path = log_dir / f"jackd-{name}.log"
        self.pid_path = log_dir / f"jackd-{name}.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = dict(os.environ, JACK_NO_AUDIO_RESERVATION="1", JACK_DEFAULT_SERVER=name)
        self.env.pop("JACK_START_SERVER", None)
        self.env["JACK_NO_START_SERVER"] = "1"

    def start(self) -> None:
        """Start jackd and wait until `jack_lsp` sees its ports. JACK's shared metadata
        database is cleared first (see `clear_stale_metadata`); a start that does not become
        ready is tried once more."""
        jackd = require_jackd()
        failure = ""
        for _ in range(START_ATTEMPTS):
            clear_stale_metadata()
            failure = self._start_once(jackd)
            if not failure:
                return
        raise RuntimeError(f"jackd -n {self.name} did not become ready: {failure}")

    def _start_once(self, jackd: str) -> str:
        """One start; '' when ready, else what was seen (the server is stopped)."""
        cmd = [jackd, "--no-realtime", "-n", self.name, "-d", "dummy",
               "-r", str(self.rate), "-p", str(self.period)]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        self.pid_path.write_text(str(self.proc.pid))
        deadline = time.monotonic() + READY_TIMEOUT_S
        lsp_said = b""
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    lsp = subprocess.run(["jack_lsp"], env=self.env, capture_output=True,
                                         timeout=5)
                except subprocess.TimeoutExpired:  # a loaded machine, or a wedged metadata DB
                    lsp_said = b"jack_lsp timed out"
                    continue
                if lsp.returncode == 0 and b"system:capture_1" in lsp.stdout:
                    return ""
                lsp_said = lsp.stderr[-200:]
                time.sleep(0.05)
        except BaseException:
            self.stop()  # never leave a jackd behind (it outlives us: setsid)
            raise
        tail = self.log_path.read_text(errors="replace")[-300:]
        self.stop()
        return f"log {tail!r}; jack_lsp {lsp_said!r}"

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): the device stops delivering, like a hung driver."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Make the server go away (SIGTERM, then SIGKILL after 5 s), like a device vanishing.

        Clients see the same JACK shutdown either way; SIGTERM lets jackd remove
        its entry from JACK's shared server registry (8 slots, only reclaimed by
        a server of the same name) and its 100 MB shared-memory segment.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.pid_path.unlink(missing_ok=True)


def _jackd_running() -> bool:
    """Whether any jackd process of any name is alive on this machine."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv0 = (proc / "cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:
            continue
        if argv0.endswith(b"jackd"):
            return True
    return False


def clear_stale_metadata() -> None:
    """Remove JACK's metadata database (Berkeley DB in /dev/shm/jack_db-<uid>) when no jackd is
    running. Every JACK server and client joins that one environment whatever the server name;
    a process killed while creating or holding it (kill -9 of a daemon is a test here) leaves
    it unjoinable, and every later jackd and jack_lsp hangs or fails on it. Left alone while
    any jackd runs: it may be a user's."""
    if _jackd_running():
        return
    shutil.rmtree(f"/dev/shm/jack_db-{os.getuid()}", ignore_errors=True)


def stop_stale(pid_path: Path) -> None:
    """Stop a jackd left behind by a test child process that was killed (pid file written by
    `JackServer.start`). jackd calls setsid(), so killing the child's process group misses it."""
    try:
        pid = int(pid_path.read_text())
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"jackd" in cmdline:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGTERM)
    pid_path.unlink(missing_ok=True)


@contextlib.contextmanager
def jack_server(
    name: str, *, rate: int = 16000, period: int = 160, log_dir: Path
) -> Iterator[JackServer]:
    """Run a private jackd for the duration of the block; always stopped at the end."""
    server = JackServer(name, rate=rate, period=period, log_dir=log_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def portaudio_on(server: JackServer) -> Iterator[None]:
    """Point PortAudio (and `jack` clients) at `server`; restore the environment afterwards.

    PortAudio reads JACK_DEFAULT_SERVER when it initialises, so it is
    re-initialised on entry and again on exit (so later tests see no JACK).
    """
    import sounddevice as sd

    saved = {k: os.environ.get(k) for k in ("JACK_DEFAULT_SERVER", "JACK_NO_START_SERVER")}
    os.environ["JACK_DEFAULT_SERVER"] = server.name
    os.environ["JACK_NO_START_SERVER"] = "1"
    sd._terminate()
    sd._initialize()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        sd._terminate()
        sd._initialize()
