"""Site calibration: per-class thresholds from a room's normal life (`audio-monitor calibrate`;
its options, run and report are in `monitor.apps.calibrate_report`).

The room is heard through exactly the live chain (`Processor`, the same sources as `run`);
a `ScoreRecorder` sink keeps only each watched class's window scores, as float16 values
of `1 - score` (2 bytes a class a window: 0.2 MB an hour for three classes at a 100 ms
stride; no audio and no features are kept). Everything heard counts as a false alarm:
the user records normal life. For each class the daemon's own rule (`resolve_rules`,
with only the threshold changed) is replayed through the real `ClassEventLogic` at
candidate thresholds from the card's threshold up to 0.999 in 0.001 steps, and the
lowest one whose events per hour stay at or below the target is chosen.

Storing `1 - score` puts float16's precision where thresholds lie: its relative error
2^-10 (rounded toward a higher score, so a score at a threshold stays a hit) is at most
5e-4 in score above 0.5, and 1e-6 at 0.999.

Recall cost: the model card may carry `training.validation_positive_peaks`, per class
the highest threshold at which the card's rule still confirms an event in each
validation positive clip; recall at threshold t is the share of them >= t.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from monitor.capture.sources import Source
from monitor.config import Config, EventRule
from monitor.detect.detector import Detector
from monitor.detect.events import ClassEventLogic, ClassRule
from monitor.pipeline.processor import Processor
from monitor.pipeline.results import NullSink
from monitor.pipeline.rules import resolve_rules, rule_at
from monitor.pipeline.timing import Timing, derive_timing

logger = logging.getLogger(__name__)

READ_BLOCK_FRAMES = 4096
POLL_INTERVAL_S = 0.1
PROGRESS_EVERY_S = 600.0
"""Log how much has been heard every this many seconds of audio."""
DRAIN_S = 2.0
TOP_THRESHOLD = 0.999
STEP = 0.001


class ScoreRecorder(NullSink):
    """A sink that keeps, per watched class, the score of every scored window as float16
    `1 - score` (module docstring). Window k ends at sample `first_end + k * stride`."""

    def __init__(self, columns: dict[str, int], *, stride: int, capacity: int) -> None:
        """`columns`: class name -> index in the model's score vector; `capacity`: windows
        to hold before the arrays grow (they double)."""
        self.names = list(columns)
        self._index = np.array(list(columns.values()), dtype=np.intp)
        self._store = np.zeros((max(capacity, 1), len(columns)), dtype=np.float16)
        self._complement = np.zeros(len(columns), dtype=np.float32)
        self._rounded_up = np.zeros(len(columns), dtype=bool)
        self.stride = stride
        self.first_end: int | None = None
        self.count = 0
        self.audio_windows: int | None = None
        """Windows scored before the end of the audio (the rest are end-of-stream padding)."""

    def on_scores(self, end: int, scores: np.ndarray, inference_ms: float = 0.0) -> None:
        if self.first_end is None:
            self.first_end = end
        elif end != self.first_end + self.count * self.stride:
            raise AssertionError(f"window {self.count} ends at {end}, not on the stride")
        if self.count == self._store.shape[0]:
            grown = np.zeros((2 * self.count, self._store.shape[1]), dtype=np.float16)
            grown[:self.count] = self._store
            self._store = grown
        complement, row = self._complement, self._store[self.count]
        np.take(scores, self._index, out=complement)
        np.subtract(np.float32(1.0), complement, out=complement)
        row[:] = complement
        # Round the complement down, the score up: a score at a threshold stays a hit.
        np.greater(row, complement, out=self._rounded_up)
        np.nextafter(row, np.float16(0.0), out=row, where=self._rounded_up)
        self.count += 1

    def mark_audio_end(self) -> None:
        """The audio ended here: windows scored from now on are padding (`finish`)."""
        self.audio_windows = self.count

    def scores(self, name: str) -> np.ndarray:
        """Float32 scores of class `name`, one per window, shape (count,)."""
        column = self._store[:self.count, self.names.index(name)].astype(np.float32)
        return np.subtract(np.float32(1.0), column)

    @property
    def nbytes(self) -> int:
        return self.count * self._store.shape[1] * self._store.itemsize


@dataclass(frozen=True)
class Heard:
    """What `listen` heard: the recorder, the audio's length and why it stopped."""

    recorder: ScoreRecorder
    samples: int
    """Samples of real audio at the front-end rate."""
    sample_rate: int
    stopped_by: str
    """'duration', 'end of source', 'signal' or 'device' (a microphone that needs a restart)."""
    source_error: str | None = None
    """The source's last run-time problem (a damaged file, a device that dropped out)."""

    @property
    def hours(self) -> float:
        return self.samples / self.sample_rate / 3600.0


