"""The labelled clips, their deterministic splits, and waveform augmentation.

Clips come from `labels.csv` of the data folder and, when present, of its `extra/` folder
(broad real negatives: speech, ESC-50), plus synthetic tonal negatives (`synth.py`).
Splits never cut a clip, a speaker or a recording: SAFE clips split by their published fold
(1-5 train, 6 validation, 7-8 test), RAVDESS by actor and FSDD by speaker (`SPEAKER_SPLITS`),
ESC-50 clips by their freesound source id and all others by file name, hashed, so a file keeps
its split on every machine and as the data set grows.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import signal

from monitor.capture.audiofile import read_audio
from monitor.errors import SourceError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
CLASSES = ("cough", "fall", "glass_break", "other")
"""Head outputs, in order; `other` is everyday background and never raises an event."""
EVENT_CLASSES = CLASSES[:3]
LABEL_TO_CLASS = {"cough": "cough", "coughing": "cough", "fall": "fall",
                  "glass_break": "glass_break", "glass_breaking": "glass_break"}
"""Labels that are events; every other label (non_fall, background, speech, the other ESC-50
classes) is `other`. Sneezing, snoring, breathing and throat clearing are `other` too: they are
not coughs, YAMNet keeps them apart from Cough, and counting them would inflate a cough
monitor's counts (their scores are reported in the model card)."""
EXTRA_DIR = "extra"
SPEAKER_SPLITS = {
    "ravdess": {"train": ("Actor_01", "Actor_02", "Actor_03", "Actor_04", "Actor_05",
                          "Actor_06"),
                "val": ("Actor_07", "Actor_08"),
                "test": ("Actor_09", "Actor_10", "Actor_11", "Actor_12")},
    "fsdd": {"train": ("george", "lucas", "yweweler"), "val": ("nicolas",),
             "test": ("jackson", "theo")},
}
"""Speech splits by speaker (too few speakers for a hash to balance; odd RAVDESS actors are
male, even female, so each split holds both)."""
SPLITS = ("train", "val", "test")
SAFE_FOLDS = {"train": (1, 2, 3, 4, 5), "val": (6,), "test": (7, 8)}


@dataclass(frozen=True)
class Clip:
    """One labelled file of the data set (a row of labels.csv)."""

    path: Path
    label: str
    """Label as in labels.csv (e.g. non_fall)."""
    cls: str
    """Head class (one of CLASSES)."""
    duration_s: float
    source: str
    license: str
    split: str
    channel: str
    synth: tuple[str, int] | None = None
    """(kind, seed) of a synthetic clip (`synth.tonal`); its `path` is then only a name."""

    @property
    def key(self) -> str:
        """Stable name of the clip on every machine (seeds its augmentation, keys caches)."""
        return self.path.as_posix() if self.synth is not None else self.path.name

    @property
    def source_key(self) -> str:
        """Short name of the clip's source, for per-source reports."""
        if self.synth is not None:
            return "synthetic"
        base = self.source.split(" (")[0]
        short = {"covid19-cough/dataset": "cough-" + (self.channel or "unknown"),
                 "SAFE fall-sound dataset": "safe"}
        for prefix, key in (("RAVDESS", "ravdess"), ("Free Spoken Digit", "fsdd"),
                            ("ESC-50", "esc50"), ("prathambansal", "glass-edge-impulse")):
            if base.startswith(prefix):
                return key
        return short.get(base, base)


def split_of(rel_path: str, fold: str) -> str:
    """`train`, `val` or `test` for one clip of `labels.csv` (see the module docstring)."""
    if fold:
        n = int(fold)
        return next(name for name, folds in SAFE_FOLDS.items() if n in folds)
    return _hashed_split(Path(rel_path).name)


def extra_split_of(rel_path: str) -> str:
    """`train`, `val` or `test` for one clip of `extra/labels.csv`: by speaker or source id."""
    parts = Path(rel_path).parts
    speakers = SPEAKER_SPLITS.get(parts[0])
    if speakers is not None:
        speaker = parts[1] if parts[0] == "ravdess" else parts[-1].split("_")[1]
        for split, names in speakers.items():
            if speaker in names:
                return split
        raise SourceError(f"{rel_path}: speaker {speaker!r} has no split in SPEAKER_SPLITS")
    return _hashed_split(recording_key(parts[-1], esc50=parts[0] == "esc50"))


def recording_key(file_name: str, *, esc50: bool) -> str:
    """What keeps clips of one recording together: an ESC-50 file name is
    {fold}-{freesound id}-{take}-{class}.wav, and every take of a freesound id is one
    recording; any other file is its own."""
    return "esc50-" + file_name.split("-")[1] if esc50 else file_name


