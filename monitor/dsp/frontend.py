"""Streaming log-mel front end: sliding Hann window -> real FFT -> mel -> log, YAMNet-compatible.

The defaults reproduce YAMNet's input: ``tf.signal.stft(frame_length=400, frame_step=160,
fft_length=512)`` with a periodic Hann window and no end padding, ``abs``, TF's
``linear_to_mel_weight_matrix(64, 257, 16000, 125, 7500)``, then ``log(mel + 0.001)``.
Training and the live daemon both go through :class:`Frontend` (see :func:`logmel_of`), so
the features a model sees never depend on how the audio was chunked.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.dsp import kernels
from monitor.errors import ConfigError

logger = logging.getLogger(__name__)

_MAGNITUDES = ("magnitude", "power")
_MEL_SCALES = ("htk",)


@dataclass(frozen=True)
class FrontendParams:
    """Front-end settings; every sample count is derived here from the rate and milliseconds."""

    sample_rate: int = 16000
    """Input rate in Hz."""
    window_ms: float = 25.0
    """Analysis window (periodic Hann) in ms, zero-padded to n_fft."""
    hop_ms: float = 10.0
    """Frame step in ms; at most window_ms so that no audio goes unanalysed."""
    n_fft: int = 512
    """FFT length, a power of 2 >= win_length."""
    n_mels: int = 64
    """Number of mel bands."""
    fmin_hz: float = 125.0
    """Lower edge of the lowest mel band in Hz."""
    fmax_hz: float = 7500.0
    """Upper edge of the highest mel band in Hz, <= sample_rate / 2."""
    log_offset: float = 0.001
    """Features are log(mel + log_offset); keeps silence finite."""
    magnitude: str = "magnitude"
    """"magnitude" (|X|, as YAMNet) or "power" (|X|^2)."""
    mel_scale: str = "htk"
    """Mel formula: "htk" = 1127 ln(1 + f/700) with TF-style triangles (the only one so far)."""

    @property
    def win_length(self) -> int:
        """Analysis window in samples."""
        return round(self.sample_rate * self.window_ms / 1000.0)

    @property
    def hop_length(self) -> int:
        """Frame step in samples."""
        return round(self.sample_rate * self.hop_ms / 1000.0)

    @property
    def n_bins(self) -> int:
        """Number of rfft bins, n_fft // 2 + 1."""
        return self.n_fft // 2 + 1

    def validate(self, *, where: str = "frontend") -> None:
        """Raise ConfigError naming the first bad field, its value and what is allowed."""
        ints = ("sample_rate", "n_fft", "n_mels")
        floats = ("window_ms", "hop_ms", "fmin_hz", "fmax_hz", "log_offset")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{where}.{name}={v!r}: must be an integer")
        for name in floats:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ConfigError(f"{where}.{name}={v!r}: must be a number")
            if not math.isfinite(v):
                raise ConfigError(f"{where}.{name}={v!r}: must be finite")
        if self.sample_rate <= 0:
            raise ConfigError(f"{where}.sample_rate={self.sample_rate}: must be > 0")
        if self.window_ms <= 0 or self.win_length < 2:
            raise ConfigError(
                f"{where}.window_ms={self.window_ms}: must give >= 2 samples at "
                f"{self.sample_rate} Hz"
            )
        if self.hop_ms <= 0 or self.hop_length < 1:
            raise ConfigError(
                f"{where}.hop_ms={self.hop_ms}: must give >= 1 sample at {self.sample_rate} Hz"
            )
        if self.hop_length > self.win_length:
            raise ConfigError(
                f"{where}.hop_ms={self.hop_ms}: must be <= window_ms={self.window_ms} "
                "(a longer hop would skip audio)"
            )
        n = self.n_fft
        if n < 4 or n & (n - 1) or n < self.win_length:
            raise ConfigError(
                f"{where}.n_fft={n}: must be a power of 2 >= 4 and >= win_length "
                f"({self.win_length} samples)"
            )
        if self.n_mels < 1:
            raise ConfigError(f"{where}.n_mels={self.n_mels}: must be >= 1")
        nyquist = self.sample_rate / 2.0
        if self.fmax_hz > nyquist or self.fmax_hz <= 0:
            raise ConfigError(
                f"{where}.fmax_hz={self.fmax_hz}: must be in (0, sample_rate/2={nyquist:g}]"
            )
        if not 0 <= self.fmin_hz < self.fmax_hz:
            raise ConfigError(
                f"{where}.fmin_hz={self.fmin_hz}: must be >= 0 and < fmax_hz={self.fmax_hz}"
            )
        if self.log_offset <= 0:
            raise ConfigError(f"{where}.log_offset={self.log_offset}: must be > 0")
        if self.magnitude not in _MAGNITUDES:
            raise ConfigError(f"{where}.magnitude={self.magnitude!r}: must be one of {_MAGNITUDES}")
        if self.mel_scale not in _MEL_SCALES:
            raise ConfigError(f"{where}.mel_scale={self.mel_scale!r}: must be one of {_MEL_SCALES}")

    def to_dict(self) -> dict[str, Any]:
        """The fields (not the derived sizes) as plain JSON-able values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str) -> "FrontendParams":
        """Build and validate from a config mapping; missing keys take the defaults."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}={d!r}: must be a mapping of front-end settings")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ConfigError(
                    f"{where}.{key}: unknown key; allowed: {', '.join(sorted(names))}"
                )
        params = cls(**d)
        params.validate(where=where)
        return params

    def hash(self) -> str:
        """First 16 hex chars of sha256 over canonical JSON; a model card stores it."""
        d = {k: (float(v) if k in _FLOAT_FIELDS else v) for k, v in self.to_dict().items()}
        text = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# Float fields hash as floats, so window_ms=25 and window_ms=25.0 give the same hash.
