"""`audio-monitor demo`: real recordings through the whole pipeline, shown as they happen.

The daemon runs in a thread on a file source; this thread subscribes over ZeroMQ like
any other subscriber and prints events and what the model hears.
"""

from __future__ import annotations

import csv
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import zmq
from msgspec.structs import replace
from rich.console import Console

from monitor.config import Config
from monitor.daemon import Daemon
from monitor.detector import Detector
from monitor.errors import MonitorError, SourceError
from monitor.messages import Event, Scores, Status, decode
from monitor.publisher import Publisher
from monitor.sources import FileSource
from monitor.training.dataset import split_of

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("AUDIO_MONITOR_DATA", REPO.parent / "shared" / "data"))
DEMO_CACHE = REPO / ".cache" / "demo"
# Real recordings played by the demo, by label, from the test split of ../shared/data
# (files the event model never trained on). Gaps are digital silence.
DEMO_PLAYLIST = ("non_fall", "cough", "background", "fall", "glass_break", "cough", "fall")
SUBSCRIBER_GRACE_S = 0.3


def demo_audio(data_dir: Path = DATA_DIR) -> Path:
    """Build (once) the demo recording from real clips; returns its path."""
    target = DEMO_CACHE / "demo.flac"
    if target.is_file():
        return target
    labels = data_dir / "labels.csv"
    if not labels.is_file():
        raise SourceError(f"demo recordings not found at {data_dir}; set AUDIO_MONITOR_DATA to "
                          "the folder of real recordings, or pass --file PATH")
    with labels.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    picked: dict[str, list[Path]] = {}
    for row in rows:
        label = row["label"]
        held_out = split_of(row["path"], row["fold"]) == "test" and \
            row.get("channel") != "call-center"
        if label in DEMO_PLAYLIST and held_out:
            picked.setdefault(label, []).append(data_dir / row["path"])
    pieces = []
    used: dict[str, int] = {}
    for label in DEMO_PLAYLIST:
        files = sorted(picked.get(label, []))
        if not files:
            raise SourceError(f"no {label!r} recording found in {labels}")
        index = used.get(label, 0)
        used[label] = index + 1
        audio, rate = sf.read(str(files[(index * 7) % len(files)]), dtype="float32",
                              always_2d=True)
        if rate != 16000:
            raise SourceError(f"demo clip {files[0]} is {rate} Hz; expected 16000")
        pieces.append(audio.mean(axis=1))
        pieces.append(np.zeros(8000, dtype=np.float32))
    DEMO_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.flac")
    sf.write(str(tmp), np.concatenate(pieces), 16000, subtype="PCM_16")
    tmp.replace(target)
    return target


def run_demo(config: Config, *, audio: Path | None, fast: bool) -> int:
    path = audio or demo_audio()
    console = Console(highlight=False)
    detector = Detector(config.model.path, threads=config.model.threads)
    source = FileSource(path, realtime=not fast, ring_seconds=config.audio.ring_seconds,
                        block_ms=config.audio.block_ms)
    seconds = sf.info(str(path)).duration
    with tempfile.TemporaryDirectory(prefix="audio-monitor-demo-") as folder:
        endpoint = f"ipc://{folder}/demo.sock"
        config = replace(config, source=f"file:{path}",
                         publish=replace(config.publish, endpoint=endpoint))
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        for topic in ("event.", "scores", "status"):
            sub.setsockopt_string(zmq.SUBSCRIBE, topic)
        sub.connect(endpoint)
        failure: list[BaseException] = []
        done = threading.Event()

        def serve() -> None:
            try:
                publisher = Publisher(endpoint, sensor_id=config.sensor_id,
                                      send_hwm=config.publish.send_hwm, context=context)
                try:
                    time.sleep(SUBSCRIBER_GRACE_S)  # let the subscriber's connect land
                    Daemon(config, source=source, detector=detector,
                           publisher=publisher).run(threading.Event())
                finally:
                    publisher.close()
            except BaseException as err:  # reported by the main thread
                failure.append(err)
            finally:
                done.set()

        console.print(f"[bold]audio-monitor demo[/]: model [cyan]{detector.card.name}[/], "
                      f"{seconds:.0f} s of real recordings from {path.name}"
                      f"{' (fast)' if fast else ' at real-time pace'}")
        thread = threading.Thread(target=serve, name="demo-daemon", daemon=True)
        thread.start()
        events = _show(sub, console, done)
        thread.join(5.0)
        sub.close()
    if failure:
        if isinstance(failure[0], MonitorError):
            raise failure[0]
        raise RuntimeError("demo daemon failed") from failure[0]
    found = ", ".join(f"{label} x{count}" for label, count in sorted(events.items())) or "none"
    console.print(f"[bold]detected:[/] {found}")
    return 0


def _show(sub: zmq.Socket, console: Console, done: threading.Event) -> dict[str, int]:
    """Print messages until the daemon reports it stopped; returns events per class."""
    events: dict[str, int] = {}
    last_scores = 0.0
    while True:
        if not sub.poll(200):
            if done.is_set():
                return events
            continue
        message = decode(sub.recv_multipart())
        if isinstance(message, Event):
            if message.phase == "start":
                console.print(f"[bold red]{message.onset_s:7.2f} s  EVENT {message.label}[/] "
                              f"score {message.peak_score:.2f}")
            else:
                events[message.label] = events.get(message.label, 0) + 1
                console.print(f"[dim]{message.offset_s or 0:7.2f} s  end   {message.label} "
                              f"(peak {message.peak_score:.2f})[/]")
        elif isinstance(message, Scores) and message.t_audio_s - last_scores >= 1.0:
            last_scores = message.t_audio_s
            top = "  ".join(f"{label} {score:.2f}" for label, score, _ in message.top[:3])
            console.print(f"[dim]{message.t_audio_s:7.2f} s  hears: {top}[/]")
        elif isinstance(message, Status) and message.state == "stopped":
            return events