def hashed_bucket(key: str, buckets: int) -> int:
    """A stable bucket (0..buckets-1) of a key: the same on every machine."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % buckets


def _hashed_split(key: str) -> str:
    bucket = hashed_bucket(key, 10)
    return "test" if bucket < 2 else "val" if bucket == 2 else "train"


def _rows(labels: Path) -> list[dict[str, str]]:
    try:
        with labels.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except OSError as err:
        raise SourceError(f"cannot read {labels}: {err}; pass the data folder that holds "
                          "labels.csv") from err


def read_clips(data_dir: Path, *, extra: bool = True, synthetic: bool = True) -> list[Clip]:
    """Every clip: `labels.csv` rows, then `extra/labels.csv` rows (if that file exists and
    `extra`), then the synthetic tonal negatives (if `synthetic`), each in file order."""
    labels = data_dir / "labels.csv"
    clips = []
    for row in _rows(labels):
        clips.append(Clip(path=data_dir / row["path"], label=row["label"],
                          cls=LABEL_TO_CLASS.get(row["label"], "other"),
                          duration_s=float(row["duration_s"]), source=row["source"],
                          license=row["license"], split=split_of(row["path"], row["fold"]),
                          channel=row.get("channel", "")))
    extra_labels = data_dir / EXTRA_DIR / "labels.csv"
    if extra and extra_labels.is_file():
        for row in _rows(extra_labels):
            clips.append(Clip(path=data_dir / EXTRA_DIR / row["path"], label=row["label"],
                              cls=LABEL_TO_CLASS.get(row["label"], "other"),
                              duration_s=float(row["duration_s"]), source=row["source"],
                              license=row["license"], split=extra_split_of(row["path"]),
                              channel=row.get("channel", "")))
    if not any(c.cls in EVENT_CLASSES for c in clips):
        raise SourceError(f"{labels} lists no clip with a label in {sorted(LABEL_TO_CLASS)}")
    if synthetic:
        clips.extend(synthetic_clips())
    return clips


SYNTH_S = 6.0
SYNTH_PER_KIND = {"train": 24, "val": 6, "test": 8}
"""Length and count per kind and split of the synthetic tonal negatives."""


def synthetic_clips() -> list[Clip]:
    """The synthetic tonal negatives: SYNTH_PER_KIND clips of SYNTH_S seconds per kind and
    split, each from its own seed (splits never share a seed)."""
    from monitor.training.synth import GENERATORS

    clips = []
    for split, base in (("train", 0), ("val", 100_000), ("test", 200_000)):
        for kind in sorted(GENERATORS):
            for k in range(SYNTH_PER_KIND[split]):
                seed = base + k
                clips.append(Clip(path=Path(f"synthetic/{kind}/{seed}"), label=f"synth_{kind}",
                                  cls="other", duration_s=SYNTH_S, source="synthetic tonal "
                                  "negatives (monitor/training/synth.py)", license="Apache-2.0",
                                  split=split, channel="", synth=(kind, seed)))
    return clips


def clip_waveform(clip: Clip, *, max_s: float | None = None) -> np.ndarray:
    """Mono float32 at SAMPLE_RATE of any clip, recorded or synthetic."""
    if clip.synth is not None:
        from monitor.training.synth import tonal

        kind, seed = clip.synth
        x = tonal(kind, seconds=SYNTH_S, seed=seed)
        return x if max_s is None else x[: int(max_s * SAMPLE_RATE)]
    return load_audio(clip.path, max_s=max_s)


def load_audio(path: Path, *, max_s: float | None = None) -> np.ndarray:
    """Mono float32 at SAMPLE_RATE (the data set is 16 kHz already; anything else is an error),
    through the one audio-file reader the daemon and `analyze` use."""
    x, sr = read_audio(path, max_seconds=max_s)
    if sr != SAMPLE_RATE:
        raise SourceError(f"{path}: sample rate {sr} Hz, expected {SAMPLE_RATE} Hz")
    return np.ascontiguousarray(x.mean(axis=1))


def pad(x: np.ndarray, *, seconds: float) -> np.ndarray:
    """Digital silence before and after: short clips still fill a window, edges are scored."""
    n = int(seconds * SAMPLE_RATE)
    return np.concatenate([np.zeros(n, np.float32), x, np.zeros(n, np.float32)])


def true_onset_s(x: np.ndarray) -> float:
    """First 10 ms frame whose energy is within 20 dB of the loudest frame's: where the event
    begins in a clip that has no onset annotation."""
    frame = SAMPLE_RATE // 100
    n = len(x) // frame
    if n == 0:
        return 0.0
    energy = np.mean(np.square(x[: n * frame].reshape(n, frame), dtype=np.float64), axis=1)
    return float(np.flatnonzero(energy >= energy.max() * 0.01)[0] * frame / SAMPLE_RATE)


def mixed_stream(events: list[Clip], background: np.ndarray, *, gap_s: float,
                 seed: int = 0) -> tuple[np.ndarray, list[tuple[str, float]]]:
    """Event clips added into a looped background, one per `gap_s` (shuffled, +-1 s jitter),
    at their recorded level: how events look in live audio. Returns the stream and each
    event's (class, true onset s)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(events))
    gap = int(gap_s * SAMPLE_RATE)
    total = gap * (len(events) + 1)
    stream = np.tile(background, -(-total // len(background)))[:total].astype(np.float32)
    onsets = []
    for slot, i in enumerate(order):
        clip = events[i]
        x = clip_waveform(clip, max_s=gap_s - 1.0)
        start = gap * (slot + 1) - gap // 2 + int(rng.integers(-SAMPLE_RATE, SAMPLE_RATE))
        stream[start:start + len(x)] += x
        onsets.append((clip.cls, (start / SAMPLE_RATE) + true_onset_s(x)))
    np.clip(stream, -1.0, 1.0, out=stream)
    return stream, onsets


def rms(x: np.ndarray) -> float:
    """Root mean square of a signal (float64 sums)."""
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)) + 1e-12))