_FLOAT_FIELDS = frozenset(
    f.name for f in dataclasses.fields(FrontendParams) if f.type in (float, "float")
)


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=16)
def mel_filterbank(params: FrontendParams) -> np.ndarray:
    """TF ``linear_to_mel_weight_matrix`` transposed: (n_mels, n_fft//2+1) float32, read-only.

    Linear bin frequencies are linspace(0, sr/2, n_bins), the DC bin gets zero weight, band
    edges are evenly spaced in HTK mel, triangles are taken in the mel domain, no area
    normalisation.
    """
    params.validate()
    n_bins = params.n_bins
    bin_mel = _hz_to_mel(np.linspace(0.0, params.sample_rate / 2.0, n_bins))[1:]
    edges = np.linspace(_hz_to_mel(params.fmin_hz), _hz_to_mel(params.fmax_hz), params.n_mels + 2)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    lower = (bin_mel[None, :] - left) / (center - left)
    upper = (right - bin_mel[None, :]) / (right - center)
    fb = np.zeros((params.n_mels, n_bins), dtype=np.float32)
    fb[:, 1:] = np.maximum(0.0, np.minimum(lower, upper))
    fb.setflags(write=False)
    return fb


def _compact_filterbank(fb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(3, n_mels) first bin, bin count, offset into the flat weights of each mel; the weights."""
    n_mels = fb.shape[0]
    first = np.zeros(n_mels, dtype=np.int64)
    count = np.zeros(n_mels, dtype=np.int64)
    parts = []
    for m in range(n_mels):
        nz = np.flatnonzero(fb[m])
        if nz.size:
            first[m] = nz[0]
            count[m] = nz[-1] - nz[0] + 1
            parts.append(fb[m, nz[0] : nz[-1] + 1].astype(np.float64))
    offset = np.zeros(n_mels, dtype=np.int64)
    offset[1:] = np.cumsum(count)[:-1]
    weights = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    return np.stack([first, count, offset]), weights


def _fft_tables(n_fft: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bit reversal of n_fft/2 indices, its twiddles and the real-FFT split twiddles (cos, sin)."""
    half = n_fft // 2
    bits = half.bit_length() - 1
    idx = np.arange(half)
    bitrev = np.zeros(half, dtype=np.int64)
    for b in range(bits):
        bitrev |= ((idx >> b) & 1) << (bits - 1 - b)
    tw = np.exp(-2j * np.pi * np.arange(max(half // 2, 1)) / half)
    post = np.exp(-2j * np.pi * np.arange(half + 1) / n_fft)
    return bitrev, np.stack([tw.real, tw.imag]), np.stack([post.real, post.imag])


def hann_periodic(n: int) -> np.ndarray:
    """Periodic Hann window of n samples (as tf.signal.hann_window and scipy's sym=False)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


class Frontend:
    """Incremental log-mel: feed any number of samples, get one frame per completed hop.

    Frame k covers samples [k*hop, k*hop+win) of the stream since the last :meth:`reset`;
    results do not depend on how the stream is chunked. Not thread-safe: one caller thread.
    """

    def __init__(self, params: FrontendParams, *, max_block: int = 4096) -> None:
        params.validate()
        if max_block < 1:
            raise ConfigError(f"max_block={max_block}: must be >= 1")
        self.params = params
        self.n_mels = params.n_mels
        self.hop_length = params.hop_length
        self.win_length = params.win_length
        self.max_block = max_block
        self._window = hann_periodic(self.win_length)
        self._bitrev, self._twiddle, self._post = _fft_tables(params.n_fft)
        self._mel_bins, self._mel_w = _compact_filterbank(mel_filterbank(params))
        self._log_offset = float(params.log_offset)
        self._power = params.magnitude == "power"
        self._buf = np.zeros(self.win_length + max_block, dtype=np.float32)
        self._state = np.zeros(2, dtype=np.int64)  # [buffered samples, frames emitted]
        self._z = np.zeros((2, params.n_fft // 2), dtype=np.float64)
        self._spec = np.zeros(params.n_bins, dtype=np.float64)

    @property
    def frames_emitted(self) -> int:
        """Frames written since the last reset (the next frame's index)."""
        return int(self._state[1])

    def max_frames(self, n_samples: int) -> int:
        """Rows `out` needs for a block of n_samples, whatever is already buffered."""
        return -(-n_samples // self.hop_length)

    def process(self, samples: np.ndarray, out: np.ndarray) -> int:
        """Append samples (1-D, float32) and write a log-mel row per completed hop; return count.

        out: (>= max_frames(len(samples)), n_mels) float32 C-contiguous. No allocation when
        samples is float32 contiguous; other dtypes or strides are converted (a copy).
        """
        if samples.dtype != np.float32 or not samples.flags.c_contiguous:
            samples = np.ascontiguousarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"samples has shape {samples.shape}; expected 1-D")
        needed = (int(self._state[0]) + samples.shape[0] - self.win_length) // self.hop_length + 1
        if (
            out.dtype != np.float32
            or out.ndim != 2
            or out.shape[1] != self.n_mels
            or out.shape[0] < needed
            or not out.flags.c_contiguous
        ):
            raise ValueError(
                f"out is {out.dtype} {out.shape}; expected float32 C-contiguous "
                f"(>={max(needed, 0)}, {self.n_mels})"
            )
        return int(
            kernels.stream_block(
                samples, self._buf, self._state, self.hop_length, self._window, self._bitrev,
                self._twiddle, self._post, self._mel_bins, self._mel_w, self._log_offset,
                self._power, self._z, self._spec, out,
            )
        )  # fmt: skip

    def reset(self) -> None:
        """Forget buffered audio and restart frame numbering at 0."""
        self._state[:] = 0


def logmel_of(samples: np.ndarray, params: FrontendParams) -> np.ndarray:
    """(n_frames, n_mels) float32 log-mel of a whole signal, through the live streaming code."""
    fe = Frontend(params)
    out = np.empty((fe.max_frames(samples.shape[0]), fe.n_mels), dtype=np.float32)
    n = fe.process(samples, out)
    return out[:n].copy() if n < out.shape[0] else out


@functools.lru_cache(maxsize=16)
def silence_frame(params: FrontendParams) -> np.ndarray:
    """(n_mels,) float32, read-only: the log-mel frame of digital silence (zeros through the
    front end). The detector's history starts filled with it, and the end of a stream is
    padded with it, so the model sees silence around a stream as it would around a sound."""
    frame = logmel_of(np.zeros(params.win_length, dtype=np.float32), params)[0].copy()
    frame.setflags(write=False)
    return frame


def offline_logmel(samples: np.ndarray, params: FrontendParams) -> np.ndarray:
    """Plain-numpy reference (np.fft.rfft over all frames at once); the tests' oracle."""
    params.validate()
    win, hop = params.win_length, params.hop_length
    x = np.asarray(samples, dtype=np.float32).astype(np.float64)
    if x.shape[0] < win:
        return np.zeros((0, params.n_mels), dtype=np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[::hop]
    spec = np.abs(np.fft.rfft(frames * hann_periodic(win), n=params.n_fft, axis=1))
    if params.magnitude == "power":
        spec = spec**2
    mel = spec @ mel_filterbank(params).astype(np.float64).T
    return np.log(mel + params.log_offset).astype(np.float32)


def bench_hop_us(params: FrontendParams, n: int = 2000) -> float:
    """Microseconds per one-hop :meth:`Frontend.process` call (after warm-up)."""
    fe = Frontend(params)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(params.hop_length).astype(np.float32) * 0.1
    out = np.empty((fe.max_frames(x.shape[0]), fe.n_mels), dtype=np.float32)
    for _ in range(fe.win_length // fe.hop_length + 2):
        fe.process(x, out)
    t0 = time.perf_counter()
    for _ in range(n):
        fe.process(x, out)
    return (time.perf_counter() - t0) / n * 1e6
