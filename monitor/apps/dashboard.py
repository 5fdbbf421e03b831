"""`audio-monitor dashboard`: a terminal view of one or more daemons, built from messages only.

It subscribes to the daemons' ZeroMQ endpoints and never touches audio, DSP or the model:
levels, the spectrogram (from the published 32-band log-mel frames), class scores, health
and events are all drawn from the wire contract (`monitor.protocol.messages`). The state
lives in `monitor.apps.dashboard_state` (pure, testable with a fake clock) and is drawn by
`monitor.apps.dashboard_view` with rich; this module runs the loop: one `zmq.Poller` waits
on the socket and the keyboard, the screen is redrawn at `refresh_hz` (10 Hz) at most, and
keys are read in cbreak mode with the terminal restored on every exit path.
"""

from __future__ import annotations

import os
import sys
import termios
import time
import tty
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import zmq
from rich.console import Console
from rich.live import Live

from monitor.apps.dashboard_state import DashboardState
from monitor.apps.dashboard_view import render_screen, render_snapshot
from monitor.errors import ConfigError

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"


# -- the loop ------------------------------------------------------------------------------------


class _Keys:
    """Single key presses from a terminal in cbreak mode; restores the terminal on exit."""

    def __init__(self, stream: object) -> None:
        fileno = getattr(stream, "fileno", None)
        try:
            fd = fileno() if callable(fileno) else None
        except (OSError, ValueError):
            fd = None
        self.fd = fd if fd is not None and os.isatty(fd) else None
        self._saved: list[Any] | None = None

    def __enter__(self) -> _Keys:
        if self.fd is not None:
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.fd is not None and self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def read(self) -> str:
        if self.fd is None:
            return ""
        data = os.read(self.fd, 64).decode("utf-8", "replace")
        return "" if data.startswith("\x1b") else data  # arrows and other sequences: ignored


def handle_key(state: DashboardState, key: str) -> bool:
    """Apply one key press; False means quit."""
    if key in "qQ":
        return False
    if key == "p":
        state.toggle_pause()
    elif key == "c":
        state.cycle_class_filter()
    elif key == "s":
        state.cycle_sensor_filter()
    elif key in ("d", "\r", "\n"):
        state.toggle_detail()
    elif key.isdigit() and key != "0":
        state.select_sensor(int(key))
    return True


def _subscribe(endpoints: Sequence[str]) -> zmq.Socket[bytes]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, 10000)
    socket.setsockopt_string(zmq.SUBSCRIBE, "")
    for endpoint in endpoints:
        try:
            socket.connect(endpoint)
        except zmq.ZMQError as err:
            socket.close()
            raise ConfigError(f"endpoint {endpoint!r} is not a ZeroMQ endpoint "
                              f"(e.g. {DEFAULT_ENDPOINT}, ipc:///run/x.sock): {err}") from err
    return socket


def _drain(socket: zmq.Socket[bytes], state: DashboardState, *, now: float,
           budget: int = 5000) -> int:
    """Apply every queued message (at most `budget`, so a flood cannot starve the screen)."""
    count = 0
    while count < budget:
        try:
            frames = socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        state.ingest(frames, now=now)
        count += 1
    return count


def dashboard_command(endpoints: Sequence[str], *, once: bool = False, once_wait_s: float = 2.0,
                      stale_s: float = 15.0, offline_s: float = 60.0, refresh_hz: float = 10.0,
                      highlight_s: float = 5.0) -> int:
    """Run the dashboard; returns the exit status (0; 1 when `--once` heard nothing)."""
    endpoints = list(endpoints) or [DEFAULT_ENDPOINT]
    if not 0 < stale_s < offline_s:
        raise ConfigError(f"--stale {stale_s} must be > 0 and below --offline {offline_s}")
    if not 0 < refresh_hz <= 60:
        raise ConfigError(f"--refresh {refresh_hz} Hz is out of range; allowed 0 < Hz <= 60")
    state = DashboardState(stale_s=stale_s, offline_s=offline_s, highlight_s=highlight_s)
    socket = _subscribe(endpoints)
    try:
        if once:
            return _run_once(socket, state, endpoints, wait_s=once_wait_s)
        return _run_live(socket, state, endpoints, period_s=1.0 / refresh_hz)
    finally:
        socket.close()


def _run_once(socket: zmq.Socket[bytes], state: DashboardState, endpoints: Sequence[str], *,
              wait_s: float) -> int:
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        if socket.poll(int(left * 1000) + 1):
            _drain(socket, state, now=time.monotonic())
    console = Console()
    console.print(render_snapshot(state, time.monotonic(), endpoints, width=console.width))
    if not state.sensors:
        print(f"audio-monitor: no messages from {', '.join(endpoints)} in {wait_s} s",
              file=sys.stderr)
        return 1
    return 0


def _run_live(socket: zmq.Socket[bytes], state: DashboardState, endpoints: Sequence[str], *,
              period_s: float) -> int:
    console = Console()
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    keys = _Keys(sys.stdin)
    if keys.fd is not None:
        poller.register(keys.fd, zmq.POLLIN)
    next_draw = 0.0
    size = console.size
    try:
        with keys, Live(console=console, screen=True, auto_refresh=False,
                        redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                ready = dict(poller.poll(max(0, int((next_draw - time.monotonic()) * 1000))))
                now = time.monotonic()
                if socket in ready:
                    _drain(socket, state, now=now)
                pressed = False
                if keys.fd is not None and keys.fd in ready:
                    for key in keys.read():
                        if not handle_key(state, key):
                            return 0
                        pressed = True
                resized = console.size != size
                if now < next_draw and not pressed and not resized:
                    continue
                size = console.size
                if not state.paused or pressed or resized:
                    live.update(render_screen(state, now, endpoints, width=size.width,
                                              height=size.height), refresh=True)
                next_draw = now + period_s
    except KeyboardInterrupt:
        return 0

