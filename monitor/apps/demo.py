"""`audio-monitor demo`: real recordings through the whole pipeline, shown as they happen.

The daemon runs on a file source; the printer is one of its outputs, beside the ZeroMQ
publisher, and shows events and what the model hears as the daemon publishes them.
"""

from __future__ import annotations

import csv
import tempfile
import threading
from pathlib import Path

import numpy as np
import soundfile as sf
from msgspec.structs import replace
from rich.console import Console

from monitor.capture.audiofile import read_audio
from monitor.capture.sources import FileSource
from monitor.config import MODELS_DIR, Config
from monitor.config import data_dir as data_dir_default
from monitor.detect.detector import Detector
from monitor.errors import SourceError
from monitor.outputs.composer import Output
from monitor.outputs.publisher import Publisher
from monitor.protocol.messages import Event, Message, Scores
from monitor.service.daemon import Daemon
from monitor.training.dataset import split_of

DEMO_CACHE = MODELS_DIR.parent / ".cache" / "demo"
# Real recordings played by the demo, by label, from the test split of ../shared/data
# (files the event model never trained on). Gaps are digital silence.
DEMO_PLAYLIST = ("non_fall", "cough", "background", "fall", "glass_break", "cough", "fall")


def demo_audio(data_dir: Path | None = None) -> Path:
    """Build (once) the demo recording from real clips; returns its path."""
    target = DEMO_CACHE / "demo.flac"
    if target.is_file():
        return target
    data_dir = data_dir or data_dir_default()
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
        audio, rate = read_audio(files[(index * 7) % len(files)])
        if rate != 16000:
            raise SourceError(f"demo clip {files[0]} is {rate} Hz; expected 16000")
        pieces.append(audio.mean(axis=1))
        pieces.append(np.zeros(8000, dtype=np.float32))
    DEMO_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.flac")
    sf.write(str(tmp), np.concatenate(pieces), 16000, subtype="PCM_16")
    tmp.replace(target)
    return target


class Printer(Output):
    """The demo's output: events as they start and end, what the model hears once a second."""

    name = "printer"

    def __init__(self, console: Console) -> None:
        self.console = console
        self.events: dict[str, int] = {}
        """Events that ended, by class."""
        self._last_scores = -1.0

    def send(self, message: Message) -> None:
        console = self.console
        if isinstance(message, Event):
            if message.phase == "start":
                console.print(f"[bold red]{message.onset_s:7.2f} s  EVENT {message.label}[/] "
                              f"score {message.peak_score:.2f}")
            else:
                self.events[message.label] = self.events.get(message.label, 0) + 1
                console.print(f"[dim]{message.offset_s or 0:7.2f} s  end   {message.label} "
                              f"(peak {message.peak_score:.2f})[/]")
        elif isinstance(message, Scores) and message.t_audio_s - self._last_scores >= 1.0:
            self._last_scores = message.t_audio_s
            top = "  ".join(f"{label} {score:.2f}" for label, score, _ in message.top[:3])
            console.print(f"[dim]{message.t_audio_s:7.2f} s  hears: {top}[/]")


def run_demo(config: Config, *, audio: Path | None, fast: bool) -> int:
    path = audio or demo_audio()
    console = Console(highlight=False)
    detector = Detector(config.model.path, threads=config.model.threads)
    source = FileSource(path, realtime=not fast, ring_seconds=config.audio.ring_seconds,
                        block_ms=config.audio.block_ms)
    seconds = source.frames_promised / source.sample_rate if source.frames_promised else 0.0
    printer = Printer(console)
    with tempfile.TemporaryDirectory(prefix="audio-monitor-demo-") as folder:
        # ZeroMQ still publishes (`audio-monitor listen ipc://...` could watch), privately.
        endpoint = f"ipc://{folder}/demo.sock"
        config = replace(config, source=f"file:{path}",
                         publish=replace(config.publish, endpoint=endpoint))
        publisher = Publisher(endpoint, sensor_id=config.sensor_id,
                              send_hwm=config.publish.send_hwm)
        try:
            daemon = Daemon(config, source=source, detector=detector, publisher=publisher,
                            outputs=[printer])
            console.print(f"[bold]audio-monitor demo[/]: model [cyan]{detector.card.name}[/], "
                          f"{seconds:.0f} s of real recordings from {path.name}"
                          f"{' (fast)' if fast else ' at real-time pace'}")
            daemon.run(threading.Event())
        finally:
            publisher.close()
    found = ", ".join(f"{label} x{count}" for label, count in sorted(printer.events.items()))
    console.print(f"[bold]detected:[/] {found or 'none'}")
    return 0
