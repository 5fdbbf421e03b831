"""Machine-fault scorer: a per-machine baseline of normal sound, scored one log-mel frame at a time.

Feature: the mean of the last ``context_frames`` log-mel frames (a 0.25 s boxcar) of the live
front end. Model: a Gaussian of that feature on the machine's normal sound; the raw score is the
squared Mahalanobis distance per dimension (covariance shrunk towards a scaled identity, so
bands that are constant in the baseline cannot blow up). This won the comparison on CWRU
(docs/anomaly.md: AUC/pAUC of Gaussian, GMM, k-NN and a DCASE-style autoencoder), and it is the
cheapest to run: one triangular mat-vec per 10 ms hop.

Published score: ``r / (1 + r)`` with ``r = smoothed raw score / learned threshold``, so it lies
in [0, 1) and 0.5 means "at the learned threshold"; the event threshold is
``s / (1 + s)`` for ``threshold_scale = s`` (0.5 by default). Fault events come from
:class:`monitor.detect.events.ClassEventLogic` on that score (label ``machine_fault``).

Operating-state gate: learning records the typical running level (median RMS dBFS of 100 ms
spans); at run time a level more than ``GATE_MARGIN_DB`` below it (or below the configured
``min_level_dbfs``) means "machine off or idle": no score, no alarm, ``running=False``.
One normal state is learned per machine (learn separate machines for distinct modes).

Learned baselines are kept on disk by `monitor.detect.baselines`.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.config import MachineConfig
from monitor.detect.baselines import CARD_SCHEMA, Baseline, load_baseline
from monitor.detect.events import ClassEventLogic, ClassRule, Transition
from monitor.dsp.frontend import FrontendParams
from monitor.dsp.jit import kernel
from monitor.errors import ModelError

logger = logging.getLogger(__name__)

FAULT_LABEL = "machine_fault"
CONTEXT_MS = 250.0
"""Boxcar over which log-mel frames are averaged before scoring."""
SHRINKAGE = 0.1
"""Covariance shrinkage towards trace/d * I."""
QUANTILE = 0.995
"""Threshold = this quantile of smoothed held-back normal scores (0.5 % false-alarm target)."""
HELD_BACK = 0.3
"""Last fraction of the learning audio kept out of the fit to set the threshold."""
DEFAULT_SMOOTHING_MS = 1000.0
GATE_MARGIN_DB = 20.0
"""Running level minus this = the level below which the machine counts as off."""
LEVEL_SPAN_MS = 100.0
"""Span of one level measurement (the daemon's `level` span at 10 Hz)."""
SILENCE_DBFS = -90.0
"""Median level below this: the learning audio is silence."""
MIN_SECONDS = 10.0
"""Least audio (machine running) a baseline is learned from."""
EVAL_MS = 100.0
"""The fault event logic is fed every this many ms of audio."""
RELEASE_RATIO = 0.8
"""An event ends when the smoothed raw score falls below this times the alarm threshold."""


@dataclass(frozen=True)
class MachineReading:
    """One health reading of a machine (positions in samples at the front-end rate)."""

    machine: str
    end: int
    score: float
    """Smoothed score in [0, 1): 0.5 = the learned threshold."""
    threshold: float
    """Alarm threshold on `score`: s / (1 + s) for threshold_scale s."""
    running: bool
    transition: Transition | None
    """A `machine_fault` event starting or ending at this reading, else None."""


# --- features and fitting (offline; numpy) -------------------------------------------------

def context_frames(params: FrontendParams) -> int:
    """Frames in the feature boxcar."""
    return max(1, round(CONTEXT_MS / params.hop_ms))


def boxcar_features(logmel: np.ndarray, context: int) -> np.ndarray:
    """(n_frames - context + 1, n_mels) float64 mean of each run of `context` frames."""
    x = np.asarray(logmel, dtype=np.float64)
    c = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])
    return (c[context:] - c[:-context]) / context


