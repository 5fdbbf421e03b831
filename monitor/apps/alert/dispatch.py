"""Running due actions: log, webhook, command, publish; retried with backoff until they
succeed or expire, each destination in its own worker pool."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from socket import SHUT_RDWR
from socket import socket as RawSocket
from typing import Any

import zmq

from monitor.apps.alert.config import Action, AlertConfig
from monitor.apps.alert.outbox import Outbox
from monitor.errors import ConfigError

logger = logging.getLogger(__name__)


class DeadlineExceeded(TimeoutError):
    """An action ran past its `timeout_s`: it was abandoned (webhook) or killed (command)."""


def run_webhook(action: Action, payload: dict[str, Any], key: str) -> None:
    """POST the alert as JSON; raises on anything but 2xx.

    `timeout_s` is a hard deadline for the whole exchange (connect, send, the answer): at
    it the socket is shut down, so a receiver that never answers, or trickles its answer
    a byte at a time, frees this worker then (DeadlineExceeded). Name lookup is not
    covered: use an address or a local resolver for a destination that must not wait."""
    assert action.url is not None
    url = urllib.parse.urlsplit(action.url)
    body = json.dumps(payload).encode()
    cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = cls(url.hostname or "", url.port, timeout=action.timeout_s)
    lock = threading.Lock()
    aborted = threading.Event()

    def abort() -> None:
        with lock:
            aborted.set()
            if conn.sock is not None:  # the plain socket's shutdown, under TLS too
                with contextlib.suppress(OSError):
                    RawSocket.shutdown(conn.sock, SHUT_RDWR)

    timer = threading.Timer(action.timeout_s, abort)
    timer.daemon = True
    timer.start()
    try:
        try:
            conn.connect()
            with lock:
                if aborted.is_set():
                    raise OSError("deadline passed while connecting")
            target = (url.path or "/") + (f"?{url.query}" if url.query else "")
            conn.request("POST", target, body=body,
                         headers={"Content-Type": "application/json", "Idempotency-Key": key,
                                  **action.headers})
            response = conn.getresponse()
            response.read()
        except Exception as err:  # whatever the shut-down socket made the client raise
            if aborted.is_set():
                raise DeadlineExceeded(f"no answer within timeout_s {action.timeout_s:g} s: "
                                       "abandoned") from err
            raise
    finally:
        timer.cancel()
        conn.close()
    if not 200 <= response.status < 300:
        raise OSError(f"HTTP {response.status}")


def run_command(action: Action, payload: dict[str, Any], key: str) -> None:
    """Run argv with the alert JSON on stdin; fields are also `{name}` placeholders.

    `timeout_s` is a hard deadline: at it the command and everything it started (its own
    process group) are killed with SIGKILL, and DeadlineExceeded is raised."""
    fields = {k: "" if v is None else str(v) for k, v in payload.items()}
    argv = [a.format_map(fields) for a in action.argv]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True,
                               env={"AUDIO_MONITOR_ALERT_KEY": key,
                                    "PATH": "/usr/local/bin:/usr/bin:/bin"})
    try:
        _, stderr = process.communicate(json.dumps(payload).encode(), timeout=action.timeout_s)
    except subprocess.TimeoutExpired as err:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for pipe in (process.stdin, process.stdout, process.stderr):
            with contextlib.suppress(OSError):
                pipe.close()  # type: ignore[union-attr]
        process.wait()
        raise DeadlineExceeded(f"did not exit within timeout_s {action.timeout_s:g} s: "
                               "killed") from err
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    if process.returncode != 0:
        raise OSError(f"exit status {process.returncode}: "
                      f"{stderr.decode(errors='replace')[-200:]}")


@dataclass
class Health:
    """`running` or `degraded` with what went wrong and what to do (`last_error`)."""

    name: str
    state: str = "running"
    last_error: str | None = None
    failures: int = 0
    failed_at: float = 0.0

    def failed(self, text: str, now: float) -> None:
        self.failures += 1
        self.failed_at = now
        if self.state != "degraded" or self.failures % 100 == 0:
            logger.error("%s degraded (%d failures so far): %s", self.name, self.failures, text)
        self.state, self.last_error = "degraded", text

    def settle(self, now: float, *, quiet_s: float = 5.0) -> None:
        """Back to `running` once nothing has failed for `quiet_s`."""
        if self.state == "degraded" and now - self.failed_at >= quiet_s:
            logger.warning("%s running again (was: %s)", self.name, self.last_error)
            self.state, self.last_error = "running", None


def state_error(path: Path, err: BaseException) -> str:
    """`last_error` for a failing state file: which file, what, and the cure."""
    return (f"state {path}: {type(err).__name__}: {err}; events are judged again from the "
            f"sensors' journals once it is writable (free disk space, or make {path.parent} "
            "writable); if it is damaged, stop the daemon and move the file aside")


DESTINATION_COUNTERS = ("delivered", "failed", "timeouts", "expired", "in_flight")
"""Per destination (`rule/action`), in `Dispatcher.destinations` and the status."""

STOP_WAIT_S = 5.0
"""On stop, how long the dispatcher waits for actions in flight."""


class Dispatcher:
    """Runs due outbox rows in its own thread. Webhooks and commands run in one worker pool
    per destination (action), each of `workers` threads with the action's own timeout, so
    a destination that hangs holds up only its own alerts."""

    def __init__(self, config: AlertConfig, *, context: zmq.Context[Any],
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.context = context
        self.clock = clock
        self.actions = {f"{r.name}/{a.name}": a for r in config.rules for a in r.actions}
        self.actions.update({f"{r.name}/escalate/{a.name}": a
                             for r in config.rules for a in r.escalations})
        self.wake = threading.Event()
        self.delivered = 0
        self.failed = 0
        self.expired = 0
        self.destinations: dict[str, Counter[str]] = {name: Counter() for name in self.actions}
        """Per action (`rule/action`): delivered, failed, timeouts (ran past `timeout_s`:
        abandoned or killed, counted in failed too), expired, in_flight. Read under `lock`."""
        self.bound_endpoint = ""
        self.health = Health("alert dispatcher")
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._local = threading.local()
        self.lock = threading.Lock()
        self._conns: list[Outbox] = []
        self._thread = threading.Thread(target=self._run, name="alert-dispatch", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise ConfigError("alert: the dispatcher did not start within 10 s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _run(self) -> None:
        pub = None
        try:
            outbox = Outbox(self.config.state)
            if self.config.publish_endpoint is not None:
                pub = self.context.socket(zmq.PUB)
                pub.setsockopt(zmq.LINGER, 500)
                pub.bind(self.config.publish_endpoint)
                self.bound_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        except (ConfigError, zmq.ZMQError) as err:
            self._error = err if isinstance(err, ConfigError) else ConfigError(
                f"$.publish_endpoint: cannot bind {self.config.publish_endpoint!r}: "
                f"{zmq.strerror(err.errno or 0)}; is another process using it?")
            if pub is not None:
                pub.close()
            self._ready.set()
            return
        pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        busy: dict[str, concurrent.futures.Future[None]] = {}
        self._ready.set()
        try:
            while not self._stop.is_set():
                try:
                    more = self._step(outbox, pub, pools, busy)
                except Exception as err:  # the state file failed: degrade, retry
                    self.health.failed(state_error(self.config.state, err), self.clock())
                    self._stop.wait(1.0)
                    continue
                self.health.settle(self.clock())
                if more:
                    continue
                nxt = outbox.next_due()
                self.wake.wait(0.5 if nxt is None else min(0.5, max(0.0, nxt - self.clock())))
                self.wake.clear()
        finally:
            for pool in pools.values():
                pool.shutdown(wait=False, cancel_futures=True)
            # An action in flight may hang up to its own timeout: wait a little, not for it.
            _, pending = concurrent.futures.wait(list(busy.values()), timeout=STOP_WAIT_S)
            if not pending:
                with self.lock:
                    for conn in self._conns:
                        conn.close()
            if pub is not None:
                pub.close()
            outbox.close()

    def _step(self, outbox: Outbox, pub: zmq.Socket[Any] | None,
              pools: dict[str, concurrent.futures.ThreadPoolExecutor],
              busy: dict[str, concurrent.futures.Future[None]]) -> bool:
        """Start what is due; True if there may be more right away."""
        now = self.clock()
        for key in [k for k, f in busy.items() if f.done()]:
            del busy[key]  # recorded by the worker itself
        per_action = Counter(key.rsplit("|", 1)[1] for key in busy)
        depth = self.config.workers * 2  # queued per destination, at most
        full = frozenset(a for a, n in per_action.items() if n >= depth)
        limit = depth * max(1, len(self.actions))
        rows = outbox.due(now, limit=limit, busy=set(busy), skip_actions=full)
        for row in rows:
            name = row["action"]
            action = self.actions.get(name)
            if action is None:  # the rule was removed from alert.yaml
                outbox.failed(row["key"], now=now, error="action no longer configured",
                              retry_at=float("inf"))
                continue
            payload = {**row["payload"], "attempt": row["attempts"] + 1}
            if action.type in ("log", "publish"):
                self._record(outbox, row["key"], self._inline(action, payload, pub), now)
                continue
            if per_action[name] >= depth:
                continue
            pool = pools.get(name)
            if pool is None:
                pool = pools[name] = concurrent.futures.ThreadPoolExecutor(
                    self.config.workers, thread_name_prefix=f"alert-{name}")
            future = pool.submit(self._work, action, payload, row["key"])
            future.add_done_callback(lambda _: self.wake.set())
            busy[row["key"]] = future
            per_action[name] += 1
        with self.lock:
            for name, counts in self.destinations.items():
                counts["in_flight"] = per_action[name]
        return len(rows) == limit

    def _work(self, action: Action, payload: dict[str, Any], key: str) -> None:
        """Worker thread: run the action and record the outcome at once (the smaller the
        gap between the two, the fewer repeats a crash can cause)."""
        try:
            outbox = getattr(self._local, "outbox", None)
            if outbox is None:
                outbox = self._local.outbox = Outbox(self.config.state, any_thread=True)
                with self.lock:
                    self._conns.append(outbox)
            run = run_webhook if action.type == "webhook" else run_command
            try:
                run(action, payload, key)
            except Exception as err:
                self._record(outbox, key, err, self.clock())
            else:
                self._record(outbox, key, None, self.clock())
        except Exception as err:  # the state file failed; the row stays pending: retried
            self.health.failed(state_error(self.config.state, err), self.clock())

    def _inline(self, action: Action, payload: dict[str, Any],
                pub: zmq.Socket[Any] | None) -> BaseException | None:
        if action.type == "log":
            logger.warning("ALERT %s %s %s %s on %s (score %.2f, event %s)",
                           payload["rule"], payload["kind"], payload["label"], payload["phase"],
                           payload["sensor_id"], payload["peak_score"], payload["event_id"])
            return None
        if pub is None:
            return OSError("publish action needs publish_endpoint in alert.yaml")
        try:
            pub.send_multipart([f"alert.{payload['rule']}".encode(),
                                json.dumps(payload).encode()], flags=zmq.NOBLOCK)
        except zmq.ZMQError as err:
            return err
        return None

    def _record(self, outbox: Outbox, key: str, error: BaseException | None,
                now: float) -> None:
        name = key.rsplit("|", 1)[1]
        if error is None:
            outbox.delivered(key, now=now)
            with self.lock:
                self.delivered += 1
                self.destinations[name]["delivered"] += 1
            return
        action = self.actions[name]
        row = outbox.attempts(key)
        delay = min(action.max_backoff_s, action.backoff_s * 2 ** row)
        state = outbox.failed(key, now=now, error=f"{type(error).__name__}: {error}",
                              retry_at=now + delay)
        with self.lock:
            self.failed += 1
            self.expired += state == "expired"
            counts = self.destinations[name]
            counts["failed"] += 1
            counts["timeouts"] += isinstance(error, DeadlineExceeded)
            counts["expired"] += state == "expired"
        if state == "expired":
            logger.error("alert %s expired after %d attempts: %s", key, row + 1, error)
        elif row == 0:  # the first failure is worth a look; retries are routine
            logger.warning("alert %s failed (%s); retry in %.1f s", key, error, delay)
        else:
            logger.info("alert %s failed again (%s); retry in %.1f s", key, error, delay)
