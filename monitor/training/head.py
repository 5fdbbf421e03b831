"""The event head: multiple-instance window picking, the logistic regression, the open-set
gate's bounds, the softmax temperature and the thresholds, all in numpy as the composed
graph computes them.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np

from monitor.errors import MonitorError
from monitor.training.compose import veto_gate
from monitor.training.dataset import CLASSES, EVENT_CLASSES
from monitor.training.features import Windows

logger = logging.getLogger(__name__)

REG_C = 0.05
"""Inverse L2 strength of the logistic regression (chosen on the validation split)."""
OTHER_WEIGHT = 1.5
"""Extra weight of `other` windows over balanced: on validation, 1.5 kept fall recall (0.854,
with the tuned rule) and cut stream false alarms (cough 2 -> 1, fall 4 -> 1); 3 cost fall
recall (0.77)."""
VETO_QUANTILE = 0.99
VETO_FLOOR = 0.1
"""An AudioSet class YAMNet gives <= 0.1 never vetoes: it has not really heard it."""
TARGET_PRECISION = 0.9
FALSE_CLIP_BUDGET = 0.005
"""At most this share of the validation clips of other classes may raise a class (with >= 700
broad validation negatives, 0.5 % is ~4 clips: half the 1 % the model must hold on everyday
sounds from unseen sources, leaving room for the shift to them)."""
TEMPERATURES = (1.0, 2.0, 3.0, 4.0)
OTHER = CLASSES.index("other")


def pick_windows(w: Windows, clip_cls: np.ndarray, *, probs: np.ndarray | None) -> np.ndarray:
    """Indices of training windows: all of `other` clips, the event windows of the others.

    probs None: the loudest third of each positive clip's windows (at least one); else those
    a first-pass head gives >= 0.5 for the clip's class, and always its best one.
    """
    keep = np.zeros(w.clip.shape[0], bool)
    cls = clip_cls[w.clip]
    keep[cls == OTHER] = True
    order = np.lexsort((w.start, w.clip))
    bounds = np.flatnonzero(np.diff(w.clip[order], prepend=-1, append=-1))
    for a, b in itertools.pairwise(bounds):
        idx = order[a:b]
        c = cls[idx[0]]
        if c == OTHER:
            continue
        if probs is None:
            k = max(1, round(len(idx) / 3))
            keep[idx[np.argsort(-w.energy[idx], kind="stable")[:k]]] = True
        else:
            p = probs[idx, c]
            keep[idx[p >= 0.5]] = True
            keep[idx[int(np.argmax(p))]] = True
    return np.flatnonzero(keep)


def fit_head(x: np.ndarray, y: np.ndarray, *, seed: int) -> Any:
    """Standardise, then multinomial logistic regression with balanced class weights, `other`
    weighted OTHER_WEIGHT times more (everyday sounds are what the stream is made of).

    Linear on the embedding: on the validation folds a 128-unit MLP was no better and less
    stable under the second multiple-instance pass (it grows overconfident on hard negatives).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils.class_weight import compute_sample_weight

    weight = compute_sample_weight("balanced", y)
    weight[y == OTHER] *= OTHER_WEIGHT
    model = LogisticRegression(C=REG_C, max_iter=300, random_state=seed)
    pipe = make_pipeline(StandardScaler(), model)
    pipe.fit(x, y, logisticregression__sample_weight=weight)
    return pipe


def head_to_arrays(pipe: Any) -> dict[str, np.ndarray]:
    """Fold the scaler into the layer: w' = w / s, b' = b - (m / s) @ w; `w` (1024, C)."""
    scaler, model = pipe[0], pipe[-1]
    if list(model.classes_) != list(range(len(CLASSES))):
        raise MonitorError(f"head was trained on classes {list(model.classes_)}; every class "
                           f"of {CLASSES} needs training windows")
    w = model.coef_.T / scaler.scale_[:, None]
    b = model.intercept_ - (scaler.mean_ / scaler.scale_) @ model.coef_.T
    return {"w1": w.astype(np.float32), "b1": b.astype(np.float32)}


