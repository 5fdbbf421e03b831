"""Train the event head on YAMNet embeddings, multiple-instance style, and write its card
(the head itself, its gate and its thresholds: `head`; rules: `rules`).

Clip labels are weak: a 3 s fall clip holds one impact, a cough clip has silences. So every
window of an `other` clip is a negative, while a positive clip contributes only the windows
that hold its event: first the loudest ones (pass 1), then those the pass-1 head scores
highest (pass 2). Windows of positive clips that are not picked are left out, never negatives.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from monitor.detect.detector import read_card
from monitor.detect.yamnet import MODEL_FILE, WINDOW_FRAMES
from monitor.errors import MonitorError
from monitor.training.compose import (
    CARD_FILE,
    EVENTS_FILE,
    HEAD_FILE,
    INPUT_NAME,
    OUTPUT_NAME,
    VETO_RAMP,
    compose_events_model,
)
from monitor.training.dataset import (
    CLASSES,
    EVENT_CLASSES,
    SAMPLE_RATE,
    SYNTH_PER_KIND,
    SYNTH_S,
    Clip,
    clip_waveform,
    hashed_bucket,
    load_audio,
    mixed_stream,
    read_clips,
    recording_key,
    true_onset_s,
)
from monitor.training.features import (
    MAX_TRAIN_S,
    PAD_S,
    Embedder,
    Windows,
    class_index,
    embed_signal,
    extract,
)
from monitor.training.head import (
    FALSE_CLIP_BUDGET,
    OTHER_WEIGHT,
    TARGET_PRECISION,
    VETO_FLOOR,
    VETO_QUANTILE,
    choose_temperature,
    choose_threshold,
    clip_max,
    fit_head,
    head_probs,
    head_to_arrays,
    pick_windows,
    veto_bounds,
)
from monitor.training.rules import (
    Candidate,
    StreamTiming,
    onset_lead_ms,
    replay,
    stream_onset_lead_ms,
    tune_class,
)

logger = logging.getLogger(__name__)

N_AUGMENTED = 4
"""Augmented copies of every training event clip, for the open-set gate's bounds."""
ROOM_COPIES = 1
"""Reverberated copies of every training clip the head learns from besides the clean one."""
TRAIN_HOP_FRAMES = 24
EVAL_HOP_FRAMES = 10
"""Validation windows start every 10 frames (100 ms), as the daemon's default stride."""
ONSET_GAP_S = 6.0
"""Spacing of validation events mixed into the validation background for the onset lead."""


BED_SOURCES = ("safe", "glass-edge-impulse", "esc50")
"""Training `other` clips that serve as background beds for augmentation: room and everyday
recordings. Speech is left out: at 0 dB SNR the loudest windows of a cough clip could be
speech, and the head would learn speech as cough; synthetic tones are not rooms."""
CROSS_FIT_FOLDS = 5
"""Folds of the training everyday clips (BED_SOURCES) for the cross-fitted streams: each fold
is scored by head weights fitted without it, so the rule search sees how the head treats
everyday recordings it did not learn from, 5x more of them than validation holds (the gate's
bounds and the window picks still saw them: the estimate errs high)."""


def _load_beds(clips: list[Clip]) -> list[np.ndarray]:
    train = [c for c in clips if c.split == "train"]
    return [load_audio(c.path) for c, everyday in zip(train, _everyday(train), strict=True)
            if everyday]


def _joined(parts: list[Windows], n_clips: int) -> Windows:
    """Copies of the same clips as one set of windows; copy k's clip ids are shifted by k x
    `n_clips`, so each copy counts as a clip of its own."""
    return Windows(np.concatenate([p.emb for p in parts]),
                   np.concatenate([p.audioset for p in parts]),
                   np.concatenate([p.energy for p in parts]),
                   np.concatenate([p.clip + k * n_clips for k, p in enumerate(parts)]),
                   np.concatenate([p.start for p in parts]))


CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx_vnni", "amx_int8")
"""x86 features that choose ONNX Runtime's int8 and the BLAS's kernels, hence a head's last
bits."""


