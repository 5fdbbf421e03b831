"""Per-class event rules and the onset lead, chosen on validation score sequences.

Window scores are replayed through the live state machine (`monitor.detect.events`), so a rule
chosen here behaves exactly as the daemon, `analyze` and `evaluate` will run it. A rule is
chosen jointly with its threshold: among the candidates that keep validation precision at the
target and recall at the best plain (1-of-1) recall, the one with the fewest false alarms on
everyday streams wins: a continuous validation stream, and the cross-fitted training streams
when given (scored by heads whose weights were fitted without them). Ties go to the higher
validation precision, then to the fewest near misses on both sides (stream events of the same
rule 0.1 lower, plus validation events the same rule 0.1 higher would lose), then to the
faster rule (fewer windows to confirm). Counting both sides keeps a threshold off either edge
of a run of thresholds that validation cannot tell apart.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.detect.events import ClassEventLogic, ClassRule
from monitor.detect.yamnet import WINDOW_FRAMES
from monitor.dsp.frontend import FrontendParams

logger = logging.getLogger(__name__)

CONFIRM = ((1, 1), (2, 2), (2, 3), (3, 4), (3, 5))
"""N-of-M confirmations tried."""
MIN_DURATION_MS = (0.0, 100.0, 200.0)
RELEASE_FRACTION = (0.5, 0.8)
"""Release as a fraction of the threshold (hysteresis)."""
THRESHOLDS = tuple(round(float(t), 3) for t in np.r_[np.arange(0.30, 0.995, 0.01),
                                                     np.arange(0.991, 0.9995, 0.001)])
"""0.30-0.99 in steps of 0.01, then 0.991-0.999 in steps of 0.001 (scores crowd near 1)."""
REFRACTORY_MS = 1000.0


@dataclass(frozen=True)
class StreamTiming:
    """Where scored windows end, in samples, as `monitor.pipeline.timing.Timing` places them."""

    hop: int
    win: int
    stride_frames: int
    sample_rate: int

    @classmethod
    def of(cls, params: FrontendParams, *, stride_frames: int) -> StreamTiming:
        return cls(hop=params.hop_length, win=params.win_length, stride_frames=stride_frames,
                   sample_rate=params.sample_rate)

    @property
    def window(self) -> int:
        """Samples one scored window covers."""
        return (WINDOW_FRAMES - 1) * self.hop + self.win

    @property
    def stride(self) -> int:
        return self.stride_frames * self.hop

    def ends(self, n_windows: int) -> np.ndarray:
        """(n,) sample just after window k, which starts at frame k * stride_frames."""
        return np.arange(n_windows, dtype=np.int64) * self.stride + self.window

    def ms(self, samples: float) -> float:
        return samples * 1000.0 / self.sample_rate


@dataclass(frozen=True)
class Candidate:
    """One rule to try, in card units."""

    threshold: float
    release: float
    confirm_n: int
    confirm_m: int
    min_duration_ms: float

    def rule(self, sample_rate: int) -> ClassRule:
        return ClassRule(threshold=self.threshold, release=self.release,
                         confirm_n=self.confirm_n, confirm_m=self.confirm_m,
                         min_duration=round(self.min_duration_ms * sample_rate / 1000.0),
                         refractory=round(REFRACTORY_MS * sample_rate / 1000.0))

    def card_rule(self) -> dict[str, float]:
        """The `rules.<class>` entry of the card (threshold goes to `thresholds`)."""
        return {"release": self.release, "confirm_n": self.confirm_n,
                "confirm_m": self.confirm_m, "min_duration_ms": self.min_duration_ms,
                "refractory_ms": REFRACTORY_MS}


def replay(scores: np.ndarray, rule: ClassRule, timing: StreamTiming, *,
           onset_lead: int | None = None, first_only: bool = False) -> list[int]:
    """Onsets (samples) of the events the live state machine raises on one score sequence
    (only the first with `first_only`)."""
    logic = ClassEventLogic("c", rule, window=timing.window, stride=timing.stride,
                            onset_lead=onset_lead)
    onsets = []
    ends = timing.ends(scores.shape[0])
    for score, end in zip(scores.tolist(), ends.tolist(), strict=True):
        t = logic.update(score, end)
        if t is not None and t.phase == "start":
            onsets.append(t.onset)
            if first_only:
                break
    return onsets


def _any_event(seqs: list[np.ndarray], cand: Candidate, timing: StreamTiming) -> np.ndarray:
    rule = cand.rule(timing.sample_rate)
    return np.array([s.max(initial=0.0) >= cand.threshold
                     and bool(replay(s, rule, timing, first_only=True)) for s in seqs])


def _relaxed(cand: Candidate) -> Candidate:
    """The same rule 0.1 lower: its stream events are near misses of the real one."""
    t = max(cand.threshold - 0.1, 0.0)
    return Candidate(threshold=t, release=min(cand.release, t), confirm_n=cand.confirm_n,
                     confirm_m=cand.confirm_m, min_duration_ms=cand.min_duration_ms)


def _tightened(cand: Candidate) -> Candidate:
    """The same rule 0.1 higher: the validation events it loses are near misses of the
    real one on the other side (positives a quieter room would cost)."""
    t = min(cand.threshold + 0.1, 1.0)
    return Candidate(threshold=t, release=min(cand.release + 0.1, t), confirm_n=cand.confirm_n,
                     confirm_m=cand.confirm_m, min_duration_ms=cand.min_duration_ms)


def _stream_events(streams: Sequence[np.ndarray], cand: Candidate,
                   timing: StreamTiming) -> list[int]:
    """Events the candidate raises on each stream (a stream never reaching the threshold has
    none, without a replay)."""
    rule = cand.rule(timing.sample_rate)
    return [len(replay(s, rule, timing)) if s.max(initial=0.0) >= cand.threshold else 0
            for s in streams]


def tune_class(clip_scores: list[np.ndarray], positive: np.ndarray, stream_scores: np.ndarray,
               timing: StreamTiming, *, target_precision: float,
               false_clip_budget: float = 1.0,
               cross_fit_streams: Sequence[np.ndarray] = ()) -> tuple[Candidate,
                                                                      dict[str, Any]]:
    """Best rule for one class (module docstring). `clip_scores`: this class's score sequence
    of every validation clip; `stream_scores`: its sequence on the everyday stream;
    `cross_fit_streams`: its sequences on further everyday streams scored by heads whose
    weights were fitted without them (their events and near misses count with the stream's;
    the info reports each apart). A rule that raises the class in more
    than `false_clip_budget` of the other clips is not kept. The info's `recall_price` is the
    front of validation recall against everyday events over every kept rule."""
    streams = [stream_scores, *cross_fit_streams]
    n_pos = max(int(positive.sum()), 1)
    n_neg = int((~positive).sum())
    rows = []
    for t in THRESHOLDS:
        for (n, m), dur, frac in itertools.product(CONFIRM, MIN_DURATION_MS, RELEASE_FRACTION):
            if (n, m) == (1, 1) and dur == 0.0 and frac != 0.8:
                continue
            cand = Candidate(threshold=t, release=round(float(frac * t), 3), confirm_n=n,
                             confirm_m=m, min_duration_ms=dur)
            hit = _any_event(clip_scores, cand, timing)
            tp, fp = int(np.sum(hit & positive)), int(np.sum(hit & ~positive))
            precision = tp / max(tp + fp, 1)
            if precision < target_precision or fp > false_clip_budget * n_neg:
                continue
            rows.append((cand, tp / n_pos, precision, _stream_events(streams, cand, timing)))
        if rows and all(r[1] < 1e-9 for r in rows[-10:]):
            break
    if not rows:
        raise ValueError("no rule reaches the target precision")
    plain = [r for r in rows if (r[0].confirm_n, r[0].confirm_m) == (1, 1)
             and r[0].min_duration_ms == 0.0]
    recall_floor = max((r[1] for r in plain), default=max(r[1] for r in rows))
    ok = [r for r in rows if r[1] >= recall_floor - 1e-9]
    near = {r[0]: _stream_events(streams, _relaxed(r[0]), timing) for r in ok}
    pos_seqs = [s for s, p in zip(clip_scores, positive, strict=True) if p]
    lost = {r[0]: int(np.sum(_any_event(pos_seqs, r[0], timing)
                             & ~_any_event(pos_seqs, _tightened(r[0]), timing))) for r in ok}
    best = min(ok, key=lambda r: (sum(r[3]), -r[2], sum(near[r[0]]) + lost[r[0]],
                                  r[0].confirm_m,
                                  r[0].min_duration_ms, -r[0].threshold))
    cand, recall, precision, fa = best
    base = max(plain, key=lambda r: (r[1], r[2])) if plain else best
    return cand, {"recall_price": recall_price(rows),
                  "threshold": cand.threshold, "precision": round(precision, 4),
                  "recall": round(recall, 4), "stream_false_alarms": fa[0],
                  "cross_fit_false_alarms": sum(fa[1:]),
                  "stream_near_misses": near[cand][0],
                  "cross_fit_near_misses": sum(near[cand][1:]),
                  "plain_1_of_1": {"threshold": base[0].threshold,
                                   "precision": round(base[2], 4),
                                   "recall": round(base[1], 4),
                                   "stream_false_alarms": base[3][0]}}


def recall_price(
        rows: Sequence[tuple[Candidate, float, float, list[int]]]) -> list[dict[str, Any]]:
    """The price of recall in false alarms, from the kept rules `rows` (candidate, validation
    recall, validation precision, events on each everyday stream): recall falling, each point
    the fewest everyday events (all streams) of any kept rule with that recall, and only the
    points that raise fewer events than every point of higher recall (a Pareto front). Its
    first point has the best recall the search found; the chosen rule lies on or above it."""
    front: list[dict[str, Any]] = []
    for cand, recall, precision, fa in sorted(rows, key=lambda r: (-r[1], sum(r[3]), -r[2])):
        if front and sum(fa) >= front[-1]["stream_false_alarms"] + front[-1][
                "cross_fit_false_alarms"]:
            continue
        front.append({"recall": round(recall, 4), "precision": round(precision, 4),
                      "threshold": cand.threshold,
                      "confirm": f"{cand.confirm_n} of {cand.confirm_m}",
                      "min_duration_ms": cand.min_duration_ms,
                      "stream_false_alarms": fa[0], "cross_fit_false_alarms": sum(fa[1:])})
    return front


def onset_lead_ms(clip_scores: list[np.ndarray], true_onsets: list[int],
                  thresholds: list[float], timing: StreamTiming) -> float:
    """Median over validation event clips of (end of the first window at or above the class
    threshold) - (true onset): how far back from that window's end the sound began."""
    leads = []
    for scores, onset, t in zip(clip_scores, true_onsets, thresholds, strict=True):
        hits = np.flatnonzero(scores >= t)
        if hits.size:
            leads.append(int(timing.ends(int(hits[0]) + 1)[-1]) - onset)
    if not leads:
        raise ValueError("no validation event clip reaches its threshold")
    lead = float(np.clip(np.median(leads), 0.0, timing.window))
    return round(timing.ms(lead), 1)


def stream_onset_lead_ms(first_hit_ends: list[np.ndarray], true_onsets: list[np.ndarray],
                         timing: StreamTiming, *, max_delay_s: float = 3.0) -> float:
    """Median over events mixed into a background stream of (end of the first hit window of
    the first event raised after the true onset, within `max_delay_s`) - (true onset).

    Per class: `first_hit_ends` are the onsets `replay` gives with `onset_lead=0` on the
    stream, `true_onsets` the inserted events' onsets (samples). Measured in background, not
    on clean clips: there the first hit comes later, and the lead must cover that."""
    leads: list[int] = []
    limit = round(max_delay_s * timing.sample_rate)
    for ends, onsets in zip(first_hit_ends, true_onsets, strict=True):
        ends = np.sort(np.asarray(ends, np.int64))
        for t in np.asarray(onsets, np.int64).tolist():
            k = int(np.searchsorted(ends, t, side="right"))
            if k < ends.size and ends[k] - t <= limit:
                leads.append(int(ends[k]) - t)
    if not leads:
        raise ValueError("no event mixed into the validation stream was detected")
    lead = float(np.clip(np.median(leads), 0.0, timing.window))
    return round(timing.ms(lead), 1)
