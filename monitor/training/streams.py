"""Held-out audio as the live chain hears it: long streams for false alarms per hour, events
placed in a background for onset errors, and events mixed into speech, alarms and everyday
sound for the recall a background costs, and events played in another room or through another
microphone for the recall those cost. Every figure comes from `analyze_file` (the live
chain with the card's rules), never from window scores.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from monitor.apps.analyze import FileEvent, analyze_file
from monitor.detect.detector import Detector
from monitor.errors import MonitorError
from monitor.training.dataset import (
    EVENT_CLASSES,
    SAMPLE_RATE,
    Clip,
    active_rms,
    augment,
    clip_waveform,
    limit_peak,
    mixed_stream,
    phone_band,
    reverberate,
    rms,
)

logger = logging.getLogger(__name__)

ONSET_GAP_S = 6.0
"""Spacing of mixed-in events in the onset stream."""
ONSET_PER_CLASS = 40
AUGMENTED_STREAMS = 4
"""Augmented replays of the held-out everyday stream for the false-alarm figure."""
ONSET_MATCH_S = (-1.0, 2.0)
"""A detection counts for an inserted event if it starts this close to its true onset."""
BACKGROUND_SNR_DB = (10.0, 0.0)
"""Event-to-background levels for the recall with a background: the event's active RMS (its
loudest 20 % of 20 ms frames) over the background's RMS."""
BACKGROUND_MARGIN_S = 1.0
"""Background before and after each mixed-in event."""


def run_chain(detector: Detector, config: Any, audio: np.ndarray, tmp: Path) -> list[FileEvent]:
    """Events the live chain raises in `audio` (float32, 16 kHz), through a file in `tmp`."""
    path = tmp / "clip.wav"
    sf.write(str(path), audio, SAMPLE_RATE, subtype="FLOAT")
    events, error = analyze_file(path, config=config, detector=detector)
    if error is not None:
        raise MonitorError(error)
    return events


STREAM_SOURCES = {"speech": ("ravdess", "fsdd"),
                  "everyday": ("safe", "glass-edge-impulse", "esc50"),
                  "synthetic": ("synthetic",)}
"""Held-out `other` clips joined back to back, one continuous stream per kind of audio."""


def heldout_streams(test: list[Clip]) -> dict[str, np.ndarray]:
    streams = {}
    for name, sources in STREAM_SOURCES.items():
        pieces = [clip_waveform(c) for c in test if c.cls == "other" and c.source_key in sources]
        if pieces:
            streams[name] = np.concatenate(pieces)
    speech = espeak_speech()
    if speech is not None:
        streams["espeak"] = speech
    return streams


def stream_false_alarms(detector: Detector, config: Any, audio: np.ndarray, tmp: Path, *,
                         label: str) -> dict[str, Any]:
    counts = {name: 0 for name in EVENT_CLASSES}
    for e in run_chain(detector, config, audio, tmp):
        counts[e.label] += 1
    return _rates(counts, len(audio) / SAMPLE_RATE / 3600.0, label)


def total_false_alarms(fa: dict[str, Any]) -> dict[str, Any]:
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


def augmented_false_alarms(detector: Detector, config: Any, background: np.ndarray,
               tmp: Path) -> dict[str, Any]:
    """The everyday stream under each augmentation chain (other rooms and microphones, not
    other sounds)."""
    hours = len(background) / SAMPLE_RATE / 3600.0
    aug_counts = {name: 0 for name in EVENT_CLASSES}
    for variant in range(1, AUGMENTED_STREAMS + 1):
        rng = np.random.default_rng(variant)
        y = augment(background, rng=rng, beds=[], phone_p=0.4)
        for e in run_chain(detector, config, y, tmp):
            aug_counts[e.label] += 1
    aug_hours = hours * AUGMENTED_STREAMS
    return {"stream": (f"the everyday stream under {AUGMENTED_STREAMS} augmentation chains "
                       "(reverberation, phone band, coloured noise 0-25 dB SNR, gain); same "
                       "sounds, other acoustics"),
            "stream_hours": round(aug_hours, 4), "events": aug_counts,
            "per_hour": {name: round(k / aug_hours, 2) for name, k in aug_counts.items()}}


LOUDER_DB = 10.0
"""Gain of the louder everyday stream: the same sounds nearer the microphone. The sources'
recording levels differ by class, so negatives only as loud as recorded favour a head that
learnt loudness as a cue (model card, "Recording level")."""


def louder_stream(clips: list[Clip]) -> np.ndarray:
    """`clips` joined back to back, each LOUDER_DB louder and then peak-limited (float32)."""
    gain = np.float32(10.0 ** (LOUDER_DB / 20.0))
    return np.concatenate([limit_peak(clip_waveform(c) * gain) for c in clips])


def louder_false_alarms(detector: Detector, config: Any, clips: list[Clip],
                        tmp: Path) -> dict[str, Any]:
    """False alarms on the everyday stream played nearer the microphone (`louder_stream`)."""
    return stream_false_alarms(detector, config, louder_stream(clips), tmp,
                               label=f"the everyday stream, each clip {LOUDER_DB:g} dB louder "
                                     "(peak-limited)")


