"""Fleet scale (issue 8): N sensor processes -> ONE proxy process -> one subscriber process,
against the same N sensors connected directly to the subscriber, measured in the same run.

Each sensor is the real `Publisher` (send_hwm 1000, the config default) in its own spawned
process. *Live*: every sensor sends 10 `level` + 1 `event` per second, phases staggered as
in a real fleet. *Saturated*: every sensor sends the same mix as fast as it can. The
subscriber decodes every message (as the alert daemon does, RCVHWM 100000), counts losses
as seq gaps per sensor and measures latency from the message's `ts` (wall clock taken by
the publisher before encoding; all processes share the machine's clock).

`python -m benchmarks.bench_fleet [--quick]` prints the numbers as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy stays out of the 50 sensor processes' start-up
    import numpy as np

LEVEL_HZ = 10.0
EVENT_EVERY = 10
"""One event after every ten levels: 10 levels + 1 event per second when live."""
MEL_BANDS = 32
SPAWN_TIMEOUT_S = 30.0


# --- child processes (module level: spawn pickles them by name) --------------------------


def _sensor(endpoint: str, sensor_id: str, conn: Connection) -> None:
    """One sensor: binds its PUB and obeys `ping`, `run` and `stop` from the parent."""
    from monitor.outputs.publisher import Publisher
    from monitor.protocol.messages import Event, Level

    mel = [round(-3.0 - 0.137 * i, 6) for i in range(MEL_BANDS)]
    publisher = Publisher(endpoint, sensor_id=sensor_id, send_hwm=1000)
    count = 0

    def one() -> None:
        nonlocal count
        count += 1
        if count % (EVENT_EVERY + 1):
            publisher.publish(Level, t_audio_s=count / LEVEL_HZ, rms_dbfs=-41.25,
                              peak_dbfs=-20.5, mel=mel)
        else:
            wall = time.time()
            publisher.publish(Event, event_id=f"{sensor_id}-{count}", label="Cough",
                              phase="start", onset_s=count / LEVEL_HZ, offset_s=None,
                              onset_time=wall, offset_time=None, peak_score=0.91,
                              threshold=0.5)

    conn.send("ready")
    try:
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            publisher.drain_subscriptions()
            if command[0] == "ping":
                one()
                continue
            _, mode, duration, start_at, offset = command
            first, dropped = publisher.sent + publisher.dropped, publisher.dropped
            first_seq = publisher.next_header()["seq"]  # burn one number: marks the start
            end = start_at + duration
            delay = start_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if mode == "saturated":
                while time.perf_counter() < end:
                    one()
            else:
                period = 1.0 / (LEVEL_HZ * (EVENT_EVERY + 1) / EVENT_EVERY)
                due = start_at + offset
                while due < end:
                    delay = due - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    one()
                    due += period
            sent = publisher.sent + publisher.dropped - first
            conn.send((first_seq + 1, first_seq + sent, sent, publisher.dropped - dropped))
    finally:
        publisher.close()


def _proxy(config_path: str, conn: Connection) -> None:
    """The real proxy, built from a fleet.yaml, until the parent says stop."""
    from monitor.apps.proxy import Proxy, load_proxy_config

    proxy = Proxy(load_proxy_config(Path(config_path)))
    proxy.start()
    conn.send("ready")
    try:
        conn.recv()
    finally:
        proxy.stop()


def _subscriber(endpoints: list[str], sensor_ids: list[str], conn: Connection) -> None:
    """Decodes everything; answers `heard` (every sensor seen?) and `report` (a phase's
    numbers once its last messages are in or the line has gone quiet)."""
    import numpy as np
    import zmq

    from monitor.protocol.messages import decode

    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100000)
    sub.setsockopt(zmq.LINGER, 0)
    for topic in (b"level", b"event"):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    for endpoint in endpoints:
        sub.connect(endpoint)
    index = {sid: i for i, sid in enumerate(sensor_ids)}
    top = np.zeros(len(sensor_ids), dtype=np.int64)
    who: list[int] = []
    seqs: list[int] = []
    latency: list[float] = []
    arrival: list[float] = []
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(conn.fileno(), zmq.POLLIN)

    def receive(timeout_ms: int) -> int:
        got = 0
        if not sub.poll(timeout_ms):
            return 0
        while got < 5000:
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            now = time.time()
            message = decode(frames)
            i = index[message.sensor_id]
            who.append(i)
            seqs.append(message.seq)
            latency.append(now - message.ts)
            arrival.append(time.perf_counter())
            top[i] = max(top[i], message.seq)
            got += 1
        return got

    def forget() -> None:
        for records in (who, seqs, latency, arrival):
            records.clear()

    conn.send("ready")
    try:
        while True:
            ready = dict(poller.poll(100))
            if sub in ready:
                receive(0)
            if conn.fileno() not in ready:
                continue
            command = conn.recv()
            if command[0] == "stop":
                break
            if command[0] == "heard":
                conn.send(bool((top > 0).all()))
                forget()
                continue
            _, ranges, start_at, quiet_s, deadline_s = command
            last = np.array([ranges[sid][1] for sid in sensor_ids], dtype=np.int64)
            deadline = time.perf_counter() + deadline_s
            quiet_until = time.perf_counter() + quiet_s
            while (top < last).any() and time.perf_counter() < min(deadline, quiet_until):
                if receive(20):
                    quiet_until = time.perf_counter() + quiet_s
            conn.send(_phase_numbers(sensor_ids, ranges, start_at, np.array(who),
                                     np.array(seqs), np.array(latency), np.array(arrival)))
            forget()
    finally:
        sub.close()
        context.term()


def _phase_numbers(sensor_ids: list[str], ranges: dict[str, tuple[int, int]], start_at: float,
                   who: np.ndarray, seqs: np.ndarray, latency_s: np.ndarray,
                   arrival: np.ndarray) -> dict[str, Any]:
    import numpy as np

    keep = np.zeros(who.shape[0], dtype=bool)
    expected = gaps = 0
    for i, sid in enumerate(sensor_ids):
        first, last = ranges[sid]
        mine = (who == i) & (seqs >= first) & (seqs <= last)
        keep |= mine
        got = np.unique(seqs[mine])
        expected += last - first + 1
        # gaps: missing numbers between the first and last received (in-stream losses)
        if got.shape[0]:
            gaps += int(got[-1] - got[0] + 1 - got.shape[0])
    received = int(keep.sum())
    lat_ms = latency_s[keep] * 1000.0
    span = float(arrival[keep].max() - start_at) if received else 0.0
    out: dict[str, Any] = {"expected": expected, "received": received,
                           "lost": expected - received, "seq_gaps": gaps,
                           "received_per_s": received / span if span > 0 else 0.0}
    if received:
        out.update({"p50_ms": float(np.percentile(lat_ms, 50)),
                    "p99_ms": float(np.percentile(lat_ms, 99)), "max_ms": float(lat_ms.max())})
    return out


# --- orchestration -----------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _expect(conn: Connection, timeout_s: float, what: str) -> Any:
    if not conn.poll(timeout_s):
        raise TimeoutError(f"fleet bench: no answer from {what} within {timeout_s:g} s")
    return conn.recv()


class _Child:
    """A spawned process with a pipe; `close` asks, then terminates, then kills."""

    def __init__(self, ctx: Any, target: Any, args: tuple[Any, ...], name: str) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(*args, child), name=name, daemon=True)
        self.proc.start()
        child.close()
        self.name = name

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # already gone
            self.conn.send(("stop",))

    def reap(self, timeout_s: float) -> None:
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)
        self.conn.close()


def _stop_all(children: list[_Child]) -> None:
    for child in children:
        child.close()
    deadline = time.monotonic() + 5.0
    for child in children:
        child.reap(max(0.1, deadline - time.monotonic()))
    children.clear()


def _phase(sensors: list[_Child], sub: _Child, mode: str, seconds: float,
           proxy: _Child | None) -> dict[str, Any]:
    start_at = time.perf_counter() + 0.2
    n = len(sensors)
    for i, sensor in enumerate(sensors):  # stagger live senders across one level period
        sensor.conn.send(("run", mode, seconds, start_at, i / (n * LEVEL_HZ)))
    cpu0 = _cpu_s(proxy.proc.pid) if proxy is not None and proxy.proc.pid else 0.0
    ranges, sent, dropped = {}, 0, 0
    for sensor in sensors:
        first, last, count, refused = _expect(sensor.conn, seconds + 20.0, sensor.name)
        ranges[sensor.name] = (first, last)
        sent += count
        dropped += refused
    sub.conn.send(("report", ranges, start_at, 0.5, 5.0))
    result = _expect(sub.conn, 20.0, "subscriber")
    if proxy is not None and proxy.proc.pid:
        result["proxy_cpu_percent"] = 100.0 * (_cpu_s(proxy.proc.pid) - cpu0) / (
            time.perf_counter() - start_at)
    result.update({"sent": sent, "refused_at_publisher": dropped,
                   "sent_per_s": sent / seconds, "loss_percent": 100.0 * result["lost"]
                   / max(1, result["expected"])})
    return result


def _one_size(ctx: Any, folder: Path, n: int, live_s: float, saturated_s: float
              ) -> dict[str, Any]:
    ids = [f"s{i:02d}" for i in range(n)]
    endpoints = [f"ipc://{folder}/{sid}.pub" for sid in ids]
    fleet = {"publish": f"ipc://{folder}/bus-{n}.pub",
             "sensors": {sid: {"publish": ep} for sid, ep in zip(ids, endpoints, strict=True)}}
    config = folder / f"fleet-{n}.yaml"
    config.write_text(json.dumps(fleet))  # JSON is YAML
    children: list[_Child] = []
    result: dict[str, Any] = {"sensors": n}
    try:
        spawned = time.perf_counter()
        sensors = [_Child(ctx, _sensor, (ep, sid), sid)
                   for sid, ep in zip(ids, endpoints, strict=True)]
        children.extend(sensors)
        for sensor in sensors:
            _expect(sensor.conn, SPAWN_TIMEOUT_S, sensor.name)
        result["spawn_s"] = time.perf_counter() - spawned
        for route in ("direct", "proxy"):
            proxy = None
            if route == "proxy":
                proxy = _Child(ctx, _proxy, (str(config),), "proxy")
                children.append(proxy)
                _expect(proxy.conn, SPAWN_TIMEOUT_S, "proxy")
            sub = _Child(ctx, _subscriber,
                         (endpoints if proxy is None else [fleet["publish"]], ids), "subscriber")
            children.append(sub)
            _expect(sub.conn, SPAWN_TIMEOUT_S, "subscriber")
            for _ in range(100):  # slow joiners: until every sensor has been heard
                for sensor in sensors:
                    sensor.conn.send(("ping",))
                time.sleep(0.05)
                sub.conn.send(("heard",))
                if _expect(sub.conn, 10.0, "subscriber"):
                    break
            else:
                raise TimeoutError(f"fleet bench ({route}, {n} sensors): subscriber never "
                                   "heard every sensor")
            result[route] = {"live": _phase(sensors, sub, "live", live_s, proxy),
                             "saturated": _phase(sensors, sub, "saturated", saturated_s,
                                                 proxy)}
            for child in (sub, proxy):
                if child is not None:
                    children.remove(child)
                    _stop_all([child])
    finally:
        _stop_all(children)
    for mode in ("live", "saturated"):
        direct, proxied = result["direct"][mode], result["proxy"][mode]
        if direct.get("p50_ms") and proxied.get("p50_ms"):
            result[f"{mode}_p50_proxy_over_direct"] = proxied["p50_ms"] / direct["p50_ms"]
        if proxied["received_per_s"] > 0:
            result[f"{mode}_rate_direct_over_proxy"] = (direct["received_per_s"]
                                                        / proxied["received_per_s"])
    return result


def bench_fleet(quick: bool) -> dict[str, Any]:
    """Live and saturated fleets of N sensors, through one proxy and direct, same run."""
    sizes = (1, 10) if quick else (1, 10, 50)
    live_s, saturated_s = (1.5, 1.0) if quick else (2.5, 2.0)
    ctx = mp.get_context("spawn")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="am-fleet-") as folder:
        runs = {str(n): _one_size(ctx, Path(folder), n, live_s, saturated_s) for n in sizes}
    return {"live_s": live_s, "saturated_s": saturated_s, "sizes": runs,
            "wall_s": time.perf_counter() - started,
            "note": "live: 10 level + 1 event per sensor per second; latency is publisher ts "
                    "-> decoded at the subscriber"}


def render_rows(fleet: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows for the suite's table: live latency and saturated throughput per fleet size."""
    rows = []
    for n, r in fleet.get("sizes", {}).items():
        live_p, live_d = r["proxy"]["live"], r["direct"]["live"]
        sat_p, sat_d = r["proxy"]["saturated"], r["direct"]["saturated"]
        rows.append((f"fleet {n} sensors live, via proxy",
                     f"p50 {live_p.get('p50_ms', 0):.2f} ms",
                     f"p99 {live_p.get('p99_ms', 0):.2f}, max {live_p.get('max_ms', 0):.2f} ms; "
                     f"direct p50 {live_d.get('p50_ms', 0):.2f}, p99 "
                     f"{live_d.get('p99_ms', 0):.2f} ms; lost {live_p['lost']}/"
                     f"{live_p['expected']} (direct {live_d['lost']})"))
        rows.append((f"fleet {n} sensors saturated, proxy",
                     f"{sat_p['received_per_s']:.0f} msg/s",
                     f"direct {sat_d['received_per_s']:.0f} msg/s "
                     f"(direct/proxy {r.get('saturated_rate_direct_over_proxy', 0):.2f}); lost "
                     f"{sat_p['loss_percent']:.1f}% (direct {sat_d['loss_percent']:.1f}%); "
                     f"proxy CPU {sat_p.get('proxy_cpu_percent', 0):.0f}%"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_fleet")
    parser.add_argument("--quick", action="store_true", help="N = 1 and 10, shorter phases")
    args = parser.parse_args()
    result = bench_fleet(args.quick)
    for row in render_rows(result):
        print(f"{row[0]:<36}  {row[1]:>16}  {row[2]}")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