def cpu_kind(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU a model is made on: the first processor's model name and the CPU_FLAGS it has,
    from `cpuinfo` (default: Linux /proc/cpuinfo). The same model from the same data is
    expected bit for bit only on the same kind. `cpu` is None where the kind cannot be told
    (no /proc/cpuinfo, no model name or flags, e.g. ARM): no two such machines are one kind."""
    fields = _first_processor(cpuinfo)
    if "model name" not in fields or "flags" not in fields:
        return {"cpu": None, "flags": []}
    flags = set(fields["flags"].split())
    return {"cpu": fields["model name"], "flags": [f for f in CPU_FLAGS if f in flags]}


def _first_processor(cpuinfo: str | None = None) -> dict[str, str]:
    """The first processor's fields of `cpuinfo` (default: Linux /proc/cpuinfo; none if it
    cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    first = cpuinfo.strip().split("\n\n", 1)[0]
    return {k.strip(): v.strip() for k, v in
            (line.split(":", 1) for line in first.splitlines() if ":" in line)}


SHIPPED_BLAS_KERNELS = "SkylakeX"
"""OpenBLAS kernels the shipped head was fitted with (`scripts/reproduce-model.sh` names them)."""
_SKYLAKEX_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})


def blas_kernels_note(cpu_flags: set[str], kernels: list[str]) -> str | None:
    """A warning when OpenBLAS runs other kernels (`kernels`: its architecture names, one per
    loaded library) than the shipped head's on a CPU that could run those (`cpu_flags`): the
    fit may round differently, and the head then is not the shipped one bit for bit."""
    other = sorted({k for k in kernels if k and k.lower() != SHIPPED_BLAS_KERNELS.lower()})
    if not other or not cpu_flags >= _SKYLAKEX_FLAGS:
        return None
    return (f"OpenBLAS runs its {', '.join(other)} kernels on this CPU; the shipped head was "
            f"fitted with its {SHIPPED_BLAS_KERNELS} kernels, so this head may differ in its "
            f"last bits: set OPENBLAS_CORETYPE={SHIPPED_BLAS_KERNELS} to reproduce it")


def _warn_blas_kernels() -> None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return
    kernels = [str(i.get("architecture") or "") for i in threadpool_info()
               if i.get("internal_api") == "openblas"]
    note = blas_kernels_note(set(_first_processor().get("flags", "").split()), kernels)
    if note:
        logger.warning("%s", note)


def cross_fit_fold(clip: Clip) -> int:
    """Fold (0..CROSS_FIT_FOLDS-1) of a training clip, by recording: SAFE by its own fold (the
    file name's first field), ESC-50 by freesound source id, other clips by file name."""
    name = clip.path.name
    if clip.source_key == "safe":
        return int(name.split("-")[0]) % CROSS_FIT_FOLDS
    return hashed_bucket(recording_key(name, esc50=clip.source_key == "esc50"),
                         CROSS_FIT_FOLDS)


def _everyday(clips: list[Clip]) -> np.ndarray:
    """(n_clips,) True for the everyday recordings among `clips`: `other` clips of
    BED_SOURCES."""
    return np.array([c.cls == "other" and c.source_key in BED_SOURCES for c in clips])


def _cross_fit_streams(own: Windows, own_cls: np.ndarray, sel: np.ndarray,
                       train_clips: list[Clip], head: dict[str, np.ndarray], *,
                       temperature: float, params: Any, embedder: Embedder,
                       seed: int) -> tuple[list[np.ndarray], float]:
    """(scores (n, C) of each fold's everyday stream under a head fitted on the final window
    picks `sel` less that fold's clips, with `head`'s temperature and gate; hours in all)."""
    n = len(train_clips)
    fold = np.where(_everyday(train_clips), [cross_fit_fold(c) for c in train_clips], -1)
    streams, samples = [], 0
    for f in range(CROSS_FIT_FOLDS):
        members = [c for c, k in zip(train_clips, fold, strict=True) if k == f]
        if not members:
            continue
        keep = sel[fold[own.clip[sel] % n] != f]
        fitted = head_to_arrays(fit_head(own.emb[keep], own_cls[own.clip[keep]], seed=seed))
        fold_head = {"w1": fitted["w1"] / np.float32(temperature),
                     "b1": fitted["b1"] / np.float32(temperature), "veto": head["veto"]}
        x = np.concatenate([clip_waveform(c) for c in members])
        samples += x.shape[0]
        streams.append(head_probs(fold_head, *embed_signal(x, params=params,
                                                           hop_frames=EVAL_HOP_FRAMES,
                                                           embedder=embedder)))
    return streams, samples / SAMPLE_RATE / 3600.0