def active_rms(x: np.ndarray) -> float:
    """RMS of the loudest 20 % of 20 ms frames: the event's level, not its silences."""
    frames = x[: len(x) // 320 * 320].reshape(-1, 320)
    if frames.shape[0] == 0:
        return rms(x)
    energy = np.sort(np.mean(np.square(frames, dtype=np.float64), axis=1))
    top = energy[-max(1, energy.shape[0] // 5):]
    return float(np.sqrt(top.mean() + 1e-12))


def reverberate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Convolve with exponentially decaying noise (RT60 0.2-0.9 s), keep some direct path."""
    rt60 = rng.uniform(0.2, 0.9)
    n = int(rt60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    ir[0] = 1.0 / rng.uniform(0.3, 1.0)
    ir /= np.sqrt(np.sum(ir**2))
    return signal.fftconvolve(x, ir)[: len(x)].astype(np.float32)


_PHONE_SOS = signal.butter(6, [300.0, 3400.0], btype="bandpass", fs=SAMPLE_RATE, output="sos")


def phone_band(x: np.ndarray) -> np.ndarray:
    """A 300-3400 Hz telephone band (6th-order Butterworth)."""
    return signal.sosfilt(_PHONE_SOS, x).astype(np.float32)


def augment(x: np.ndarray, *, rng: np.random.Generator, beds: list[np.ndarray],
            phone_p: float) -> np.ndarray:
    """One random chain: reverberation, phone band, a real background bed or coloured noise at
    0-25 dB SNR, then gain. `beds` are other clips' background audio (training split only)."""
    y = x.astype(np.float32, copy=True)
    if rng.random() < 0.35:
        y = reverberate(y, rng)
    if rng.random() < phone_p:
        y = phone_band(y)
    level = active_rms(y)
    if beds and rng.random() < 0.7:
        bed = beds[int(rng.integers(len(beds)))]
        reps = -(-len(y) // len(bed))
        bed = np.tile(bed, reps)
        start = int(rng.integers(0, len(bed) - len(y) + 1))
        noise = bed[start:start + len(y)]
    else:
        white = rng.standard_normal(len(y)).astype(np.float32)
        tilt = rng.uniform(0.0, 0.98)  # 0 = white, near 1 = strongly low-passed (brown-ish)
        noise = signal.lfilter([1.0], [1.0, -tilt], white).astype(np.float32)
    snr_db = rng.uniform(0.0, 25.0)
    noise_level = rms(noise)
    if noise_level > 1e-6:
        y = y + noise * (level / noise_level * 10.0 ** (-snr_db / 20.0))
    y *= 10.0 ** (rng.uniform(-20.0, 6.0) / 20.0)
    return limit_peak(y).astype(np.float32)


def limit_peak(y: np.ndarray, ceiling: float = 0.99) -> np.ndarray:
    """`y` scaled in place so that its peak is at most `ceiling` (full scale is 1.0)."""
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    if peak > ceiling:
        y *= ceiling / peak
    return y
