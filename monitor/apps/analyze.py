"""Offline analysis of audio files with exactly the live processing chain."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.capture.audiofile import AudioFile
from monitor.config import Config
from monitor.detect.detector import Detector
from monitor.detect.events import Transition
from monitor.errors import MonitorError, SourceError
from monitor.pipeline.processor import Processor
from monitor.pipeline.results import NullSink

BLOCK_FRAMES = 4096
EXIT_UNREADABLE = 2  # a file could not be read: a user error, as a bad config is


@dataclass(frozen=True)
class FileEvent:
    """One finished event in a file; times in seconds from the file's start."""

    file: str
    label: str
    start_s: float
    end_s: float
    score: float
    machine: str | None = None

    def to_json(self) -> dict[str, object]:
        row: dict[str, object] = {"file": self.file, "class": self.label,
                                  "start_s": self.start_s, "end_s": self.end_s,
                                  "score": self.score}
        if self.machine is not None:
            row["machine"] = self.machine
        return row


class _CollectingSink(NullSink):
    def __init__(self, file: str, sample_rate: int) -> None:
        self.file = file
        self.sample_rate = sample_rate
        self.events: list[FileEvent] = []

    def on_transition(self, transition: Transition) -> None:
        if transition.phase != "end" or transition.offset is None:
            return
        self.events.append(FileEvent(
            file=self.file, label=transition.label,
            start_s=round(transition.onset / self.sample_rate, 4),
            end_s=round(transition.offset / self.sample_rate, 4),
            score=round(transition.peak_score, 4), machine=transition.machine))


@dataclass(frozen=True)
class FileAnalysis:
    """What `analyze` found in one file and what it has to say about the file."""

    events: list[FileEvent]
    error: str | None
    """The read error that cut the file short, if any (events before it are kept)."""
    warnings: list[str]
    """Damage and edge cases, one line each: a file shorter than its header promised, a
    file shorter than one window (padded with silence and scored)."""
    seconds: float
    """Audio read, seconds."""
    windows: int
    """Windows scored, the end-of-file padding included."""


def analyze(path: Path, *, config: Config, detector: Detector) -> FileAnalysis:
    """Events found in one file, as the live daemon would find them (same chain, same
    `Processor.finish` at the end of the file)."""
    audio = AudioFile(path)
    detector.reset()
    sink = _CollectingSink(str(path), detector.card.frontend.sample_rate)
    error = None
    warnings = []
    with audio:
        processor = Processor.from_config(
            config, detector, in_rate=audio.sample_rate, channels=audio.channels,
            max_block=BLOCK_FRAMES, sink=sink)
        block = np.zeros((BLOCK_FRAMES, audio.channels), dtype=np.float32)
        try:
            while n := audio.read_into(block):
                processor.process(block[:n].reshape(-1))
        except SourceError as err:
            error = str(err)
        processor.finish()
    truncated = audio.truncation()
    if truncated is not None and error is None:
        warnings.append(truncated)
    timing = processor.timing
    seconds = processor.samples / timing.sample_rate
    if processor.samples < timing.detector_window:
        warnings.append(f"{path}: holds {seconds:.3f} s of audio, less than one "
                        f"{timing.detector_window / timing.sample_rate:.3f} s window: padded "
                        f"with silence and scored ({processor.windows} windows)")
    return FileAnalysis(events=sink.events, error=error, warnings=warnings, seconds=seconds,
                        windows=processor.windows)


def analyze_file(path: Path, *, config: Config,
                 detector: Detector) -> tuple[list[FileEvent], str | None]:
    """`analyze` reduced to the events and the read error, if any."""
    result = analyze(path, config=config, detector=detector)
    return result.events, result.error


def audio_suffixes() -> frozenset[str]:
    """File name endings of the formats libsndfile reads with a header (`.wav`, `.flac`,
    `.ogg`, `.mp3`, ...), lower case; headerless `.raw` is left out (no rate to read it at)."""
    import soundfile

    return frozenset({f".{name.lower()}" for name in soundfile.available_formats()}
                     | {".aif", ".oga", ".opus"}) - {".raw"}


def expand_folders(paths: Sequence[Path],
                   warn: Callable[[str], None] | None = None) -> tuple[list[Path], list[Path]]:
    """(`paths` with each folder replaced by the audio files under it, the folders that held
    none). Under a folder: any depth, in path order, hidden files and folders (a name starting
    with `.`, such as macOS's `._x.wav`) and other files skipped, symbolic links to folders not
    followed; a subfolder that cannot be listed is passed to `warn`. Files are kept as given,
    whatever their name; a path given twice (or a file also under a given folder) once."""
    suffixes = audio_suffixes()
    out: dict[Path, None] = {}
    empty = []

    def unreadable(err: OSError) -> None:
        if warn is not None:
            warn(f"cannot list folder {err.filename}: {err.strerror}")

    for path in paths:
        if not path.is_dir():
            out.setdefault(path)
            continue
        found = []
        for root, dirs, names in os.walk(path, onerror=unreadable):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [Path(root) / n for n in names
                      if not n.startswith(".") and Path(n).suffix.lower() in suffixes]
        if not found:
            empty.append(path)
        for f in sorted(found):
            out.setdefault(f)
    return list(out), empty


def analyze_command(files: Sequence[Path], *, config: Config, table: bool) -> int:
    """`audio-monitor analyze`: each file's events as JSON lines (or one table at the end);
    a folder stands for the audio files under it (`expand_folders`); warnings and unreadable
    files on stderr. Returns 2 if any file could not be read or a folder holds no audio."""
    detector = Detector(config.model.path, threads=config.model.threads)
    rows = []
    failed = 0

    def warn(line: str) -> None:
        print(f"audio-monitor: warning: {line}", file=sys.stderr)

    paths, empty = expand_folders(files, warn)
    for folder in empty:
        print(f"audio-monitor: error: folder {folder} holds no audio files (.wav, .flac, "
              ".ogg, .mp3 or another format libsndfile reads)", file=sys.stderr)
        failed += 1
    for path in paths:
        try:
            result = analyze(path, config=config, detector=detector)
        except MonitorError as err:
            print(f"audio-monitor: error: {err}", file=sys.stderr)
            failed += 1
            continue
        for warning in [result.error, *result.warnings]:
            if warning:
                print(f"audio-monitor: warning: {warning}", file=sys.stderr)
        for event in result.events:
            if not table:
                print(json.dumps(event.to_json()), flush=True)
            rows.append(event)
    if table:
        from rich.console import Console
        from rich.table import Table

        view = Table("file", "class", "start s", "end s", "score")
        for e in rows:
            view.add_row(e.file, e.label, f"{e.start_s:.2f}", f"{e.end_s:.2f}", f"{e.score:.2f}")
        Console().print(view)
    return EXIT_UNREADABLE if failed else 0