def fit_gaussian(features: np.ndarray, *, shrinkage: float = SHRINKAGE
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(mean, U): U upper triangular with U.T @ U = inverse of the shrunk covariance."""
    mean = features.mean(axis=0)
    d = features.shape[1]
    cov = np.cov(features, rowvar=False).reshape(d, d)
    scale = max(float(np.trace(cov)) / d, 1e-6)
    cov = (1.0 - shrinkage) * cov + shrinkage * scale * np.eye(d)
    lower = np.linalg.cholesky(np.linalg.inv(cov))  # inv = L L.T
    return mean, np.ascontiguousarray(lower.T)


def gaussian_scores(features: np.ndarray, mean: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    """Raw scores: squared Mahalanobis distance divided by the dimension."""
    z = (features - mean) @ whiten.T
    return (z * z).sum(axis=1) / features.shape[1]


def ema(raw: np.ndarray, alpha: float) -> np.ndarray:
    """Exponential smoothing as the run-time scorer does it (starts at the first value).
    Also run when a scorer loads (its threshold), so it must not import scipy."""
    out = np.asarray(raw, dtype=np.float64).copy()
    if alpha < 1.0:
        _ema_in_place(out, alpha)
    return out


@kernel("void(f8[::1], f8)")
def _ema_in_place(x: np.ndarray, alpha: float) -> None:  # pragma: no cover - numba
    for i in range(1, x.shape[0]):
        x[i] = x[i - 1] + alpha * (x[i] - x[i - 1])  # the formula of _frame_kernel


def ema_alpha(params: FrontendParams, smoothing_ms: float) -> float:
    """Per-frame smoothing factor for a time constant of smoothing_ms (0: no smoothing)."""
    if smoothing_ms <= 0:
        return 1.0
    return 1.0 - math.exp(-params.hop_ms / smoothing_ms)


def span_levels_dbfs(samples: np.ndarray, params: FrontendParams) -> np.ndarray:
    """RMS dBFS of consecutive LEVEL_SPAN_MS spans (floor -120), as the daemon's level meter."""
    span = round(params.sample_rate * LEVEL_SPAN_MS / 1000.0)
    n = samples.shape[0] // span
    if n == 0:
        return np.zeros(0)
    x = np.asarray(samples[: n * span], dtype=np.float64).reshape(n, span)
    rms = np.sqrt((x * x).mean(axis=1))
    return np.asarray(20.0 * np.log10(np.maximum(rms, 1e-6)))


def fit_baseline(samples: np.ndarray, logmel: np.ndarray, *, machine: str,
                 params: FrontendParams, sources: list[str]) -> Baseline:
    """Learn a baseline from mono audio at the front-end rate and its log-mel frames.

    Spans far below the running level (machine off) are left out. Raises ModelError on
    silence or on too little running audio.
    """
    levels = span_levels_dbfs(samples, params)
    if levels.shape[0] == 0 or float(np.median(levels)) < SILENCE_DBFS:
        level = float(np.median(levels)) if levels.shape[0] else -120.0
        raise ModelError(f"machine {machine!r}: the learning audio is silent (median level "
                         f"{level:.1f} dBFS, need > {SILENCE_DBFS:g}); record it while the "
                         "machine runs")
    typical = float(np.median(levels))
    gate = typical - GATE_MARGIN_DB
    span = round(params.sample_rate * LEVEL_SPAN_MS / 1000.0)
    # A frame is "running" if the level span holding its end is above the gate.
    ends = np.arange(logmel.shape[0]) * params.hop_length + params.win_length
    span_of = np.minimum((ends - 1) // span, levels.shape[0] - 1)
    running = levels[span_of] >= gate
    seconds = float(running.sum()) * params.hop_length / params.sample_rate
    if seconds < MIN_SECONDS:
        raise ModelError(f"machine {machine!r}: {seconds:.1f} s of running-machine audio; "
                         f"need at least {MIN_SECONDS:g} s (a few minutes is better)")
    frames = logmel[running]
    context = context_frames(params)
    n_fit = int(frames.shape[0] * (1.0 - HELD_BACK))
    fit_feats = boxcar_features(frames[:n_fit], context)
    held_feats = boxcar_features(frames[n_fit:], context)
    mean, whiten = fit_gaussian(fit_feats)
    fit_raw = gaussian_scores(fit_feats, mean, whiten)
    calib_raw = gaussian_scores(held_feats, mean, whiten)
    smooth = ema(calib_raw, ema_alpha(params, DEFAULT_SMOOTHING_MS))
    threshold = float(np.quantile(smooth, QUANTILE))
    card = {
        "schema": CARD_SCHEMA,
        "machine": machine,
        "learned_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "sources": sources,
        "sample_rate": params.sample_rate,
        "frontend": {**params.to_dict(), "hash": params.hash()},
        "feature": {"kind": "logmel_boxcar_mahalanobis", "context_frames": context,
                    "context_ms": CONTEXT_MS, "shrinkage": SHRINKAGE},
        "threshold": {"raw": threshold, "quantile": QUANTILE,
                      "smoothing_ms": DEFAULT_SMOOTHING_MS, "held_back_fraction": HELD_BACK},
        "level": {"typical_dbfs": round(typical, 2), "gate_dbfs": round(gate, 2),
                  "gate_margin_db": GATE_MARGIN_DB, "span_ms": LEVEL_SPAN_MS},
        "metrics": {
            "held_back_seconds": round(held_feats.shape[0] * params.hop_ms / 1000.0, 3),
            "fit_raw_median": float(np.median(fit_raw)),
            "held_back_raw_median": float(np.median(calib_raw)),
            "held_back_raw_p99": float(np.quantile(calib_raw, 0.99)),
            "held_back_smoothed_max": float(smooth.max()),
            # > 1 by much: the held-back part differs from the fitted part (drift).
            "drift_ratio": float(np.median(calib_raw) / max(np.median(fit_raw), 1e-12)),
        },
    }
    return Baseline(mean=mean, whiten=whiten, calib_raw=calib_raw, card=card)


# --- run time ------------------------------------------------------------------------------

@kernel("void(f4[::1], f8[:, ::1], f8[::1], f8[::1], f8[::1], f8[:, ::1], f8[::1])")
def _frame_kernel(frame: np.ndarray, ring: np.ndarray, acc: np.ndarray, state: np.ndarray,
                  mean: np.ndarray, whiten: np.ndarray, diff: np.ndarray
                  ) -> None:  # pragma: no cover - numba
    """Push one frame into the boxcar; once full, update the smoothed raw score.

    state: [cursor, filled, alpha, smoothed (or -1 before the first score), last raw];
    diff: (n_mels,) scratch.
    """
    n = frame.shape[0]
    context = ring.shape[0]
    cursor = int(state[0])
    for j in range(n):
        v = np.float64(frame[j])
        acc[j] += v - ring[cursor, j]
        ring[cursor, j] = v
    state[0] = (cursor + 1) % context
    if state[1] < context:
        state[1] += 1
        if state[1] < context:
            return
    inv = 1.0 / context
    for j in range(n):
        diff[j] = acc[j] * inv - mean[j]
    total = 0.0
    for i in range(n):
        s = 0.0
        for j in range(i, n):
            s += whiten[i, j] * diff[j]
        total += s * s
    raw = total / n
    state[4] = raw
    if state[3] < 0.0:
        state[3] = raw
    else:
        state[3] += state[2] * (raw - state[3])


class MachineScorer:
    """Scores one machine's sound frame by frame; allocation-free except for returned readings.

    Not thread-safe: the processing thread owns it.
    """

    def __init__(self, baseline: Baseline, *, machine: str, frontend: FrontendParams,
                 config: MachineConfig) -> None:
        self.machine = machine
        self.card = baseline.card
        self.frontend = frontend
        context = int(baseline.card["feature"]["context_frames"])
        alpha = ema_alpha(frontend, config.smoothing_ms)
        # The threshold holds for the configured smoothing: redo it on the held-back scores.
        raw_threshold = float(np.quantile(ema(baseline.calib_raw, alpha), QUANTILE)) \
            if baseline.calib_raw.shape[0] else float(baseline.card["threshold"]["raw"])
        self.raw_threshold = max(raw_threshold, 1e-12)
        scale = config.threshold_scale
        self.threshold = scale / (1.0 + scale)
        release = RELEASE_RATIO * scale / (1.0 + RELEASE_RATIO * scale)
        if config.min_level_dbfs is not None:
            self.gate_dbfs = float(config.min_level_dbfs)
        else:
            self.gate_dbfs = float(baseline.card["level"]["gate_dbfs"])
        rate = frontend.sample_rate
        self._eval_step = max(1, round(rate * EVAL_MS / 1000.0))
        self._publish_step = max(1, round(rate / config.publish_hz))
        window = (context - 1) * frontend.hop_length + frontend.win_length
        rule = ClassRule(threshold=self.threshold, release=release, confirm_n=1, confirm_m=1,
                         min_duration=round(config.min_duration_ms * rate / 1000.0),
                         refractory=round(config.refractory_ms * rate / 1000.0))
        self.events = ClassEventLogic(FAULT_LABEL, rule, window=window, stride=self._eval_step)
        n_mels = frontend.n_mels
        self._mean = np.ascontiguousarray(baseline.mean, dtype=np.float64)
        self._whiten = np.ascontiguousarray(baseline.whiten, dtype=np.float64)
        if self._mean.shape != (n_mels,) or self._whiten.shape != (n_mels, n_mels):
            raise ModelError(f"machine {machine!r}: baseline arrays {self._mean.shape}, "
                             f"{self._whiten.shape} do not fit {n_mels} mel bands")
        self._ring = np.zeros((context, n_mels), dtype=np.float64)
        self._acc = np.zeros(n_mels, dtype=np.float64)
        self._diff = np.zeros(n_mels, dtype=np.float64)
        self._state = np.zeros(5, dtype=np.float64)
        self._alpha = alpha
        self.reset()

    @classmethod
    def load(cls, state_dir: Path, machine: str, *, frontend: FrontendParams,
             config: MachineConfig) -> MachineScorer:
        """The active baseline of `machine`, checked against the live front end."""
        baseline = load_baseline(state_dir, machine)
        card = baseline.card
        hint = f"relearn with `audio-monitor learn --machine {machine}`"
        if card.get("sample_rate") != frontend.sample_rate:
            raise ModelError(f"machine {machine!r}: baseline learned at {card.get('sample_rate')}"
                             f" Hz, the front end runs at {frontend.sample_rate} Hz; {hint}")
        learned_hash = card.get("frontend", {}).get("hash")
        if learned_hash != frontend.hash():
            raise ModelError(f"machine {machine!r}: baseline front end {learned_hash} differs "
                             f"from the live one {frontend.hash()}; {hint}")
        return cls(baseline, machine=machine, frontend=frontend, config=config)

    def reset(self) -> None:
        """Forget the stream (a new stream or a capture gap)."""
        self._ring.fill(0.0)
        self._acc.fill(0.0)
        self._state[:] = (0.0, 0.0, self._alpha, -1.0, 0.0)
        self._next_eval = -1
        self._next_publish = -1
        self._running = False
        self.events.reset()

    def next_reading_end(self, next_frame_end: int) -> int:
        """The first frame ending at or after this sample may bring a reading, when the next
        frame ends at `next_frame_end` (the first frame only starts the clock)."""
        return next_frame_end + self._eval_step if self._next_eval < 0 else self._next_eval

    @property
    def raw_score(self) -> float:
        """Smoothed raw score (learned threshold = `raw_threshold`); -1 before the first."""
        return float(self._state[3])

    def normalised(self) -> float:
        """Current published score in [0, 1): 0 while off or before the boxcar filled."""
        smoothed = self._state[3]
        if not self._running or smoothed < 0.0:
            return 0.0
        r = smoothed / self.raw_threshold
        return float(r / (1.0 + r))

    def update(self, frame: np.ndarray, end: int, level_dbfs: float) -> MachineReading | None:
        """Feed one log-mel frame (n_mels,) float32 ending at sample `end`; `level_dbfs` is the
        latest input level (the level meter's RMS of its last span). Returns a reading
        `publish_hz` times per second of audio or when a fault event starts or ends."""
        running = level_dbfs >= self.gate_dbfs
        self._running = running
        if running:
            _frame_kernel(frame, self._ring, self._acc, self._state, self._mean, self._whiten,
                          self._diff)
        if self._next_eval < 0:
            self._next_eval = end + self._eval_step
            self._next_publish = end + self._publish_step
            return None
        if end < self._next_eval:
            return None
        self._next_eval += self._eval_step
        score = self.normalised()
        transition = self.events.update(score, end)
        if transition is None and end < self._next_publish:
            return None
        if end >= self._next_publish:
            self._next_publish += self._publish_step * (
                1 + (end - self._next_publish) // self._publish_step)
        return MachineReading(machine=self.machine, end=end, score=score,
                              threshold=self.threshold, running=running, transition=transition)

    def flush(self, end: int) -> list[Transition]:
        """The stream ended at sample `end`: decide a fault event as `ClassEventLogic.flush`
        does (an active one ends; a confirmed one short of min_duration starts and ends)."""
        self.events.audio_end = end
        return self.events.flush(end)