def train(data_dir: Path, models_dir: Path, *, seed: int = 0,
          cache_dir: Path | None = None) -> dict[str, Any]:
    """Train the head, write `event-head.npz`, compose `events.onnx`, write `events.json`."""
    t0 = time.perf_counter()
    _warn_blas_kernels()
    yamnet_path = models_dir / MODEL_FILE
    params = read_card(yamnet_path).frontend
    cache = cache_dir if cache_dir is not None else models_dir.parent / ".cache" / "events"
    clips = read_clips(data_dir)
    train_clips = [c for c in clips if c.split == "train"]
    val_clips = [c for c in clips if c.split == "val"]
    beds = _load_beds(clips)
    embedder = Embedder(yamnet_path)
    clean = extract(train_clips, yamnet_path=yamnet_path, cache_dir=cache, params=params,
                    hop_frames=TRAIN_HOP_FRAMES, seed=seed, beds=beds, max_s=MAX_TRAIN_S,
                    embedder=embedder)
    rooms = [extract(train_clips, yamnet_path=yamnet_path, cache_dir=cache, params=params,
                     hop_frames=TRAIN_HOP_FRAMES, variant=v, seed=seed, max_s=MAX_TRAIN_S,
                     embedder=embedder, room=True) for v in range(1, ROOM_COPIES + 1)]
    own = _joined([clean, *rooms], len(train_clips))
    own_cls = np.tile(class_index(train_clips), ROOM_COPIES + 1)
    del clean, rooms
    # Augmented copies serve the gate's bounds, which come from event windows only.
    event_clips = [c for c in train_clips if c.cls != "other"]
    aug = _joined([extract(event_clips, yamnet_path=yamnet_path, cache_dir=cache, params=params,
                           hop_frames=TRAIN_HOP_FRAMES, variant=v, seed=seed, beds=beds,
                           max_s=MAX_TRAIN_S, embedder=embedder)
                   for v in range(1, N_AUGMENTED + 1)], len(event_clips))
    aug_cls = np.tile(class_index(event_clips), N_AUGMENTED)
    val = extract(val_clips, yamnet_path=yamnet_path, cache_dir=cache, params=params,
                  hop_frames=EVAL_HOP_FRAMES, embedder=embedder)
    t_feat = time.perf_counter() - t0
    logger.info("features: %d training windows (clean and in a room), %d of augmented event "
                "clips, %d validation windows, %.1f s", own.emb.shape[0], aug.emb.shape[0],
                val.emb.shape[0], t_feat)

    # The head learns from the clean clips and their reverberated copies: the full
    # augmentation chain (beds, phone band, gain) in its fit costs recall at the same
    # false-clip budget (model card, "Training"). The gate's bounds come from every copy, so
    # that an event heard in a room or over a bed is not vetoed for what YAMNet hears of it.
    sel = pick_windows(own, own_cls, probs=None)
    pipe = fit_head(own.emb[sel], own_cls[own.clip[sel]], seed=seed)
    sel = pick_windows(own, own_cls, probs=pipe.predict_proba(own.emb))
    pipe = fit_head(own.emb[sel], own_cls[own.clip[sel]], seed=seed)
    head = head_to_arrays(pipe)
    gate = [(w, cls, pick_windows(w, cls, probs=pipe.predict_proba(w.emb)))
            for w, cls in ((own, own_cls), (aug, aug_cls))]
    head["veto"] = veto_bounds(np.concatenate([w.audioset[i] for w, _, i in gate]),
                               np.concatenate([cls[w.clip[i]] for w, cls, i in gate]))
    val_cls = class_index(val_clips)
    temperature = choose_temperature(head, val, val_cls)
    head |= {"w1": head["w1"] / np.float32(temperature), "b1": head["b1"] / np.float32(temperature)}
    logger.info("softmax temperature %.3f (folded into the head)", temperature)
    logger.info("head trained on %d windows (%s per class)", sel.size,
                np.bincount(own_cls[own.clip[sel]], minlength=len(CLASSES)).tolist())

    val_probs = head_probs(head, val.emb, val.audioset)
    val_max = clip_max(val_probs, val.clip, len(val_clips))
    thresholds, val_metrics = {}, {}
    for c, name in enumerate(EVENT_CLASSES):
        positive = val_cls == c
        t = choose_threshold(val_max[:, c], positive)
        hit = val_max[:, c] >= t
        tp, fp = int(np.sum(hit & positive)), int(np.sum(hit & ~positive))
        thresholds[name] = t
        val_metrics[name] = {"threshold": t, "precision": round(tp / max(tp + fp, 1), 4),
                             "recall": round(tp / max(int(positive.sum()), 1), 4),
                             "clips": int(positive.sum())}
    t1 = time.perf_counter()
    cross_fit, cross_fit_hours = _cross_fit_streams(own, own_cls, sel, train_clips, head,
                                                    temperature=temperature, params=params,
                                                    embedder=embedder, seed=seed)
    logger.info("cross-fitted everyday streams: %.3f h in %d folds, %.1f s", cross_fit_hours,
                len(cross_fit), time.perf_counter() - t1)
    rules, lead_ms, stream_hours = _tune_rules(head, val, val_clips, val_cls, params=params,
                                               embedder=embedder, validation=val_metrics,
                                               cross_fit=cross_fit,
                                               cross_fit_hours=cross_fit_hours)
    thresholds = {name: val_metrics[name]["threshold"] for name in EVENT_CLASSES}
    peaks = validation_peaks(val_probs, val.clip, val_cls, rules)
    models_dir.mkdir(parents=True, exist_ok=True)
    np.savez(models_dir / HEAD_FILE, w1=head["w1"], b1=head["b1"], veto=head["veto"])
    target = compose_events_model(models_dir, check=False)
    sha = hashlib.sha256(target.read_bytes()).hexdigest()
    card = build_card(params_dict=params.to_dict() | {"hash": params.hash()}, sha256=sha,
                      thresholds=thresholds, clips=clips, seed=seed, windows=int(sel.size),
                      validation=val_metrics, temperature=temperature, rules=rules,
                      onset_lead_ms=lead_ms, val_stream_hours=stream_hours,
                      cross_fit_hours=cross_fit_hours, peaks=peaks)
    write_card(models_dir / CARD_FILE, card)
    elapsed = time.perf_counter() - t0
    logger.info("training took %.1f s (features %.1f s)", elapsed, t_feat)
    return {"thresholds": thresholds, "rules": rules, "onset_lead_ms": lead_ms,
            "temperature": temperature, "validation": val_metrics,
            "seconds": round(elapsed, 1), "sha256": sha}


