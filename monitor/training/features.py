"""Clip -> log-mel (the live front end) -> 96-frame windows -> cached YAMNet embeddings.

Features come from `monitor.dsp.frontend.logmel_of`, the streaming code the daemon runs, so the
head is trained on exactly what it will be fed. Embeddings are cached under `.cache/` keyed by
everything that changes them (files, augmentation variant and seed, front end, YAMNet).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from monitor.detect.detector import open_session
from monitor.detect.yamnet import MODEL_SHA256, WINDOW_FRAMES
from monitor.dsp.frontend import FrontendParams, logmel_of
from monitor.training.compose import AUDIOSET_DIM, EMBEDDING_DIM, embedding_model_bytes
from monitor.training.dataset import CLASSES, Clip, augment, clip_waveform, pad, reverberate

logger = logging.getLogger(__name__)

FEATURES_VERSION = 6
"""Bump when augmentation or windowing changes, to invalidate the cache."""
PAD_S = 0.5
"""Silence added before and after every clip (training and evaluation alike)."""
MAX_TRAIN_S = 15.0
"""Training reads at most this much of a clip (a few cough files run past a minute)."""
_BATCH = 256


@dataclass
class Windows:
    """Embeddings of every window of a set of clips; row i belongs to clip `clip[i]`."""

    emb: np.ndarray
    """(n, 1024) float32 YAMNet embeddings (float16-exact: fresh and cached runs agree)."""
    audioset: np.ndarray
    """(n, 521) float32 YAMNet's own AudioSet class scores (sigmoid), float16-exact."""
    energy: np.ndarray
    """(n,) mean of the window's 10 loudest frames (mean log-mel), for picking event windows."""
    clip: np.ndarray
    """(n,) index into the clip list."""
    start: np.ndarray
    """(n,) first frame of the window in the padded clip."""


def windows_of(logmel: np.ndarray, *, hop_frames: int) -> np.ndarray:
    """(n, 96, n_mels) windows starting at frames 0, hop, 2 hop, ... (as the live detector)."""
    if logmel.shape[0] < WINDOW_FRAMES:
        return np.zeros((0, WINDOW_FRAMES, logmel.shape[1]), np.float32)
    view = np.lib.stride_tricks.sliding_window_view(logmel, WINDOW_FRAMES, axis=0)
    return np.ascontiguousarray(view[::hop_frames].transpose(0, 2, 1))


class Embedder:
    """Batched YAMNet-to-embedding session (training only; the daemon runs events.onnx)."""

    def __init__(self, yamnet_path: Path, *, threads: int = 2) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # The features the daemon computes, the same on every CPU.
        self._session, _ = open_session(embedding_model_bytes(yamnet_path), options,
                                        name=yamnet_path)

    def embed(self, windows: np.ndarray) -> np.ndarray:
        """(n, 96, 64) float32 -> (n, 1024) float32 embeddings."""
        return self.features(windows)[0]

    def features(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, 96, 64) float32 -> embeddings (n, 1024) and AudioSet scores (n, 521), float32
        rounded to float16 (what the cache stores), so a run never depends on the cache."""
        emb = np.zeros((windows.shape[0], EMBEDDING_DIM), np.float16)
        audioset = np.zeros((windows.shape[0], AUDIOSET_DIM), np.float16)
        for i in range(0, windows.shape[0], _BATCH):
            emb[i:i + _BATCH], audioset[i:i + _BATCH] = self._session.run(
                None, {"log_mel": windows[i:i + _BATCH]})
        return emb.astype(np.float32), audioset.astype(np.float32)


def embed_signal(x: np.ndarray, *, params: FrontendParams, hop_frames: int,
                 embedder: Embedder) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (n, 1024) and AudioSet scores (n, 521) of every window of one continuous
    signal (a stream, not clips: windows straddle the joins, as the live detector's do)."""
    return embedder.features(windows_of(logmel_of(x, params), hop_frames=hop_frames))


def clip_audio(clip: Clip, *, variant: int, seed: int, beds: list[np.ndarray],
               max_s: float | None, room: bool = False) -> np.ndarray:
    """Padded waveform of a clip; variant 0 is clean, k > 0 an augmentation drawn from the seed
    (with `room`, reverberation alone: the clip in another room)."""
    x = pad(clip_waveform(clip, max_s=max_s), seconds=PAD_S)
    if variant == 0:
        return x
    key = int(hashlib.sha256(f"{seed}:{variant}:{clip.key}".encode()).hexdigest()[:12], 16)
    rng = np.random.default_rng(key)
    if room:
        return reverberate(x, rng)
    phone_p = 0.15 if clip.cls == "cough" else 0.4  # half the coughs are phone-band already
    return augment(x, rng=rng, beds=beds, phone_p=phone_p)


def extract(clips: list[Clip], *, yamnet_path: Path, cache_dir: Path, params: FrontendParams,
            hop_frames: int, variant: int = 0, seed: int = 0, beds: list[np.ndarray] | None = None,
            max_s: float | None = None, embedder: Embedder | None = None,
            room: bool = False) -> Windows:
    """Windows of every clip (cached); see `clip_audio` for `variant`."""
    key_src = json.dumps({"v": FEATURES_VERSION, "files": [c.key for c in clips],
                          "variant": variant, "seed": seed, "hop": hop_frames, "max_s": max_s,
                          "frontend": params.hash(), "yamnet": MODEL_SHA256,
                          "beds": len(beds or [])} | ({"room": True} if room else {}),
                         sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    path = cache_dir / f"windows-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return Windows(z["emb"].astype(np.float32), z["audioset"].astype(np.float32),
                           z["energy"], z["clip"], z["start"])
    t0 = time.perf_counter()
    model = embedder if embedder is not None else Embedder(yamnet_path)
    embs, audiosets, energies, clip_ids, starts = [], [], [], [], []
    for i, clip in enumerate(clips):
        x = clip_audio(clip, variant=variant, seed=seed, beds=beds or [], max_s=max_s, room=room)
        mel = logmel_of(x, params)
        win = windows_of(mel, hop_frames=hop_frames)
        frame_energy = mel.mean(axis=1)
        loud = np.sort(windows_of(frame_energy[:, None], hop_frames=hop_frames)[:, :, 0], axis=1)
        emb, audioset = model.features(win)
        embs.append(emb)
        audiosets.append(audioset)
        energies.append(loud[:, -10:].mean(axis=1).astype(np.float32))
        clip_ids.append(np.full(win.shape[0], i, np.int32))
        starts.append(np.arange(win.shape[0], dtype=np.int32) * hop_frames)
    out = Windows(np.concatenate(embs), np.concatenate(audiosets), np.concatenate(energies),
                  np.concatenate(clip_ids), np.concatenate(starts))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez(tmp, emb=out.emb.astype(np.float16), audioset=out.audioset.astype(np.float16),
             energy=out.energy, clip=out.clip, start=out.start)
    tmp.replace(path)
    logger.info("embedded %d clips (variant %d) into %d windows in %.1f s", len(clips), variant,
                out.emb.shape[0], time.perf_counter() - t0)
    return out


def class_index(clips: list[Clip]) -> np.ndarray:
    """(n_clips,) head class index of each clip."""
    return np.array([CLASSES.index(c.cls) for c in clips], np.int64)
