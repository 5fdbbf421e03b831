"""The processing chain shared by the live daemon and `analyze`.

interleaved device audio -> downmix -> resample -> condition/meter -> log-mel
front end -> sliding-window detector (every stride) -> event logic.

Stream edges: the detector's history starts as silence, so windows are scored at every
stride from the first frame on (a sound in the first second is judged like any other,
and a stream shorter than one window is scored too). `finish` ends every stream the
same way (file end, stdin EOF, SIGTERM, SIGINT, `analyze`): the audio is continued with
silence until every window holding real audio has been scored, then what is pending
is decided (see `monitor.detect.events`).

Live and offline runs feed the same `Processor`, only in different block sizes; the
chain is chunk-size invariant, so both give the same events for the same audio.
Results leave through a `Sink`, so this module does no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from monitor.config import Config
from monitor.detect.anomaly import MachineReading, MachineScorer
from monitor.detect.detector import Detector
from monitor.detect.events import ClassRule, EventLogic
from monitor.dsp.frontend import Frontend
from monitor.dsp.levels import LevelMeter
from monitor.dsp.resample import StreamingResampler, downmix_into
from monitor.pipeline.results import NullSink, Sink
from monitor.pipeline.rules import resolve_rules
from monitor.pipeline.timing import Timing, derive_timing

INFERENCE_HISTORY = 512


class Processor:
    """Turns blocks of interleaved device audio into scores, levels and event transitions."""

    def __init__(self, detector: Detector, *, timing: Timing, rules: dict[str, ClassRule],
                 machines: Sequence[MachineScorer] = (), in_rate: int, channels: int,
                 max_block: int, sink: Sink) -> None:
        """`timing` and `rules` as `derive_timing` and `resolve_rules` make them; `machines`:
        the scorers run beside the detector; `in_rate`, `channels`: the source's audio;
        `max_block`: the most samples one `process` call gets."""
        self.detector = detector
        self.timing = timing
        self.set_rules(rules)
        self.channels = channels
        self.sink = sink
        self.frontend = Frontend(detector.card.frontend, max_block=max_block)
        self.resampler = StreamingResampler(in_rate, timing.sample_rate, max_block=max_block)
        self.meter = LevelMeter()
        self.machines = list(machines)
        self._mono = np.zeros(max_block, dtype=np.float32)
        self._resampled = np.zeros(self.resampler.max_output(max_block), dtype=np.float32)
        self._frames = np.zeros((self.frontend.max_frames(max(self._resampled.shape[0],
                                                              timing.window)),
                                 detector.card.frontend.n_mels), dtype=np.float32)
        self._zeros = np.zeros(timing.window, dtype=np.float32)
        # Frames before frame 0 that hold the stream's first samples after silence, as the
        # front end would have made them had silence preceded the stream: `lead_in` zeros,
        # then the first `window - hop` samples (kept while they arrive).
        self._lead_frames = -(-timing.window // timing.hop) - 1
        self._lead_zeros = self._lead_frames * timing.hop
        self._lead = np.zeros(self._lead_zeros + timing.window - timing.hop, dtype=np.float32)
        self._lead_frontend = Frontend(detector.card.frontend, max_block=self._lead.shape[0])
        self._lead_out = np.zeros((self._lead_frames, detector.card.frontend.n_mels),
                                  dtype=np.float32)
        self._max_block = max_block
        self.samples = 0
        """Samples at the front-end rate processed so far (the audio clock)."""
        self.frames = 0
        """Frames pushed to the detector (after `finish`, with the end-of-stream padding)."""
        self.windows = 0
        self._level_filled = 0
        self._inference_ms = np.zeros(INFERENCE_HISTORY, dtype=np.float64)
        self._inference_count = 0

    @classmethod
    def from_config(cls, config: Config, detector: Detector, *, in_rate: int, channels: int,
                    max_block: int, sink: Sink) -> Processor:
        """The chain `config` describes: its timing, event rules and machine scorers."""
        timing = derive_timing(config, detector)
        machines = [MachineScorer.load(config.state_dir, name, frontend=detector.card.frontend,
                                       config=settings)
                    for name, settings in config.machines.items()]
        return cls(detector, timing=timing, rules=resolve_rules(config, detector, timing),
                   machines=machines, in_rate=in_rate, channels=channels, max_block=max_block,
                   sink=sink)

    def process(self, interleaved: np.ndarray) -> None:
        """Consume a block of interleaved samples (length a multiple of `channels`)."""
        step = self._max_block * self.channels
        for start in range(0, interleaved.shape[0], step):
            piece = interleaved[start:start + step]
            n_mono = downmix_into(piece, self.channels, self._mono)
            n = self.resampler.process(self._mono[:n_mono], self._resampled)
            self._consume(self._resampled[:n])

    def frames_until_output(self) -> int:
        """Input frames (device rate) still to come before the next result a sink receives:
        a scored window, a level span or a machine reading.

        The daemon sleeps until that much audio has arrived: it then wakes a few dozen
        times a second instead of at every capture block, and no result comes later.
        """
        timing = self.timing
        needed = self._samples_until_frame(self._next_scored_frame())
        if timing.publish_levels:
            needed = min(needed, timing.level_span - self._level_filled)
        for scorer in self.machines:
            end = scorer.next_reading_end(timing.frame_end(self.frames))
            frame = max(self.frames, timing.first_frame_ending_at(end))
            needed = min(needed, self._samples_until_frame(frame))
        return self.resampler.inputs_for(needed)

    def _next_scored_frame(self) -> int:
        """Index of the next frame that completes a scored window: windows end at frame
        counts `window_frames + k * stride_frames` for every integer k (the first ones
        begin in the silence before the stream)."""
        timing = self.timing
        count = self.frames + 1  # frames once it is pushed
        return count + (timing.window_frames - count) % timing.stride_frames - 1

    def _samples_until_frame(self, frame_index: int) -> int:
        return self.timing.frame_end(frame_index) - self.samples

    def set_rules(self, rules: dict[str, ClassRule]) -> None:
        """Use new event rules from the next window on (start-up, SIGHUP reload)."""
        timing, detector = self.timing, self.detector
        lead_ms = detector.card.onset_lead_ms
        self.rules = rules
        self.events = EventLogic(
            rules, detector.classes, window=timing.detector_window, stride=timing.stride,
            onset_lead=None if lead_ms is None else round(lead_ms * timing.sample_rate / 1000))

    def _consume(self, block: np.ndarray) -> None:
        span = self.timing.level_span
        while block.shape[0]:
            take = min(block.shape[0], span - self._level_filled)
            piece = block[:take]
            self.meter.condition(piece)
            head = self._lead.shape[0] - self._lead_zeros - self.samples
            if head > 0:
                head = min(head, take)
                start = self._lead_zeros + self.samples
                self._lead[start:start + head] = piece[:head]
            n_frames = self.frontend.process(piece, self._frames)
            self.samples += take
            for i in range(n_frames):
                self._on_frame(self._frames[i])
            self._level_filled += take
            if self._level_filled == span:
                self._level_filled = 0
                self.meter.close_span()
                if self.timing.publish_levels:
                    self.sink.on_level(self.samples, self.meter, self.detector.latest_frame)
            block = block[take:]

    def _on_frame(self, frame: np.ndarray) -> None:
        if self.frames == 0:
            self._push_lead_in()
        for scorer in self.machines:
            reading = scorer.update(frame, self.timing.frame_end(self.frames),
                                    self.meter.rms_dbfs)
            if reading is not None:
                self._on_machine(reading)
        self._push(frame)

    def _push(self, frame: np.ndarray) -> None:
        """Push a frame into the detector and score the window it completes, if it does
        one. The end-of-stream padding comes here directly (machines see only audio)."""
        self.detector.push(frame)
        self.frames += 1
        timing = self.timing
        if (self.frames - timing.window_frames) % timing.stride_frames == 0:
            self._score()

    def _score(self) -> None:
        """Score the window that ends with the latest frame and feed the event logic."""
        started = time.perf_counter()
        scores = self.detector.score()
        inference_ms = (time.perf_counter() - started) * 1000.0
        self._inference_ms[self._inference_count % INFERENCE_HISTORY] = inference_ms
        self._inference_count += 1
        self.windows += 1
        end = self.timing.frame_end(self.frames - 1)
        self.sink.on_scores(end, scores, inference_ms)
        for transition in self.events.update(scores, end):
            self.sink.on_transition(transition)

    def _push_lead_in(self) -> None:
        """Push the frames that straddle the stream's start into the detector's history
        (no window ends on them: the silence before the stream is not judged)."""
        self._lead_frontend.reset()
        n = self._lead_frontend.process(self._lead, self._lead_out)
        for i in range(n):
            self.detector.push(self._lead_out[i])

    def _on_machine(self, reading: MachineReading) -> None:
        self.sink.on_machine(reading)
        if reading.transition is not None:
            self.sink.on_transition(replace(reading.transition, machine=reading.machine))

    def warm_up(self) -> None:
        """Compile every Numba kernel and run the model once, then forget it all, so the
        first real audio is not late (cold JIT takes seconds)."""
        sink, self.sink = self.sink, NullSink()
        try:
            self.process(np.zeros(self.channels * self.resampler.in_rate, dtype=np.float32))
        finally:
            self.sink = sink
        self.frontend.reset()
        self.resampler.reset()
        self.detector.reset()
        self.events.reset()
        for scorer in self.machines:
            scorer.reset()
        self.meter = LevelMeter()
        self._lead.fill(0.0)
        self.samples = self.frames = self.windows = 0
        self._level_filled = 0
        self._inference_count = 0

    def finish(self) -> None:
        """End of stream (file end, stdin EOF, SIGTERM, SIGINT, `analyze`); call it once.

        The audio is continued with digital silence, as a model sees it around a sound:
        the front end is fed zeros until every real sample lies in a frame, then the
        detector gets the silent frame until the last window holding any real frame has
        been scored, at the normal stride. Events are then decided by their rules
        (`EventLogic.flush`): an active one ends, a confirmed candidate still short of
        min_duration is published. Machine scorers, the level meter and `samples` see
        only the real audio.
        """
        timing = self.timing
        self.events.set_audio_end(self.samples)
        if self.samples:
            if self.frames == 0:
                self._push_lead_in()
            # Frame k holds samples [k*hop, k*hop + window): complete those that start
            # inside the audio (fewer than `window` zeros).
            frames_with_audio = -(-self.samples // timing.hop)
            zeros = (frames_with_audio - 1) * timing.hop + timing.window - self.samples
            n = self.frontend.process(self._zeros[:max(zeros, 0)], self._frames)
            for i in range(n):
                self._push(self._frames[i])
            last_real = self.frames - 1
            silence = self.detector.silence
            while self._next_scored_frame() - timing.window_frames < last_real:
                self._push(silence)  # the next window still starts at or before last_real
        for transition in self.events.flush(self.samples):
            self.sink.on_transition(transition)
        for scorer in self.machines:
            for fault in scorer.flush(self.samples):
                self.sink.on_transition(replace(fault, machine=scorer.machine))

    def stats(self) -> dict[str, int]:
        """Monotonic counters of the chain, for the `status` message."""
        meter = self.meter
        return {"samples": self.samples, "frames": self.frames, "windows": self.windows,
                "events_suppressed": self.events.suppressed,
                "nonfinite_samples": meter.nonfinite_total, "clipped_samples": meter.clipped_total,
                "levels_clamped": meter.clamped_levels_total}

    def inference_stats(self) -> tuple[float, float]:
        """(median, max) inference milliseconds over recent windows, then start afresh."""
        n = min(self._inference_count, INFERENCE_HISTORY)
        if n == 0:
            return 0.0, 0.0
        recent = self._inference_ms[:n]
        result = float(np.median(recent)), float(recent.max())
        self._inference_count = 0
        return result