def head_probs(head: dict[str, np.ndarray], emb: np.ndarray,
               audioset: np.ndarray | None = None) -> np.ndarray:
    """(n, C) scores of the head in numpy, as the composed graph computes them: softmax over
    classes, times the open-set gate when the head has `veto` bounds (then `audioset`, the
    windows' (n, 521) AudioSet scores, is required)."""
    z = emb @ head["w1"] + head["b1"]
    if "w2" in head:
        z = np.maximum(z, 0.0) @ head["w2"] + head["b2"]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    probs = e / e.sum(axis=1, keepdims=True)
    if "veto" in head:
        if audioset is None:
            raise ValueError("a head with veto bounds needs the windows' AudioSet scores")
        probs = probs * veto_gate(audioset, head["veto"])
    return probs


def veto_bounds(audioset: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """(C, 521) open-set bounds: per event class, the VETO_QUANTILE of each AudioSet score over
    its training event windows (clean and augmented, so the rooms and beds they were mixed into
    widen the bounds), at least VETO_FLOOR; `other` is never vetoed (bounds of 1)."""
    bounds = np.ones((len(CLASSES), audioset.shape[1]), np.float32)
    for c in range(len(EVENT_CLASSES)):
        rows = audioset[cls == c]
        if rows.shape[0]:
            bounds[c] = np.maximum(np.quantile(rows, VETO_QUANTILE, axis=0), VETO_FLOOR)
    return np.round(bounds, 4)


def choose_temperature(head: dict[str, np.ndarray], val: Windows,
                       clip_cls: np.ndarray) -> float:
    """Softmax temperature from TEMPERATURES with the best mean validation recall at
    TARGET_PRECISION with at most FALSE_CLIP_BUDGET of the other clips raising the class
    (ties: the larger). The linear head is overconfident (probabilities saturate at 1.0,
    leaving no room for thresholds); a large temperature spreads them but lets the other
    classes' logits reorder a class's clips, so it is chosen, not fitted."""
    best, best_recall = TEMPERATURES[0], -1.0
    for t in TEMPERATURES:
        scaled = head | {"w1": head["w1"] / np.float32(t), "b1": head["b1"] / np.float32(t)}
        top = clip_max(head_probs(scaled, val.emb, val.audioset), val.clip, clip_cls.shape[0])
        recalls = []
        for k in range(len(EVENT_CLASSES)):
            positive = clip_cls == k
            thr, precision, recall = pr_curve(top[:, k], positive)
            false_clips = np.array([np.sum(~positive & (top[:, k] >= x)) for x in thr])
            ok = (precision >= TARGET_PRECISION) & (false_clips <= FALSE_CLIP_BUDGET
                                                    * int((~positive).sum()))
            recalls.append(float(recall[ok].max()) if ok.any() else 0.0)
        logger.info("temperature %g: validation recall %s at precision >= %g, <= %g false "
                    "clips", t, [round(r, 3) for r in recalls], TARGET_PRECISION,
                    FALSE_CLIP_BUDGET)
        if np.mean(recalls) >= best_recall - 1e-9:
            best, best_recall = t, float(np.mean(recalls))
    return best


def clip_max(probs: np.ndarray, clip: np.ndarray, n_clips: int) -> np.ndarray:
    """(n_clips, C) highest window probability of each class in each clip."""
    out = np.zeros((n_clips, probs.shape[1]), np.float64)
    np.maximum.at(out, clip, probs)
    return out


def pr_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, ...]:
    """(thresholds, precision, recall) for 'clip positive if score >= threshold'."""
    thr = np.unique(scores)[::-1]
    tp = np.array([np.sum(positive & (scores >= t)) for t in thr], np.float64)
    fp = np.array([np.sum(~positive & (scores >= t)) for t in thr], np.float64)
    precision = tp / np.maximum(tp + fp, 1.0)
    recall = tp / max(int(positive.sum()), 1)
    return thr, precision, recall


def choose_threshold(scores: np.ndarray, positive: np.ndarray, *,
                     target: float = TARGET_PRECISION) -> float:
    """The threshold of highest recall whose precision is >= target (ties: the higher one),
    clamped to [0.3, 0.999]; 0.999 when no threshold reaches the target."""
    thr, precision, recall = pr_curve(scores, positive)
    ok = np.flatnonzero(precision >= target)
    if ok.size == 0:
        return 0.999
    best = ok[recall[ok] == recall[ok].max()][0]
    return float(np.clip(np.floor(thr[best] * 1000.0) / 1000.0, 0.3, 0.999))