def _poisson_upper(k: int, *, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of a Poisson mean after seeing k events."""
    from scipy.stats import chi2

    return float(chi2.ppf(confidence, 2 * k + 2) / 2.0)


def onset_stream(test: list[Clip], background: np.ndarray) -> tuple[np.ndarray,
                                                                     list[tuple[str, float]]]:
    """Held-out events added into the looped background every ONSET_GAP_S, at their level."""
    chosen: list[Clip] = []
    for name in EVENT_CLASSES:
        chosen += [c for c in test if c.cls == name][:ONSET_PER_CLASS]
    return mixed_stream(chosen, background, gap_s=ONSET_GAP_S, seed=0)


def onset_errors(onsets: list[tuple[str, float]],
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


def recall_in_background(detector: Detector, config: Any, positives: list[Clip],
                         backgrounds: dict[str, np.ndarray], tmp: Path, *,
                         snrs_db: tuple[float, ...] = BACKGROUND_SNR_DB) -> dict[str, Any]:
    """Share of held-out event clips whose class the live chain still raises when the clip is
    mixed into a held-out background (speech, synthetic alarms and tones, everyday sound) at
    each of `snrs_db`, with BACKGROUND_MARGIN_S of that background either side. The
    background piece of each mixture is drawn at random (seed 0) from the background's
    stream; the result is {background: {snr: {class: recall}}}."""
    rng = np.random.default_rng(0)
    margin = int(BACKGROUND_MARGIN_S * SAMPLE_RATE)
    found: dict[str, dict[str, dict[str, list[bool]]]] = {}
    looped: dict[tuple[str, int], np.ndarray] = {}
    for clip in positives:
        x = clip_waveform(clip)
        level = active_rms(x)
        for name, source in backgrounds.items():
            n = len(x) + 2 * margin
            reps = -(-n // len(source)) + 1
            if (name, reps) not in looped:  # an hour-long stream, tiled once per length
                looped[name, reps] = np.tile(source, reps)
            bed = looped[name, reps]
            for snr in snrs_db:
                start = int(rng.integers(0, len(bed) - n + 1))
                piece = bed[start:start + n].astype(np.float64)
                y = piece * (level / rms(piece) * 10.0 ** (-snr / 20.0))
                y[margin:margin + len(x)] += x
                events = run_chain(detector, config, limit_peak(y).astype(np.float32), tmp)
                hit = any(e.label == clip.cls for e in events)
                found.setdefault(name, {}).setdefault(f"{snr:g} dB", {}).setdefault(
                    clip.cls, []).append(hit)
    return {name: {snr: {cls: round(float(np.mean(hits)), 4) for cls, hits in by_cls.items()}
                   for snr, by_cls in by_snr.items()} for name, by_snr in found.items()}


QUIETER_DB = {"10 dB quieter": -10.0, "20 dB quieter": -20.0}
"""Gain of the quieter chains: the same event farther from the microphone, or through a
microphone set to a lower gain. The sources' recording levels differ by class, so a head
can learn loudness as a cue (model card, "Recording level")."""
ROOM_CHAINS = ("reverberation", "phone band", "full chain", *QUIETER_DB)
"""What `recall_in_rooms` plays each held-out event through."""


def _room_chain(x: np.ndarray, chain: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if chain == "phone band":
        return phone_band(x.astype(np.float32))
    if chain == "full chain":
        return augment(x, rng=rng, beds=[], phone_p=0.4)  # limits its own peak
    if chain in QUIETER_DB:
        return (x * np.float32(10.0 ** (QUIETER_DB[chain] / 20.0))).astype(np.float32)
    return limit_peak(reverberate(x.astype(np.float32), rng))


def recall_in_rooms(detector: Detector, config: Any, positives: list[Clip],
                    tmp: Path) -> dict[str, dict[str, float]]:
    """Share of held-out event clips whose class the live chain still raises when the clip is
    heard in another room or through another microphone: reverberated (RT60 0.2-0.9 s),
    band-limited to a phone line (300-3400 Hz), and through the full augmentation chain
    (reverberation p 0.35, phone band p 0.4, coloured noise at 0-25 dB SNR, gain -20..+6 dB;
    no real beds), and 10 and 20 dB quieter (`QUIETER_DB`). Each clip's chain is drawn from a
    seed of its own name, so a figure compares models on the same sounds. Returns
    {chain: {class: recall}}."""
    found: dict[str, dict[str, list[bool]]] = {}
    for clip in positives:
        x = clip_waveform(clip)
        seed = int(hashlib.sha256(clip.key.encode()).hexdigest()[:8], 16)
        for chain in ROOM_CHAINS:
            events = run_chain(detector, config, _room_chain(x, chain, seed), tmp)
            found.setdefault(chain, {}).setdefault(clip.cls, []).append(
                any(e.label == clip.cls for e in events))
    return {chain: {cls: round(float(np.mean(hits)), 4) for cls, hits in by_cls.items()}
            for chain, by_cls in found.items()}
