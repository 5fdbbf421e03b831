"""Held-out evaluation of `events.onnx` through the live chain (`analyze_file`), and a report.

Everything is measured on the test split (SAFE folds 7-8, hashed cough/glass files) that
neither training nor threshold choice saw:
- clip level: a clip is positive for a class when the live chain raises that event in it
  (clips get 0.5 s of silence either side, as in training, so a short clip fills a window);
- false alarms per hour: held-out `other` clips (everyday indoor sounds, background)
  concatenated into one stream (with its length, event counts and a Poisson 95 % upper
  bound: a short stream cannot show a low rate), and that stream replayed under the training
  augmentation chains;
- onset error: held-out events mixed into that stream at known times (true onset: first
  10 ms frame within 20 dB of the clip's loudest);
- inference time of one window on one thread, through `Detector.score`.
"""

from __future__ import annotations

import html
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from monitor.analyze import FileEvent, analyze_file
from monitor.config import load_config
from monitor.detector import Detector
from monitor.errors import MonitorError
from monitor.training.compose import CARD_FILE, EVENTS_FILE, HEAD_FILE, head_arrays
from monitor.training.dataset import (
    CLASSES,
    EVENT_CLASSES,
    SAMPLE_RATE,
    Clip,
    augment,
    clip_waveform,
    mixed_stream,
    read_clips,
)
from monitor.training.features import class_index, extract
from monitor.training.train import EVAL_HOP_FRAMES, clip_max, head_probs, pr_curve
from monitor.yamnet import MODEL_FILE

logger = logging.getLogger(__name__)

ONSET_GAP_S = 6.0
"""Spacing of mixed-in events in the onset stream."""
ONSET_PER_CLASS = 40
AUGMENTED_STREAMS = 4
"""Augmented replays of the held-out everyday stream for the false-alarm figure."""
ONSET_MATCH_S = (-1.0, 2.0)
"""A detection counts for an inserted event if it starts this close to its true onset."""


@dataclass
class Evaluation:
    """Everything the report shows."""

    metrics: dict[str, Any]
    clip_scores: np.ndarray
    """(n_test, C) highest window probability per class (offline, 100 ms hop)."""
    test_cls: np.ndarray
    confusion: np.ndarray
    """(C, C+1) rows: true class; columns: first event's class, last column: no event."""
    stream: np.ndarray
    stream_events: list[FileEvent]
    true_onsets: list[tuple[str, float]]


def _run(detector: Detector, config: Any, audio: np.ndarray, tmp: Path) -> list[FileEvent]:
    path = tmp / "clip.wav"
    sf.write(str(path), audio, SAMPLE_RATE, subtype="FLOAT")
    events, error = analyze_file(path, config=config, detector=detector)
    if error is not None:
        raise MonitorError(error)
    return events


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / max(tp + fp, 1)
    r = tp / max(tp + fn, 1)
    return {"precision": round(p, 4), "recall": round(r, 4),
            "f1": round(2 * p * r / max(p + r, 1e-12), 4), "tp": tp, "fp": fp, "fn": fn}