def listen(config: Config, detector: Detector, source: Source, *, seconds: float | None,
           stop: threading.Event) -> tuple[Heard, Processor]:
    """Run `source` through the live chain until `seconds` of audio are heard, the source
    ends or `stop` is set; then end the stream with `Processor.finish`, as the daemon does."""
    timing = derive_timing(config, detector)
    rules = resolve_rules(config, detector, timing)
    per_hour = round(3600 * timing.sample_rate / timing.stride)
    recorder = ScoreRecorder({name: detector.classes.index(name) for name in rules},
                             stride=timing.stride,
                             capacity=per_hour if seconds is None
                             else round(seconds / 3600 * per_hour) + 64)
    processor = Processor.from_config(
        config, detector, in_rate=source.sample_rate, channels=source.channels,
        max_block=READ_BLOCK_FRAMES, sink=recorder)
    processor.warm_up()
    limit = None if seconds is None else round(seconds * timing.sample_rate)
    channels, ring = source.channels, source.ring
    raw = np.zeros(READ_BLOCK_FRAMES * channels, dtype=np.float32)
    stopped_by = "signal"  # unless the loop below ends otherwise
    next_progress = PROGRESS_EVERY_S * timing.sample_rate

    def read() -> int:
        want = raw.shape[0]
        if limit is not None:
            want = min(want, processor.resampler.inputs_for(limit - processor.samples) * channels)
        n = ring.readinto(raw[:want], multiple_of=channels)
        if n:
            processor.process(raw[:n])
        return n

    source.start()
    logger.info("calibrate: listening to %s%s", source.description,
                "" if seconds is None else f" for {seconds / 3600:.2f} h")
    next_poll = time.monotonic() + POLL_INTERVAL_S
    try:
        while not stop.is_set():
            if limit is not None and processor.samples >= limit:
                stopped_by = "duration"
                break
            n = read()
            if not n and source.exhausted and ring.available() == 0:
                stopped_by = "end of source"
                break
            if processor.samples >= next_progress:
                next_progress += PROGRESS_EVERY_S * timing.sample_rate
                logger.info("calibrate: %.2f h heard", processor.samples
                            / timing.sample_rate / 3600)
            now = time.monotonic()
            if now >= next_poll:
                source.poll(now)
                next_poll = now + POLL_INTERVAL_S
                if source.needs_restart:
                    logger.error("%s; ending calibration with what was heard", source.last_error)
                    stopped_by = "device"
                    break
            if not n and not source.exhausted:
                ring.wait_for(processor.frames_until_output() * channels,
                              timeout=max(next_poll - now, 0.0))
    finally:
        if stopped_by != "device":
            source.stop()
        if stopped_by == "signal":
            deadline = time.monotonic() + DRAIN_S  # audio captured before the signal
            while time.monotonic() < deadline and read() and \
                    (limit is None or processor.samples < limit):
                pass
        recorder.mark_audio_end()
        processor.finish()
    if ring.overrun_samples:
        logger.warning("calibrate: %d samples were lost in ring overruns (processing fell "
                       "behind the source); they were not heard", ring.overrun_samples)
    return Heard(recorder=recorder, samples=processor.samples, sample_rate=timing.sample_rate,
                 stopped_by=stopped_by, source_error=source.last_error), processor


# --- choosing thresholds ----------------------------------------------------------------

def count_events(scores: np.ndarray, rule: ClassRule, *, first_end: int, stride: int,
                 window: int, audio_windows: int, audio_end: int,
                 onset_lead: int | None) -> int:
    """Events the live state machine raises on one class's window scores, the stream's
    end included (`flush`, as `Processor.finish` does).

    Only windows that can change the machine's state are fed: those scoring at or above
    `release`, and the `confirm_m` after each (they empty its N-of-M memory). A window
    below `release` in an idle machine whose memory holds no hit changes nothing.
    """
    logic = ClassEventLogic("c", rule, window=window, stride=stride, onset_lead=onset_lead)
    above = scores >= rule.release
    if not above.any():
        return 0
    reach = np.concatenate([[0], np.cumsum(above)])
    idx = np.arange(scores.shape[0])
    keep = reach[idx + 1] - reach[np.maximum(idx - rule.confirm_m, 0)] > 0
    events = 0
    for k, score in zip(np.flatnonzero(keep).tolist(), scores[keep].tolist(), strict=True):
        if k >= audio_windows and logic.audio_end is None:
            logic.audio_end = audio_end
        t = logic.update(score, first_end + k * stride)
        if t is not None and t.phase == "start":
            events += 1
    logic.audio_end = audio_end
    events += sum(t.phase == "start" for t in logic.flush(audio_end))
    return events


