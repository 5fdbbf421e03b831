"""Commands `learn` (a machine's normal-sound baseline) and `evaluate-anomaly` (AUC/pAUC on CWRU).

`learn` reads files directly or records the microphone, runs the live front end
(:func:`monitor.dsp.frontend.logmel_of`) and saves a baseline through :mod:`monitor.detect.anomaly`.
`evaluate-anomaly` compares candidate scorers on the CWRU bearing recordings (the one real
fault data set we have): normal split by time (first part learns, the rest tests) against each
fault type, real and mixed into held-back normal at low levels; see docs/anomaly.md.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from monitor.capture.audiofile import read_audio
from monitor.detect import anomaly, baselines
from monitor.dsp.frontend import FrontendParams, logmel_of
from monitor.dsp.resample import StreamingResampler, downmix_into
from monitor.errors import ConfigError, SourceError

logger = logging.getLogger(__name__)

_BLOCK = 65536
CWRU_GAIN = 0.05
"""CWRU is in g (peaks up to 11 g): 1 g -> 0.05 full scale, the same gain for every file."""


# --- reading audio -------------------------------------------------------------------------

def _resample_all(x: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """Whole-signal resampling through the live chain's streaming resampler."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rs = StreamingResampler(in_rate, out_rate, max_block=_BLOCK)
    if rs.identity:
        return x
    out = np.empty(rs.max_output(x.shape[0]), dtype=np.float32)
    n = rs.process(x, out)
    return out[:n]