def validation_peaks(probs: np.ndarray, clip: np.ndarray, clip_cls: np.ndarray,
                     rules: dict[str, dict[str, float]]) -> dict[str, list[float]]:
    """Per event class, for each validation clip of that class: the highest threshold at which
    the class's N-of-M confirmation still holds in the clip (the largest, over runs of M
    consecutive windows, of the N-th highest score). `calibrate` reads the recall a threshold
    costs from these."""
    out = {}
    bounds = np.flatnonzero(np.diff(clip, prepend=-1, append=-1))
    for c, name in enumerate(EVENT_CLASSES):
        n, m = int(rules[name]["confirm_n"]), int(rules[name]["confirm_m"])
        peaks = []
        for a, b in itertools.pairwise(bounds):
            if clip_cls[clip[a]] != c:
                continue
            seq = probs[a:b, c]
            if seq.shape[0] < m:
                seq = np.concatenate([seq, np.zeros(m - seq.shape[0], seq.dtype)])
            runs = np.lib.stride_tricks.sliding_window_view(seq, m)
            peaks.append(round(float(np.sort(runs, axis=1)[:, m - n].max()), 4))
        out[name] = sorted(peaks)
    return out


def _tune_rules(head: dict[str, np.ndarray], val: Windows, val_clips: list[Clip],
                val_cls: np.ndarray, *, params: Any, embedder: Embedder,
                validation: dict[str, Any], cross_fit: list[np.ndarray],
                cross_fit_hours: float) -> tuple[dict[str, dict[str, float]], float, float]:
    """Per-class rules and thresholds (`monitor.training.rules`) on validation clips, a
    validation everyday stream (every validation `other` clip joined) and the cross-fitted
    training everyday streams, then the onset lead at the chosen thresholds. Updates
    `validation` in place; returns (rules, onset lead ms, stream hours)."""
    probs = head_probs(head, val.emb, val.audioset)
    seqs = np.split(probs, np.flatnonzero(np.diff(val.clip)) + 1)
    if len(seqs) != len(val_clips):
        raise MonitorError(f"{len(val_clips)} validation clips gave {len(seqs)} window runs; "
                           "every clip must fill at least one window")
    everyday = [c for c in val_clips if c.cls == "other"]
    stream = np.concatenate([clip_waveform(c) for c in everyday])
    stream_probs = head_probs(head, *embed_signal(stream, params=params,
                                                  hop_frames=EVAL_HOP_FRAMES, embedder=embedder))
    hours = len(stream) / SAMPLE_RATE / 3600.0
    timing = StreamTiming.of(params, stride_frames=EVAL_HOP_FRAMES)
    rules = {}
    for c, name in enumerate(EVENT_CLASSES):
        cand, info = tune_class([s[:, c] for s in seqs], val_cls == c, stream_probs[:, c],
                                timing, target_precision=TARGET_PRECISION,
                                false_clip_budget=FALSE_CLIP_BUDGET,
                                cross_fit_streams=[s[:, c] for s in cross_fit])
        rules[name] = cand.card_rule()
        validation[name] = info | {"clips": int(np.sum(val_cls == c)),
                                   "stream_hours": round(hours, 4),
                                   "cross_fit_hours": round(cross_fit_hours, 4)}
        logger.info("%s: rule %s, validation %s", name, cand, info)
    event_idx = [i for i, c in enumerate(val_clips) if c.cls in EVENT_CLASSES]
    pad = PAD_S * SAMPLE_RATE
    onsets = [round(pad + true_onset_s(clip_waveform(val_clips[i])) * SAMPLE_RATE)
              for i in event_idx]
    cls_of = [EVENT_CLASSES.index(val_clips[i].cls) for i in event_idx]
    clean = onset_lead_ms([seqs[i][:, k] for i, k in zip(event_idx, cls_of, strict=True)],
                          onsets,
                          [validation[EVENT_CLASSES[k]]["threshold"] for k in cls_of], timing)
    mixed, true = mixed_stream([val_clips[i] for i in event_idx], stream,
                               gap_s=ONSET_GAP_S, seed=0)
    mixed_probs = head_probs(head, *embed_signal(mixed, params=params,
                                                 hop_frames=EVAL_HOP_FRAMES, embedder=embedder))
    first_hits, true_onsets = [], []
    for c, name in enumerate(EVENT_CLASSES):
        rule = Candidate(threshold=validation[name]["threshold"], release=rules[name]["release"],
                         confirm_n=int(rules[name]["confirm_n"]),
                         confirm_m=int(rules[name]["confirm_m"]),
                         min_duration_ms=rules[name]["min_duration_ms"])
        first_hits.append(np.array(replay(mixed_probs[:, c], rule.rule(SAMPLE_RATE), timing,
                                          onset_lead=0), np.int64))
        true_onsets.append(np.array([round(t * SAMPLE_RATE) for k, t in true if k == name],
                                    np.int64))
    lead = stream_onset_lead_ms(first_hits, true_onsets, timing)
    logger.info("onset lead %.1f ms (validation events in background; clean clips: %.1f ms)",
                lead, clean)
    return rules, lead, hours


