"""Held-out evaluation of `events.onnx` through the live chain (`analyze_file`).

Everything is measured on the test split that neither training nor threshold choice saw:
- clip level: a clip is positive for a class when the live chain raises that event in it,
  each file judged as it is (no padding: the chain judges the stream's edges);
- per source: the share of each source's held-out clips raising each class;
- false alarms per hour: held-out `other` clips of each kind joined into long streams, with
  Poisson 95 % upper bounds, and the everyday stream under the augmentation chains
  (`streams`);
- recall with a background: held-out events mixed into held-out speech, synthetic alarms
  and everyday sound at 10 and 0 dB (`streams.recall_in_background`);
- recall in other rooms and microphones: held-out events reverberated, phone-band limited,
  through the full augmentation chain, and 10 and 20 dB quieter (`streams.recall_in_rooms`);
- onset error: held-out events placed in the everyday stream at known times;
- inference time of one window on one thread, through `Detector.score`.
The report (tables, plots, HTML) is `report`.

`split="val"` measures the same on the validation split instead: the figures a model
choice may look at (the robustness ones above all, which training does not measure) without
spending the test split. They are not written to the card.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitor.apps.analyze import FileEvent, analyze_file
from monitor.config import load_config
from monitor.detect.detector import Detector
from monitor.detect.yamnet import MODEL_FILE
from monitor.errors import MonitorError
from monitor.training.compose import CARD_FILE, EVENTS_FILE, HEAD_FILE, head_arrays
from monitor.training.dataset import CLASSES, EVENT_CLASSES, Clip, clip_waveform, read_clips
from monitor.training.features import class_index, extract
from monitor.training.head import clip_max, head_probs
from monitor.training.report import format_table, write_report
from monitor.training.streams import (
    ROOM_CHAINS,
    STREAM_SOURCES,
    augmented_false_alarms,
    heldout_streams,
    louder_false_alarms,
    onset_errors,
    onset_stream,
    recall_in_background,
    recall_in_rooms,
    run_chain,
    stream_false_alarms,
    total_false_alarms,
)
from monitor.training.train import EVAL_HOP_FRAMES

logger = logging.getLogger(__name__)

BACKGROUNDS = ("speech", "synthetic", "everyday")
"""Held-out streams the recall with a background mixes events into."""


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


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / max(tp + fp, 1)
    r = tp / max(tp + fn, 1)
    return {"precision": round(p, 4), "recall": round(r, 4),
            "f1": round(2 * p * r / max(p + r, 1e-12), 4), "tp": tp, "fp": fp, "fn": fn}


SPLITS = {
    "test": ("test: SAFE folds 7-8; RAVDESS actors 09-12; FSDD jackson, theo; ESC-50 source "
             "ids and cough/glass files with sha256 % 10 in {0, 1}; synthetic tones from their "
             "own seeds"),
    "val": ("validation: SAFE fold 6; RAVDESS actors 07-08; FSDD nicolas; ESC-50 source ids "
            "and cough/glass files with sha256 % 10 == 2; synthetic tones from their own "
            "seeds (thresholds and rules were chosen on this split)"),
}
"""The splits `evaluate` can measure, and how the card describes each."""


def evaluate(data_dir: Path, models_dir: Path, *, cache_dir: Path | None = None,
             split: str = "test") -> Evaluation:
    """Run every held-out measurement (module docstring) on `split` (a key of SPLITS)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {sorted(SPLITS)}")
    model_path = models_dir / EVENTS_FILE
    config = load_config(None, overrides={"model.path": str(model_path.resolve())})
    detector = Detector(model_path, threads=1)
    params = detector.card.frontend
    clips = read_clips(data_dir)
    held = [c for c in clips if c.split == split]
    held_cls = class_index(held)
    cache = cache_dir if cache_dir is not None else models_dir.parent / ".cache" / "events"

    windows = extract(held, yamnet_path=models_dir / MODEL_FILE, cache_dir=cache, params=params,
                      hop_frames=EVAL_HOP_FRAMES)
    scores = clip_max(head_probs(head_arrays(models_dir / HEAD_FILE), windows.emb,
                                 windows.audioset), windows.clip, len(held))

    logger.info("judging %d %s clips through the live chain", len(held), split)
    t0 = time.perf_counter()
    confusion = np.zeros((len(CLASSES), len(CLASSES) + 1), np.int64)
    found: list[set[str]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for clip, c in zip(held, held_cls, strict=True):
            # Each recorded clip as the user has it (no padding: the chain judges the edges).
            if clip.synth is None:
                events, error = analyze_file(clip.path, config=config, detector=detector)
                if error is not None:
                    raise MonitorError(error)
            else:
                events = run_chain(detector, config, clip_waveform(clip), tmp)
            labels = {e.label for e in events}
            found.append(labels)
            first = min(events, key=lambda e: e.start_s).label if events else None
            confusion[c, CLASSES.index(first) if first else len(CLASSES)] += 1
        clip_metrics = {}
        for k, name in enumerate(EVENT_CLASSES):
            hit = np.array([name in f for f in found])
            positive = held_cls == k
            clip_metrics[name] = _prf(int(np.sum(hit & positive)), int(np.sum(hit & ~positive)),
                                      int(np.sum(~hit & positive)))
            clip_metrics[name]["clips"] = int(positive.sum())
        per_source = _per_source(held, found)
        t_clips = time.perf_counter() - t0

        streams = heldout_streams(held)
        logger.info("false alarms on %s streams: %s", split, ", ".join(streams))
        fa = {name: stream_false_alarms(detector, config, audio, tmp, label=name)
              for name, audio in streams.items()}
        everyday = streams["everyday"]
        fa["everyday"]["augmented"] = augmented_false_alarms(detector, config, everyday, tmp)
        fa["everyday"]["louder"] = louder_false_alarms(
            detector, config, [c for c in held if c.cls == "other"
                               and c.source_key in STREAM_SOURCES["everyday"]], tmp)
        fa["total"] = total_false_alarms(fa)

        positives = [c for c in held if c.cls != "other"]
        logger.info("recall with a background: %d events x %d backgrounds x 2 levels",
                    len(positives), len(BACKGROUNDS))
        background = recall_in_background(
            detector, config, positives, {name: streams[name] for name in BACKGROUNDS}, tmp)
        logger.info("recall in other rooms and microphones: %d events x %d chains",
                    len(positives), len(ROOM_CHAINS))
        rooms = recall_in_rooms(detector, config, positives, tmp)

        stream, onsets = onset_stream(held, everyday)
        stream_events = run_chain(detector, config, stream, tmp)
    onset = onset_errors(onsets, stream_events)

    latency = _latency(detector)
    metrics = {
        "split": SPLITS[split],
        "chain": ("monitor.apps.analyze.analyze_file on each file as it is (no padding), stride "
                  "100 ms, card thresholds and rules, config defaults elsewhere"),
        "clip_level": clip_metrics,
        "per_source": per_source,
        "false_alarms_per_hour": fa,
        "recall_in_background": background,
        "recall_in_rooms": rooms,
        "onset": onset,
        "inference_ms_1_thread": latency,
        "analyze_seconds": round(t_clips, 1),
    }
    return Evaluation(metrics, scores, held_cls, confusion, stream, stream_events,
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


def evaluate_command(data_dir: Path, models_dir: Path, report_dir: Path, *,
                     split: str = "test") -> int:
    """CLI entry for `audio-monitor evaluate`: prints the table, writes the report and the
    figures (test: the card's `metrics`; val: `metrics.json` in the report folder only); 0 on
    success, 2 with a one-line error."""
    try:
        ev = evaluate(data_dir, models_dir, split=split)
        if split == "test":
            card_path = models_dir / CARD_FILE
            card = json.loads(card_path.read_text(encoding="utf-8"))
            card["metrics"] = ev.metrics
            card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        else:
            report_dir.mkdir(parents=True, exist_ok=True)
            (report_dir / "metrics.json").write_text(json.dumps(ev.metrics, indent=2) + "\n",
                                                     encoding="utf-8")
        written = write_report(ev, report_dir,
                               params=Detector(models_dir / EVENTS_FILE).card.frontend)
    except (MonitorError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(ev.metrics))
    print(f"report: {written[-1]}")
    return 0