def candidates(card_threshold: float) -> list[float]:
    """The card's threshold, then every 0.001 step above it up to 0.999."""
    first = math.floor(card_threshold * 1000 + 1e-9) + 1
    return [card_threshold] + [k / 1000 for k in range(first, round(TOP_THRESHOLD * 1000) + 1)]


@dataclass(frozen=True)
class ClassResult:
    """One class's calibration; rates in false alarms per hour of what was heard."""

    name: str
    card_threshold: float
    card_events: int
    threshold: float
    """The chosen threshold: the lowest candidate meeting the target (else 0.999)."""
    events: int
    reached: bool
    """False when even 0.999 raises more than the target."""
    recall_card: float | None
    recall: float | None
    positives: int


def calibrate_class(heard: Heard, *, name: str, config: Config, detector: Detector,
                    timing: Timing, target: float,
                    peaks: np.ndarray | None) -> ClassResult:
    """Pick the lowest candidate threshold whose events per hour on `heard` are <= `target`."""
    recorder = heard.recorder
    scores = recorder.scores(name)
    if name in detector.card.thresholds:  # the config's threshold left out: the card's
        card_rule = rule_at(config, detector, timing, name, None)
    else:  # a class the card sets no threshold for: the one the daemon runs now
        card_rule = resolve_rules(config, detector, timing)[name]
    card_threshold = card_rule.threshold
    lead_ms = detector.card.onset_lead_ms
    count = partial(count_events, scores, first_end=recorder.first_end or 0,
                    stride=timing.stride, window=timing.detector_window,
                    audio_windows=recorder.count if recorder.audio_windows is None
                    else recorder.audio_windows, audio_end=heard.samples,
                    onset_lead=None if lead_ms is None
                    else round(lead_ms * timing.sample_rate / 1000))
    allowed = target * heard.hours + 1e-9
    card_events = count(card_rule)
    chosen, events, previous = card_threshold, card_events, card_rule
    configured = config.events.classes.get(name, EventRule()).release
    for threshold in candidates(card_threshold)[1:]:
        if events <= allowed:
            break
        if configured is not None and threshold < configured:
            continue  # config.yaml refuses a threshold below the class's configured release
        rule = rule_at(config, detector, timing, name, threshold)
        if rule.release != previous.release or np.any((scores >= previous.threshold)
                                                      & (scores < threshold)):
            events = count(rule)  # else no window lies between the two: the same hits
        chosen, previous = threshold, rule
    reached = events <= allowed
    return ClassResult(name=name, card_threshold=card_threshold, card_events=card_events,
                       threshold=chosen, events=events, reached=reached,
                       recall_card=_recall(peaks, card_threshold),
                       recall=_recall(peaks, chosen),
                       positives=0 if peaks is None else int(peaks.shape[0]))


def _recall(peaks: np.ndarray | None, threshold: float) -> float | None:
    if peaks is None or peaks.shape[0] == 0:
        return None
    return float(np.mean(peaks >= threshold))


def validation_peaks(model_path: Path) -> dict[str, np.ndarray] | None:
    """`training.validation_positive_peaks` from the model's card, or None when absent or
    malformed (calibration then says the recall cost is unknown)."""
    try:
        raw = json.loads(model_path.with_suffix(".json").read_text(encoding="utf-8"))
        peaks = raw["training"]["validation_positive_peaks"]
        return {str(name): np.asarray([float(v) for v in values], dtype=np.float64)
                for name, values in peaks.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def calibrate(config: Config, detector: Detector, source: Source, *, seconds: float | None,
              target: float, stop: threading.Event) -> tuple[Heard, list[ClassResult]]:
    """Listen, then choose every watched class's threshold (module docstring)."""
    heard, processor = listen(config, detector, source, seconds=seconds, stop=stop)
    peaks = validation_peaks(config.model.path)
    results = []
    if heard.samples:
        for name in processor.rules:
            results.append(calibrate_class(
                heard, name=name, config=config, detector=detector, timing=processor.timing,
                target=target, peaks=None if peaks is None else peaks.get(name)))
    return heard, results