def build_card(*, params_dict: dict[str, Any], sha256: str, thresholds: dict[str, float],
               clips: list[Clip], seed: int, windows: int,
               validation: dict[str, Any], temperature: float,
               rules: dict[str, dict[str, float]], onset_lead_ms: float,
               val_stream_hours: float, cross_fit_hours: float,
               peaks: dict[str, list[float]]) -> dict[str, Any]:
    """Model card, schema 1 (as `monitor.detect.detector.read_card` reads it) plus training
    facts."""
    sources: dict[tuple[str, str], dict[str, Any]] = {}
    for c in clips:
        if c.synth is not None:
            continue
        base = c.source.split(" (")[0]
        entry = sources.setdefault((base, c.license), {"source": base, "license": c.license,
                                                       "labels": [], "clips": 0})
        entry["clips"] += 1
        if c.label not in entry["labels"]:
            entry["labels"].append(c.label)
    return {
        "schema": 1,
        "name": "events",
        "version": f"yamnet-embedding-logreg-veto-seed{seed}",
        "description": (
            "YAMNet (models/yamnet.onnx) cut at its 1024-d embedding, then our head: Gemm "
            f"1024->{len(CLASSES)} (multinomial logistic regression), Softmax, times an "
            "open-set gate from YAMNet's own 521 AudioSet scores: an event class's score "
            "fades to 0 when YAMNet hears an AudioSet class louder than that event's training "
            "windows ever held it (e.g. Moo, Church bell, Toilet flush under a fall or cough "
            "score). `other` (everything else) never raises an event. Built by `audio-monitor "
            "fetch-models` from yamnet.onnx + event-head.npz."),
        "model_file": EVENTS_FILE,
        "sha256": sha256,
        "fetch": "audio-monitor fetch-models",
        "input": {"name": INPUT_NAME, "shape": [1, WINDOW_FRAMES, params_dict["n_mels"]],
                  "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": [1, len(CLASSES)], "dtype": "float32",
                   "kind": "gated probabilities"},
        "classes": list(CLASSES),
        "frontend": params_dict,
        "window_frames": WINDOW_FRAMES,
        "thresholds": thresholds,
        "rules": rules,
        "onset_lead_ms": onset_lead_ms,
        "license": ("Head weights (event-head.npz): Apache-2.0, trained by this project. The "
                    "YAMNet part keeps the terms stated in yamnet.json and is not "
                    "redistributed: it is downloaded and composed at install."),
        "training": {
            "head_file": HEAD_FILE,
            "seed": seed,
            "made_on": cpu_kind(),
            "splits": ("SAFE by fold: 1-5 train, 6 validation, 7-8 test; RAVDESS by actor "
                       "(01-06 train, 07-08 validation, 09-12 test); FSDD by speaker "
                       "(george, lucas, yweweler train; nicolas validation; jackson, theo "
                       "test); ESC-50 by sha256 of its freesound source id, other clips by "
                       "sha256(file name), % 10: 0-1 test, 2 validation, 3-9 train; "
                       "synthetic tonal negatives by seed"),
            "synthetic_negatives": ("monitor/training/synth.py: IEC 60601-1-8 alarm bursts, "
                                    "pulse-oximeter beeps, telephone cadences and bells, DTMF, "
                                    "chimes, smoke alarms, appliance beeps, sines, squares, "
                                    "clipped tones and sweeps; "
                                    f"{SYNTH_PER_KIND['train']} x {SYNTH_S:g} s per kind for "
                                    "training, labelled `other`"),
            "open_set_gate": {"quantile": VETO_QUANTILE, "floor": VETO_FLOOR, "ramp": VETO_RAMP,
                              "from": ("the event windows of each class in every copy, clean "
                                       "and augmented, that the head scores >= 0.5 (and each "
                                       "copy's best)")},
            "augmentation": (f"head: the clean clips and {ROOM_COPIES} reverberated copy of "
                             "each (RT60 0.2-0.9 s); open-set gate: those and "
                             f"{N_AUGMENTED} copies of every training event clip under "
                             "reverberation "
                             "(exponential-decay noise IR, RT60 0.2-0.9 s), 300-3400 Hz "
                             "phone band, real background beds (training `other` clips of "
                             f"{', '.join(BED_SOURCES)}) or coloured noise at 0-25 dB SNR, "
                             "gain -20..+6 dB"),
            "multiple_instance": ("all windows of `other` clips; of positive clips only the "
                                  "loudest third of windows (pass 1), then windows the pass-1 "
                                  "head scores >= 0.5 plus the best one (pass 2)"),
            "windows": windows,
            "class_weights": f"balanced by window count, `other` x{OTHER_WEIGHT:g}",
            "softmax_temperature": temperature,
            "sources": sorted(sources.values(), key=lambda e: e["source"]),
            "thresholds_from": ("validation clips, clip positive if the live event logic "
                                "(100 ms stride) raises the class in it; threshold and rule "
                                "chosen together: precision >= "
                                f"{TARGET_PRECISION}, recall >= the best plain 1-of-1 rule's, "
                                "then fewest false alarms on the validation everyday stream "
                                f"({val_stream_hours:.4f} h: every validation `other` clip "
                                "joined) and the cross-fitted training everyday streams "
                                f"({cross_fit_hours:.4f} h: the training clips of "
                                f"{', '.join(BED_SOURCES)} in {CROSS_FIT_FOLDS} folds by "
                                "recording, each scored by head weights fitted without its "
                                "fold), "
                                "then fewest near misses, then fastest"),
            "onset_lead_from": ("every validation event clip added into the validation "
                                f"everyday stream, one per {ONSET_GAP_S:g} s: median of (end "
                                "of the first hit window of the event the card rule raises) "
                                "- (first 10 ms frame within 20 dB of the clip's peak)"),
            "validation": validation,
            "validation_positive_peaks": peaks,
        },
    }


def write_card(path: Path, card: dict[str, Any]) -> None:
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def train_command(data_dir: Path, models_dir: Path, *, seed: int = 0) -> int:
    """CLI entry for `audio-monitor train`: 0 on success, 2 with a one-line error."""
    try:
        result = train(data_dir, models_dir, seed=seed)
    except MonitorError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0