def read_file(path: Path, *, rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Mono float32 at `rate` (downmixed, resampled, non-finite samples zeroed)."""
    data, file_rate = read_audio(path, max_seconds=max_seconds)
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    mono = np.nan_to_num(mono, nan=0.0, posinf=0.0, neginf=0.0)
    return _resample_all(mono, int(file_rate), rate)


def record_mic(device: str | None, *, seconds: float, rate: int) -> np.ndarray:
    """Record `seconds` of audio from the microphone, mono at `rate`."""
    from monitor.capture.mic import MicSource  # PortAudio only when the mic is used

    source = MicSource(device, ring_seconds=4.0, block_ms=20.0)
    block = np.zeros(source.ring.capacity, dtype=np.float32)
    mono = np.zeros(block.shape[0], dtype=np.float32)
    parts: list[np.ndarray] = []
    need = int(seconds * source.sample_rate)
    got = 0
    logger.info("recording %.0f s from %s", seconds, source.description)
    source.start()
    try:
        while got < need:
            source.poll(time.monotonic())
            n = source.ring.readinto(block, multiple_of=source.channels)
            if n == 0:
                time.sleep(0.05)
                continue
            m = downmix_into(block[:n], source.channels, mono)
            parts.append(mono[:m].copy())
            got += m
    finally:
        source.stop()
    audio = np.concatenate(parts)[:need]
    return _resample_all(audio, source.sample_rate, rate)


def read_sources(sources: list[str], *, minutes: float | None, rate: int) -> np.ndarray:
    """Concatenate the audio of `file:PATH` / `mic[:DEVICE]` sources, up to `minutes`."""
    if not sources:
        raise ConfigError("learn: no source given; use file:PATH (repeatable) or mic[:DEVICE]")
    limit = None if minutes is None else minutes * 60.0
    parts: list[np.ndarray] = []
    total = 0.0
    for spec in sources:
        left = None if limit is None else limit - total
        if left is not None and left <= 0:
            break
        kind, _, arg = spec.partition(":")
        if kind == "file" and arg:
            audio = read_file(Path(arg).expanduser(), rate=rate, max_seconds=left)
        elif kind == "mic":
            if left is None:
                raise ConfigError("learn: recording from the microphone needs --minutes")
            audio = record_mic(arg or None, seconds=left, rate=rate)
        else:
            raise ConfigError(f"learn: source {spec!r} is not one of 'file:PATH', 'mic', "
                              "'mic:NAME-OR-INDEX'")
        parts.append(audio)
        total += audio.shape[0] / rate
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


# --- learn ---------------------------------------------------------------------------------

def learn_command(*, machine: str, sources: list[str], minutes: float | None, state_dir: Path,
                  frontend: FrontendParams, keep: int = 5) -> int:
    """Learn and activate a new baseline for `machine`; print where it went; return 0."""
    if minutes is not None and not minutes > 0:
        raise ConfigError(f"learn: --minutes {minutes}: must be > 0")
    if keep < 1:
        raise ConfigError(f"learn: --keep {keep}: must be >= 1")
    started = time.perf_counter()
    audio = read_sources(sources, minutes=minutes, rate=frontend.sample_rate)
    baseline = anomaly.fit_baseline(audio, logmel_of(audio, frontend), machine=machine,
                                    params=frontend, sources=list(sources))
    folder = baselines.save_baseline(baseline, state_dir, keep=keep)
    card = baseline.card
    print(f"machine {machine}: learned {card['seconds']:.1f} s of running audio in "
          f"{time.perf_counter() - started:.1f} s; running level "
          f"{card['level']['typical_dbfs']:.1f} dBFS (off below {card['level']['gate_dbfs']:.1f});"
          f" baseline {folder}")
    return 0


# --- evaluation ----------------------------------------------------------------------------

def roc_auc_pauc(negatives: np.ndarray, positives: np.ndarray, *, max_fpr: float = 0.1
                 ) -> tuple[float, float]:
    """ROC AUC and pAUC = (1/p) * area under the ROC for FPR in [0, p] (DCASE Task 2)."""
    neg = np.sort(np.asarray(negatives, dtype=np.float64))
    pos = np.sort(np.asarray(positives, dtype=np.float64))
    thresholds = np.unique(np.concatenate([neg, pos]))[::-1]
    fpr = np.concatenate([[0.0], (neg.shape[0] - np.searchsorted(neg, thresholds, "left"))
                          / neg.shape[0]])
    tpr = np.concatenate([[0.0], (pos.shape[0] - np.searchsorted(pos, thresholds, "left"))
                          / pos.shape[0]])
    auc = float(np.trapezoid(tpr, fpr))
    keep = fpr <= max_fpr
    f = np.concatenate([fpr[keep], [max_fpr]])
    t = np.concatenate([tpr[keep], [np.interp(max_fpr, fpr, tpr)]])
    return auc, float(np.trapezoid(t, f) / max_fpr)


def segment_scores(frame_scores: np.ndarray, *, frames: int = 100, hop: int = 25) -> np.ndarray:
    """Mean frame score of each 1 s segment (every 0.25 s at 10 ms hops)."""
    if frame_scores.shape[0] < frames:
        return np.array([frame_scores.mean()])
    c = np.concatenate([[0.0], np.cumsum(frame_scores)])
    starts = np.arange(0, frame_scores.shape[0] - frames + 1, hop)
    return (c[starts + frames] - c[starts]) / frames


def _stack(logmel: np.ndarray, n: int) -> np.ndarray:
    w = np.lib.stride_tricks.sliding_window_view(logmel, n, axis=0)  # (T-n+1, mels, n)
    return np.ascontiguousarray(w.transpose(0, 2, 1).reshape(w.shape[0], -1), dtype=np.float64)


def _stats(logmel: np.ndarray, n: int) -> np.ndarray:
    mean = anomaly.boxcar_features(logmel, n)
    sq = anomaly.boxcar_features(np.asarray(logmel, np.float64) ** 2, n)
    return np.hstack([mean, np.sqrt(np.maximum(sq - mean**2, 1e-6))])


Features = Callable[[np.ndarray], np.ndarray]
Scorer = Callable[[np.ndarray], np.ndarray]

FEATURES: dict[str, Features] = {
    "frame": lambda x: np.asarray(x, np.float64),
    "boxcar": lambda x: anomaly.boxcar_features(x, 25),
    "stack5": lambda x: _stack(x, 5),
    "stats1s": lambda x: _stats(x, 100),
    # Loudness only (mean log-mel of the boxcar): shows what a level meter alone would find.
    "level": lambda x: anomaly.boxcar_features(x, 25).mean(axis=1, keepdims=True),
}


def _fit_gauss(x: np.ndarray) -> Scorer:
    mean, whiten = anomaly.fit_gaussian(x)
    return lambda y: anomaly.gaussian_scores(y, mean, whiten)


def _fit_knn(x: np.ndarray, k: int = 5) -> Scorer:
    mu, sd = x.mean(0), x.std(0) + 1e-3
    ref = (x - mu) / sd
    ref_sq = (ref * ref).sum(1)

    def score(y: np.ndarray) -> np.ndarray:
        q = (y - mu) / sd
        d2 = np.maximum((q * q).sum(1)[:, None] + ref_sq[None, :] - 2.0 * q @ ref.T, 0.0)
        return np.sqrt(np.partition(d2, k, axis=1)[:, :k]).mean(1)
    return score


def _fit_gmm(x: np.ndarray) -> Scorer:
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(4, covariance_type="full", reg_covar=1e-3, random_state=0).fit(x)
    return lambda y: -gmm.score_samples(y)


def _fit_dcase_ae(x: np.ndarray) -> Scorer:
    """DCASE 2020 Task 2 baseline shape: Dense 128x4 -> 8 -> 128x4, ReLU, Adam, MSE."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    mu, sd = x.mean(0), x.std(0) + 1e-3
    z = (x - mu) / sd
    net = MLPRegressor(hidden_layer_sizes=(128, 128, 128, 128, 8, 128, 128, 128, 128),
                       batch_size=512, max_iter=100, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        net.fit(z, z)

    def score(y: np.ndarray) -> np.ndarray:
        q = (y - mu) / sd
        return np.asarray(((net.predict(q) - q) ** 2).mean(1))
    return score


CANDIDATES: dict[str, tuple[str, Callable[[np.ndarray], Scorer]]] = {
    "gauss-boxcar": ("boxcar", _fit_gauss),  # the deployed scorer
    "gauss-frame": ("frame", _fit_gauss),
    "gauss-stack5": ("stack5", _fit_gauss),
    "gauss-stats1s": ("stats1s", _fit_gauss),
    "gauss-level": ("level", _fit_gauss),
    "knn-boxcar": ("boxcar", _fit_knn),
    "knn-frame": ("frame", _fit_knn),
    "gmm-boxcar": ("boxcar", _fit_gmm),
    "gmm-frame": ("frame", _fit_gmm),
    "dcase-ae-stack5": ("stack5", _fit_dcase_ae),
}
NEEDS_SKLEARN = {"gmm-boxcar", "gmm-frame", "dcase-ae-stack5"}


def load_cwru(data_dir: Path, *, rate: int) -> tuple[np.ndarray, list[tuple[str, str, np.ndarray]]]:
    """(normal, [(file stem, fault type, audio)]) from `<data_dir>/cwru`, at `rate`, scaled."""
    labels = data_dir / "cwru" / "labels.csv"
    if not labels.is_file():
        raise SourceError(f"CWRU labels not found at {labels}; pass --data with the shared data "
                          "folder")
    normal = None
    faults = []
    with labels.open(newline="") as fh:
        for row in csv.DictReader(fh):
            x, file_rate = read_audio(data_dir / row["path"], dtype="float64")
            x = x.mean(axis=1)
            audio = _resample_all((x * CWRU_GAIN).astype(np.float32), int(file_rate), rate)
            if row["label"] == "normal":
                normal = audio
            else:
                faults.append((Path(row["path"]).stem, row["label"].split("@")[0], audio))
    if normal is None:
        raise SourceError(f"{labels} lists no normal recording")
    return normal, faults


def match_rms(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`x` scaled to the RMS of `reference`."""
    gain = math.sqrt(float((reference.astype(np.float64) ** 2).mean())
                     / max(float((x.astype(np.float64) ** 2).mean()), 1e-20))
    return (x * gain).astype(np.float32)


def mix_at(normal: np.ndarray, fault: np.ndarray, db: float) -> np.ndarray:
    """Normal audio plus the fault recording (mean removed) at `db` relative to normal RMS."""
    n = min(normal.shape[0], fault.shape[0])
    f = fault[:n].astype(np.float64) - fault[:n].mean()
    gain = math.sqrt(float((normal[:n].astype(np.float64) ** 2).mean())
                     / max(float((f * f).mean()), 1e-20)) * 10.0 ** (db / 20.0)
    return (normal[:n] + gain * f).astype(np.float32)


def evaluate_anomaly_command(*, data_dir: Path, frontend: FrontendParams, out_json: Path,
                             candidates: list[str] | None = None, learn_fraction: float = 0.6,
                             mixed_db: tuple[float, ...] = (-30.0, -35.0, -40.0)) -> int:
    """Print ROC AUC / pAUC per candidate and fault type (real and mixed); write a JSON."""
    names = list(CANDIDATES) if candidates is None else candidates
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise ConfigError(f"evaluate-anomaly: unknown candidate {unknown[0]!r}; choose from "
                          f"{', '.join(CANDIDATES)}")
    rate = frontend.sample_rate
    normal, faults = load_cwru(data_dir, rate=rate)
    cut = int(normal.shape[0] * learn_fraction)
    learn_audio, test_audio = normal[:cut], normal[cut:]
    sets: list[tuple[str, str, np.ndarray]] = [("real", t, logmel_of(a, frontend))
                                                for _, t, a in faults]
    # The same real recordings scaled to the normal RMS: loudness alone no longer tells.
    sets += [("real-rms", t, logmel_of(match_rms(a, test_audio), frontend)) for _, t, a in faults]
    for db in mixed_db:
        sets += [(f"mixed {db:+g} dB", t, logmel_of(mix_at(test_audio, a, db), frontend))
                 for _, t, a in faults]
    learn_mel, test_mel = logmel_of(learn_audio, frontend), logmel_of(test_audio, frontend)
    order = {"real": 0, "real-rms": 1}
    groups = sorted({(kind, t) for kind, t, _ in sets}, key=lambda g: (order.get(g[0], 2), g))
    results: dict[str, Any] = {"data": str(data_dir / "cwru"), "learn_seconds": cut / rate,
                               "test_normal_seconds": test_audio.shape[0] / rate,
                               "frontend_hash": frontend.hash(), "segment": "1 s mean, 0.25 s hop",
                               "max_fpr": 0.1, "candidates": {}}
    header = f"{'candidate':<16} {'fit s':>6}  " + "  ".join(
        f"{kind[:10] + ' ' + t[:5]:>17}" for kind, t in groups)
    print("ROC AUC / pAUC(FPR<=0.1) per fault type; normal held back by time")
    print(header)
    for name in names:
        feature_name, fit = CANDIDATES[name]
        if name in NEEDS_SKLEARN:
            try:
                import sklearn  # noqa: F401
            except ImportError:
                print(f"{name:<16} skipped (needs scikit-learn)")
                continue
        feats = FEATURES[feature_name]
        t0 = time.perf_counter()
        scorer = fit(feats(learn_mel))
        fit_s = time.perf_counter() - t0
        neg = segment_scores(scorer(feats(test_mel)))
        per: dict[str, dict[str, float]] = {}
        cells = []
        for kind, t in groups:
            pos = np.concatenate([segment_scores(scorer(feats(m))) for k, ft, m in sets
                                  if (k, ft) == (kind, t)])
            auc, pauc = roc_auc_pauc(neg, pos)
            per[f"{kind}/{t}"] = {"auc": round(auc, 4), "pauc": round(pauc, 4)}
            cells.append(f"{auc:8.3f}/{pauc:.3f}")
        results["candidates"][name] = {"feature": feature_name, "fit_seconds": round(fit_s, 3),
                                       "per_type": per}
        print(f"{name:<16} {fit_s:6.2f}  " + "  ".join(f"{c:>17}" for c in cells))
    results["deployed"] = _deployed_operating_point(learn_audio, test_audio, sets, frontend)
    dep = results["deployed"]
    print(f"deployed scorer at its learned threshold: held-back normal above threshold "
          f"{dep['normal_alarm_fraction']:.3f} of the time; " + ", ".join(
              f"{k} {v:.2f}" for k, v in dep["fault_alarm_fraction"].items()))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out_json}")
    return 0


def _deployed_operating_point(learn_audio: np.ndarray, test_audio: np.ndarray,
                              sets: list[tuple[str, str, np.ndarray]],
                              frontend: FrontendParams) -> dict[str, Any]:
    """Fraction of smoothed frame scores above the learned threshold (default settings)."""
    baseline = anomaly.fit_baseline(learn_audio, logmel_of(learn_audio, frontend),
                                    machine="cwru", params=frontend, sources=["cwru"])
    alpha = anomaly.ema_alpha(frontend, anomaly.DEFAULT_SMOOTHING_MS)
    threshold = baseline.card["threshold"]["raw"]
    context = baseline.card["feature"]["context_frames"]

    def above(mel: np.ndarray) -> np.ndarray:
        raw = anomaly.gaussian_scores(anomaly.boxcar_features(mel, context), baseline.mean,
                                      baseline.whiten)
        return np.asarray(anomaly.ema(raw, alpha) > threshold)

    normal_rate = float(above(logmel_of(test_audio, frontend)).mean())
    fault_rate: dict[str, float] = {}
    for kind, t, mel in sets:
        key = f"{kind}/{t}"
        fault_rate.setdefault(key, 0.0)
        fault_rate[key] += float(above(mel).mean()) / sum(
            1 for k, ft, _ in sets if f"{k}/{ft}" == key)
    return {"threshold_raw": threshold, "normal_alarm_fraction": normal_rate,
            "fault_alarm_fraction": {k: round(v, 4) for k, v in fault_rate.items()},
            "card_metrics": baseline.card["metrics"]}
