"""Per-hop cost of the streaming front end against plain-numpy, librosa and (when installed)
torchaudio sliding windows.

Run from the repo root: NUMBA_CACHE_DIR=/tmp/numba-cache python -m benchmarks.bench_frontend
Each contender gets one hop of audio per call and must produce that hop's log-mel frame.
"""

import time
from collections.abc import Callable

import numpy as np

from monitor.dsp.frontend import FrontendParams, bench_hop_us, hann_periodic, mel_filterbank


def _per_call_us(step: Callable[[], object], n: int) -> float:
    for _ in range(50):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n * 1e6


def numpy_hop_us(params: FrontendParams, n: int = 2000) -> float:
    """A careful numpy version: history shift, np.fft.rfft, dense filterbank matmul, log."""
    win, hop = params.win_length, params.hop_length
    history = np.zeros(win, dtype=np.float32)
    window = hann_periodic(win)
    fb = mel_filterbank(params).astype(np.float64)
    mel = np.empty(params.n_mels)
    out = np.empty(params.n_mels, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal(hop).astype(np.float32)

    def step() -> None:
        history[:-hop] = history[hop:]
        history[-hop:] = x
        spec = np.abs(np.fft.rfft(history * window, n=params.n_fft))
        np.dot(fb, spec, out=mel)
        np.add(mel, params.log_offset, out=mel)
        np.log(mel, out=out, casting="same_kind")

    return _per_call_us(step, n)


def librosa_hop_us(params: FrontendParams, n: int = 2000) -> float | None:
    """librosa.feature.melspectrogram on the sliding window (its own HTK filterbank); None
    if librosa is not installed (the demo's set-up installs run-time packages only)."""
    try:
        import librosa
    except ImportError:
        return None

    win, hop = params.win_length, params.hop_length
    history = np.zeros(params.n_fft, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal(hop).astype(np.float32)
    kwargs = dict(
        sr=params.sample_rate, n_fft=params.n_fft, hop_length=hop, win_length=win,
        center=False, power=2.0 if params.magnitude == "power" else 1.0, n_mels=params.n_mels,
        fmin=params.fmin_hz, fmax=params.fmax_hz, htk=True, norm=None,
    )  # fmt: skip

    def step() -> None:
        history[:-hop] = history[hop:]
        history[-hop:] = x
        mel = librosa.feature.melspectrogram(y=history, **kwargs)  # type: ignore[arg-type]
        np.log(mel[:, 0] + params.log_offset)

    return _per_call_us(step, n)


def torchaudio_hop_us(params: FrontendParams, n: int = 2000) -> float | None:
    """torchaudio's MelSpectrogram on the sliding window, one thread; None if torchaudio is
    not installed or does not load (it is no dependency: torch is for training only, and
    PyPI's torchaudio needs a torch other than the pinned CPU build)."""
    try:
        import torch
        import torchaudio
    except (ImportError, OSError):
        return None
    torch.set_num_threads(1)
    win, hop = params.win_length, params.hop_length
    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=params.sample_rate, n_fft=params.n_fft, win_length=win, hop_length=hop,
        f_min=params.fmin_hz, f_max=params.fmax_hz, n_mels=params.n_mels, center=False,
        power=2.0 if params.magnitude == "power" else 1.0, norm=None, mel_scale="htk")
    history = torch.zeros(params.n_fft)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(hop).astype(np.float32))

    def step() -> None:
        with torch.inference_mode():
            history[:-hop] = history[hop:].clone()
            history[-hop:] = x
            torch.log(transform(history)[:, 0] + params.log_offset)

    return _per_call_us(step, n)


def main() -> None:
    for params in (FrontendParams(), FrontendParams(sample_rate=22050, n_fft=1024, n_mels=40,
                                                   hop_ms=5.0, fmax_hz=11025.0)):  # fmt: skip
        ours = min(bench_hop_us(params) for _ in range(3))
        npy = min(numpy_hop_us(params) for _ in range(3))
        runs = [librosa_hop_us(params, n=500) for _ in range(3)]
        lib = None if None in runs else min(t for t in runs if t is not None)
        peer = "librosa not installed" if lib is None else \
            f"librosa {lib:.1f} us ({lib / ours:.0f}x)"
        print(
            f"sr={params.sample_rate} n_fft={params.n_fft} win={params.win_length} "
            f"hop={params.hop_length} n_mels={params.n_mels}: ours {ours:.1f} us/hop, "
            f"numpy {npy:.1f} us ({npy / ours:.1f}x), {peer}"
        )


if __name__ == "__main__":
    main()