def evaluate(data_dir: Path, models_dir: Path, *, cache_dir: Path | None = None) -> Evaluation:
    """Run every held-out measurement (module docstring)."""
    model_path = models_dir / EVENTS_FILE
    config = load_config(None, overrides={"model.path": str(model_path.resolve())})
    detector = Detector(model_path, threads=1)
    params = detector.card.frontend
    clips = read_clips(data_dir)
    test = [c for c in clips if c.split == "test"]
    test_cls = class_index(test)
    cache = cache_dir if cache_dir is not None else models_dir.parent / ".cache" / "events"

    windows = extract(test, yamnet_path=models_dir / MODEL_FILE, cache_dir=cache, params=params,
                      hop_frames=EVAL_HOP_FRAMES)
    scores = clip_max(head_probs(head_arrays(models_dir / HEAD_FILE), windows.emb,
                                 windows.audioset), windows.clip, len(test))

    t0 = time.perf_counter()
    confusion = np.zeros((len(CLASSES), len(CLASSES) + 1), np.int64)
    found: list[set[str]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for clip, c in zip(test, test_cls, strict=True):
            # Each recorded clip as the user has it (no padding: the chain judges the edges).
            if clip.synth is None:
                events, error = analyze_file(clip.path, config=config, detector=detector)
                if error is not None:
                    raise MonitorError(error)
            else:
                events = _run(detector, config, clip_waveform(clip), tmp)
            labels = {e.label for e in events}
            found.append(labels)
            first = min(events, key=lambda e: e.start_s).label if events else None
            confusion[c, CLASSES.index(first) if first else len(CLASSES)] += 1
        clip_metrics = {}
        for k, name in enumerate(EVENT_CLASSES):
            hit = np.array([name in f for f in found])
            positive = test_cls == k
            clip_metrics[name] = _prf(int(np.sum(hit & positive)), int(np.sum(hit & ~positive)),
                                      int(np.sum(~hit & positive)))
            clip_metrics[name]["clips"] = int(positive.sum())
        per_source = _per_source(test, found)
        t_clips = time.perf_counter() - t0

        streams = _streams(test)
        fa = {name: _stream_false_alarms(detector, config, audio, tmp, label=name)
              for name, audio in streams.items()}
        everyday = streams["everyday"]
        fa["everyday"]["augmented"] = _augmented(detector, config, everyday, tmp)
        fa["total"] = _total(fa)

        stream, onsets = _onset_stream(test, everyday)
        stream_events = _run(detector, config, stream, tmp)
    onset = _onset_errors(onsets, stream_events)

    latency = _latency(detector)
    metrics = {
        "split": ("test: SAFE folds 7-8; RAVDESS actors 09-12; FSDD jackson, theo; ESC-50 "
                  "source ids and cough/glass files with sha256 % 10 in {0, 1}; synthetic "
                  "tones from their own seeds"),
        "chain": ("monitor.analyze.analyze_file on each file as it is (no padding), stride "
                  "100 ms, card thresholds and rules, config defaults elsewhere"),
        "clip_level": clip_metrics,
        "per_source": per_source,
        "false_alarms_per_hour": fa,
        "onset": onset,
        "inference_ms_1_thread": latency,
        "analyze_seconds": round(t_clips, 1),
    }
    return Evaluation(metrics, scores, test_cls, confusion, stream, stream_events,
                      onsets)


def _per_source(test: list[Clip], found: list[set[str]]) -> dict[str, Any]:
    """Per source and true class: clips, and the share of them raising each event class."""
    out: dict[str, Any] = {}
    for clip, labels in zip(test, found, strict=True):
        row = out.setdefault(clip.source_key, {}).setdefault(
            clip.cls, {"clips": 0} | {name: 0 for name in EVENT_CLASSES})
        row["clips"] += 1
        for name in labels:
            row[name] += 1
    for rows in out.values():
        for row in rows.values():
            for name in EVENT_CLASSES:
                row[name] = round(row[name] / row["clips"], 4)
    return out


STREAM_SOURCES = {"speech": ("ravdess", "fsdd"),
                  "everyday": ("safe", "glass-edge-impulse", "esc50"),
                  "synthetic": ("synthetic",)}
"""Held-out `other` clips joined back to back, one continuous stream per kind of audio."""


def _streams(test: list[Clip]) -> dict[str, np.ndarray]:
    streams = {}
    for name, sources in STREAM_SOURCES.items():
        pieces = [clip_waveform(c) for c in test if c.cls == "other" and c.source_key in sources]
        if pieces:
            streams[name] = np.concatenate(pieces)
    speech = espeak_speech()
    if speech is not None:
        streams["espeak"] = speech
    return streams


def _stream_false_alarms(detector: Detector, config: Any, audio: np.ndarray, tmp: Path, *,
                         label: str) -> dict[str, Any]:
    counts = {name: 0 for name in EVENT_CLASSES}
    for e in _run(detector, config, audio, tmp):
        counts[e.label] += 1
    return _rates(counts, len(audio) / SAMPLE_RATE / 3600.0, label)


def _total(fa: dict[str, Any]) -> dict[str, Any]:
    counts = {name: sum(v["events"][name] for v in fa.values()) for name in EVENT_CLASSES}
    return _rates(counts, sum(v["stream_hours"] for v in fa.values()),
                  "all held-out streams together")


def _rates(counts: dict[str, int], hours: float, label: str) -> dict[str, Any]:
    """Events per hour of each class, the counts and their Poisson 95 % upper bounds."""
    return ({name: round(counts[name] / hours, 2) for name in EVENT_CLASSES} | {
        "stream": label, "stream_hours": round(hours, 4), "events": counts,
        "upper_95_per_hour": {name: round(_poisson_upper(k) / hours, 1)
                              for name, k in counts.items()}})


ESPEAK_VOICES = ("en", "en-us", "en-gb-scotland", "de", "fr", "es", "it", "nl")
ESPEAK_VARIANTS = ("m1", "m3", "m5", "f1", "f3", "f4")
ESPEAK_SENTENCES = (
    "Good morning, how did you sleep last night?",
    "The doctor will be here in about ten minutes.",
    "Please press the red button if you need any help.",
    "Remember to take your medicine after dinner.",
    "Can you hear me? The line is very bad today.",
    "That was the funniest thing I have heard all week!",
    "Seven, four, nine, two, zero, one, eight, three.",
    "We are out of milk, can you get some on the way home?",
)


def espeak_speech() -> np.ndarray | None:
    """Synthetic speech from `espeak-ng` (never trained on: a source the model has not seen),
    8 voices x 6 variants x 8 sentences at 16 kHz; None when espeak-ng is not installed."""
    import shutil
    import subprocess

    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if exe is None:
        logger.warning("espeak-ng is not installed (scripts/setup.sh dev installs it): no "
                       "synthetic speech stream, and the streams total less than the card's")
        return None
    pieces = []
    for i, voice in enumerate(ESPEAK_VOICES):
        for j, variant in enumerate(ESPEAK_VARIANTS):
            for k, sentence in enumerate(ESPEAK_SENTENCES):
                speed = 130 + (i * 7 + j * 13 + k * 17) % 70
                try:
                    raw = subprocess.run([exe, "-v", f"{voice}+{variant}", "-s", str(speed),
                                          "--stdout", sentence], capture_output=True,
                                         check=True, timeout=60).stdout
                except subprocess.SubprocessError as err:
                    logger.warning("espeak-ng voice %s+%s failed (%s): skipped", voice,
                                   variant, err)
                    continue
                with tempfile.NamedTemporaryFile(suffix=".wav") as fh:
                    fh.write(raw)
                    fh.flush()
                    x, rate = sf.read(fh.name, dtype="float32")
                pieces.append(resample_poly(x, SAMPLE_RATE, rate).astype(np.float32))
                pieces.append(np.zeros(SAMPLE_RATE // 4, np.float32))
    return np.concatenate(pieces) if pieces else None


def _augmented(detector: Detector, config: Any, background: np.ndarray,
               tmp: Path) -> dict[str, Any]:
    """The everyday stream under each augmentation chain (other rooms and microphones, not
    other sounds)."""
    hours = len(background) / SAMPLE_RATE / 3600.0
    aug_counts = {name: 0 for name in EVENT_CLASSES}
    for variant in range(1, AUGMENTED_STREAMS + 1):
        rng = np.random.default_rng(variant)
        y = augment(background, rng=rng, beds=[], phone_p=0.4)
        for e in _run(detector, config, y, tmp):
            aug_counts[e.label] += 1
    aug_hours = hours * AUGMENTED_STREAMS
    return {"stream": (f"the everyday stream under {AUGMENTED_STREAMS} augmentation chains "
                       "(reverberation, phone band, coloured noise 0-25 dB SNR, gain); same "
                       "sounds, other acoustics"),
            "stream_hours": round(aug_hours, 4), "events": aug_counts,
            "per_hour": {name: round(k / aug_hours, 2) for name, k in aug_counts.items()}}


def _poisson_upper(k: int, *, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of a Poisson mean after seeing k events."""
    from scipy.stats import chi2

    return float(chi2.ppf(confidence, 2 * k + 2) / 2.0)


def _onset_stream(test: list[Clip], background: np.ndarray) -> tuple[np.ndarray,
                                                                     list[tuple[str, float]]]:
    """Held-out events added into the looped background every ONSET_GAP_S, at their level."""
    chosen: list[Clip] = []
    for name in EVENT_CLASSES:
        chosen += [c for c in test if c.cls == name][:ONSET_PER_CLASS]
    return mixed_stream(chosen, background, gap_s=ONSET_GAP_S, seed=0)


def _onset_errors(onsets: list[tuple[str, float]],
                  events: list[FileEvent]) -> dict[str, Any]:
    errors: dict[str, list[float]] = {name: [] for name in EVENT_CLASSES}
    for name, t in onsets:
        near = [e.start_s - t for e in events if e.label == name
                and ONSET_MATCH_S[0] <= e.start_s - t <= ONSET_MATCH_S[1]]
        if near:
            errors[name].append(min(near, key=abs))
    out: dict[str, Any] = {"method": (f"held-out events added into the held-out background "
                                      f"every {ONSET_GAP_S:g} s; true onset = first 10 ms "
                                      "frame within 20 dB of the clip's peak")}
    for name in EVENT_CLASSES:
        e = np.abs(np.array(errors[name]))
        n = sum(1 for c, _ in onsets if c == name)
        out[name] = {"inserted": n, "detected": int(e.size),
                     "median_abs_s": round(float(np.median(e)), 3) if e.size else None,
                     "p90_abs_s": round(float(np.percentile(e, 90)), 3) if e.size else None,
                     "median_signed_s": round(float(np.median(errors[name])), 3)
                     if e.size else None}
    return out


def _latency(detector: Detector, n: int = 300) -> dict[str, float]:
    rng = np.random.default_rng(0)
    detector.reset()
    for frame in rng.normal(-4.0, 1.0, (detector.window_frames, 64)).astype(np.float32):
        detector.push(frame)
    times = np.zeros(n)
    for i in range(n + 10):
        t = time.perf_counter()
        detector.score()
        if i >= 10:
            times[i - 10] = (time.perf_counter() - t) * 1000.0
    return {"median": round(float(np.median(times)), 3),
            "p99": round(float(np.percentile(times, 99)), 3)}


def write_report(ev: Evaluation, report_dir: Path, *, params: Any) -> list[Path]:
    """metrics.json, PNG plots (when matplotlib is installed) and index.html."""
    report_dir.mkdir(parents=True, exist_ok=True)
    written = [report_dir / "metrics.json"]
    written[0].write_text(json.dumps(ev.metrics, indent=2) + "\n", encoding="utf-8")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: report without plots")
    else:
        from monitor.frontend import logmel_of

        fig, ax = plt.subplots(figsize=(5, 4))
        for k, name in enumerate(EVENT_CLASSES):
            _, p, r = pr_curve(ev.clip_scores[:, k], ev.test_cls == k)
            ax.plot(r, p, label=name)
        ax.set(xlabel="recall", ylabel="precision", title="held-out clips (window max)",
               ylim=(0, 1.02))
        ax.legend()
        fig.tight_layout()
        written.append(report_dir / "pr_curves.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.imshow(ev.confusion, cmap="Blues")
        ax.set_xticks(range(len(CLASSES) + 1), [*CLASSES, "none"])
        ax.set_yticks(range(len(CLASSES)), CLASSES)
        for (i, j), v in np.ndenumerate(ev.confusion):
            ax.text(j, i, str(v), ha="center", va="center")
        ax.set(xlabel="first event (live chain)", ylabel="true class", title="held-out clips")
        fig.tight_layout()
        written.append(report_dir / "confusion.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

        seg = (ONSET_GAP_S * 0.5, ONSET_GAP_S * 5.5)
        x = ev.stream[int(seg[0] * SAMPLE_RATE):int(seg[1] * SAMPLE_RATE)]
        mel = logmel_of(x, params)
        fig, ax = plt.subplots(figsize=(11, 3.5))
        ax.imshow(mel.T, origin="lower", aspect="auto", cmap="magma",
                  extent=(seg[0], seg[1], 0, mel.shape[1]))
        colors = dict(zip(EVENT_CLASSES, ("cyan", "lime", "yellow"), strict=True))
        for name, t in ev.true_onsets:
            if seg[0] <= t <= seg[1]:
                ax.axvline(t, color="white", ls="--", lw=1)
                ax.text(t, mel.shape[1] - 6, name, color="white", fontsize=8)
        for e in ev.stream_events:
            if seg[0] <= e.start_s <= seg[1]:
                ax.axvspan(e.start_s, min(e.end_s, seg[1]), color=colors[e.label], alpha=0.3)
                ax.text(e.start_s, 3, f"{e.label} {e.score:.2f}", color=colors[e.label],
                        fontsize=8)
        ax.set(xlabel="s", ylabel="mel band",
               title="onset stream: true onsets (dashed) and live detections (shaded)")
        fig.tight_layout()
        written.append(report_dir / "spectrogram.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    images = "".join(f'<p><img src="{p.name}"></p>' for p in written if p.suffix == ".png")
    page = (f"<html><head><meta charset='utf-8'><title>events model report</title></head>"
            f"<body><h1>events model: held-out evaluation</h1>"
            f"<pre>{html.escape(format_table(ev.metrics))}</pre>{images}"
            f"<pre>{html.escape(json.dumps(ev.metrics, indent=2))}</pre></body></html>")
    written.append(report_dir / "index.html")
    written[-1].write_text(page, encoding="utf-8")
    return written


def format_table(m: dict[str, Any]) -> str:
    """The headline numbers as fixed-width tables."""
    lines = ["class        clips  prec   recall  F1     onset med/p90 s  (detected)"]
    for name in EVENT_CLASSES:
        c, o = m["clip_level"][name], m["onset"][name]
        med, p90 = o["median_abs_s"], o["p90_abs_s"]
        lines.append(f"{name:<12} {c['clips']:>5}  {c['precision']:.3f}  {c['recall']:.3f}   "
                     f"{c['f1']:.3f}  {med if med is not None else '-'}/"
                     f"{p90 if p90 is not None else '-'}  ({o['detected']}/{o['inserted']})")
    lines.append("")
    lines.append("false alarms per hour (events, 95 % upper bound) on held-out streams")
    lines.append("stream       hours   " + "  ".join(f"{n:<18}" for n in EVENT_CLASSES))
    for stream, fa in m["false_alarms_per_hour"].items():
        cells = "  ".join(f"{fa[n]:>6.1f} ({fa['events'][n]}, {fa['upper_95_per_hour'][n]})"
                          .ljust(18) for n in EVENT_CLASSES)
        lines.append(f"{stream:<12} {fa['stream_hours']:>6.3f}  {cells}")
    lines.append("")
    lines.append("per source: share of held-out clips raising each class")
    for source, rows in m["per_source"].items():
        for cls, row in rows.items():
            shares = "  ".join(f"{n} {row[n]:.3f}" for n in EVENT_CLASSES)
            lines.append(f"{source:<20} {cls:<12} {row['clips']:>5}  {shares}")
    lat = m["inference_ms_1_thread"]
    lines.append(f"inference per window, 1 thread: median {lat['median']} ms, "
                 f"p99 {lat['p99']} ms")
    return "\n".join(lines)


def evaluate_command(data_dir: Path, models_dir: Path, report_dir: Path) -> int:
    """CLI entry for `audio-monitor evaluate`: prints the table, writes the report and the
    card's `metrics`; 0 on success, 2 with a one-line error."""
    try:
        ev = evaluate(data_dir, models_dir)
        card_path = models_dir / CARD_FILE
        card = json.loads(card_path.read_text(encoding="utf-8"))
        card["metrics"] = ev.metrics
        card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        written = write_report(ev, report_dir,
                               params=Detector(models_dir / EVENTS_FILE).card.frontend)
    except (MonitorError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(ev.metrics))
    print(f"report: {written[-1]}")
    return 0
