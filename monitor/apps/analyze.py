"""Offline analysis of audio files with exactly the live processing chain."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from monitor.capture.sources import promised_frames, truncation_warning
from monitor.config import Config
from monitor.detect.detector import Detector
from monitor.detect.events import Transition
from monitor.errors import SourceError
from monitor.pipeline.processor import NullSink, Processor

BLOCK_FRAMES = 4096


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
    try:
        handle = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise SourceError(f"cannot read audio file {path}: {err}") from err
    detector.reset()
    sink = _CollectingSink(str(path), detector.card.frontend.sample_rate)
    error = None
    warnings = []
    read = 0
    with handle:
        promised = promised_frames(path, handle)
        processor = Processor(config, detector, in_rate=handle.samplerate,
                              channels=handle.channels, max_block=BLOCK_FRAMES, sink=sink)
        block = np.zeros((BLOCK_FRAMES, handle.channels), dtype=np.float32)
        try:
            while True:
                n = handle.read(out=block, dtype="float32", always_2d=True).shape[0]
                if n == 0:
                    break
                read += n
                processor.process(block[:n].reshape(-1))
        except (sf.LibsndfileError, RuntimeError) as err:
            error = truncation_warning(path, read, promised, err)
        processor.finish()
    truncated = truncation_warning(path, read, promised)
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
