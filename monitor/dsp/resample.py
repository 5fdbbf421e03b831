"""Downmix and streaming polyphase resampling from a source's native rate to the model's rate.

Chunked output equals one-shot output (same filter, same sums in the same
order), so results never depend on how the capture side happened to block
the audio.
"""

from __future__ import annotations

import logging
from math import gcd

import numpy as np

from monitor.dsp.jit import kernel

__all__ = ["StreamingResampler", "downmix_into", "kaiser_lowpass"]

logger = logging.getLogger(__name__)

# The anti-alias filter matches scipy.signal.resample_poly's default design.
_KAISER_BETA = 5.0
_HALF_LEN_PER_RATE = 10


def kaiser_lowpass(numtaps: int, cutoff: float, beta: float) -> np.ndarray:
    """Windowed-sinc low-pass, identical to `scipy.signal.firwin(numtaps, cutoff,
    window=("kaiser", beta))` (cutoff relative to Nyquist, unit gain at DC; a test checks
    it). Written with numpy so the daemon does not import scipy.signal, which alone costs
    ~75 MB of resident memory on a small board."""
    m = np.arange(numtaps) - (numtaps - 1) / 2.0
    h = cutoff * np.sinc(cutoff * m) * np.kaiser(numtaps, beta)
    return h / h.sum()


@kernel("void(f4[::1], i8, i8, f4[::1])")
def _downmix_kernel(x: np.ndarray, channels: int, frames: int, out: np.ndarray) -> None:
    scale = np.float32(1.0) / np.float32(channels)
    for i in range(frames):
        acc = np.float32(0.0)
        base = i * channels
        for c in range(channels):
            acc += x[base + c]
        out[i] = acc * scale


def downmix_into(interleaved: np.ndarray, channels: int, out: np.ndarray) -> int:
    """Mean over channels of interleaved float32 `interleaved` into `out`; return frames written.

    `interleaved` has shape (frames * channels,); a trailing partial frame is
    ignored. `out` needs room for `len(interleaved) // channels` samples.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    frames = interleaved.shape[0] // channels
    if out.shape[0] < frames:
        raise ValueError(f"out holds {out.shape[0]} samples, {frames} frames need room")
    if channels == 1:
        out[:frames] = interleaved[:frames]
    else:
        _downmix_kernel(interleaved, channels, frames, out)
    return frames


@kernel("UniTuple(i8, 2)(f4[::1], i8, i8, f8[:, ::1], i8, i8, i8, f4[::1])")
def _polyphase_kernel(
    xbuf: np.ndarray,
    hist: int,
    n: int,
    bank: np.ndarray,
    up: int,
    down: int,
    t: int,
    out: np.ndarray,
) -> tuple[int, int]:
    """Outputs whose newest input lies in xbuf[hist:hist+n]; returns (written, next t).

    Shifts the history into place for the next call.

    `t` is the next output's position on the upsampled grid, relative to the
    first new input sample; `bank[p, j] = h[p + j*up]`.
    """
    taps = bank.shape[1]
    limit = n * up
    k = 0
    while t < limit:
        i = t // up
        p = t - i * up
        pos = hist + i
        acc = 0.0
        for j in range(taps):
            acc += bank[p, j] * xbuf[pos - j]
        out[k] = acc
        k += 1
        t += down
    # Keep the newest `hist` inputs as history (forward copy: destination is below source).
    for j in range(hist):
        xbuf[j] = xbuf[n + j]
    return k, t - limit


class StreamingResampler:
    """Streaming rational resampler (polyphase FIR, Kaiser window like `resample_poly`).

    The ratio is reduced to `up/down` by their gcd; the anti-alias filter is
    `firwin(2*10*max(up, down)+1, 1/max(up, down), window=("kaiser", 5.0)) * up`
    at the upsampled rate, front-padded so its delay is a whole number of output
    samples. After n inputs in total, exactly `ceil(n*up/down)` outputs have been
    produced, whatever the chunking. Output sample `m + delay_out` corresponds to
    input time `m / out_rate`; `delay_out` is the group delay in output samples.

    Buffers are allocated here; `process` allocates nothing (inputs longer than
    `max_block` are handled in pieces).
    """

    def __init__(self, in_rate: int, out_rate: int, *, max_block: int) -> None:
        """Design the filter; allocate history for inputs of up to `max_block` samples a piece."""
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"rates must be > 0, got in_rate={in_rate}, out_rate={out_rate}")
        if max_block < 1:
            raise ValueError(f"max_block must be >= 1, got {max_block}")
        g = gcd(int(in_rate), int(out_rate))
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self.up = self.out_rate // g
        self.down = self.in_rate // g
        self.max_block = int(max_block)
        self.identity = self.up == 1 and self.down == 1
        if self.identity:
            self.delay_out = 0
            self.bank = np.ones((1, 1), dtype=np.float64)
            self._hist = 0
        else:
            max_rate = max(self.up, self.down)
            half_len = _HALF_LEN_PER_RATE * max_rate
            h = kaiser_lowpass(2 * half_len + 1, 1.0 / max_rate, _KAISER_BETA) * self.up
            # Pad in front so the delay (half_len + pad) is a multiple of `down`.
            pre_pad = (-half_len) % self.down
            self.delay_out = (half_len + pre_pad) // self.down
            h = np.concatenate([np.zeros(pre_pad), h])
            taps = -(-h.shape[0] // self.up)
            padded = np.zeros(taps * self.up)
            padded[: h.shape[0]] = h
            self.bank = np.ascontiguousarray(padded.reshape(taps, self.up).T)
            self._hist = taps - 1
        self._xbuf = np.zeros(self._hist + self.max_block, dtype=np.float32)
        self._t = 0
        logger.debug(
            "resampler %d->%d Hz: up=%d down=%d taps/phase=%d delay_out=%d",
            self.in_rate, self.out_rate, self.up, self.down, self.bank.shape[1], self.delay_out,
        )

    @property
    def taps_per_phase(self) -> int:
        """Multiply-adds per output sample."""
        return int(self.bank.shape[1])

    def max_output(self, n_in: int) -> int:
        """Room `out` needs for `process` of `n_in` samples (an upper bound for any state)."""
        return -(-n_in * self.up // self.down)

    def inputs_for(self, outputs: int) -> int:
        """Inputs still needed before `process` has written `outputs` more samples."""
        if outputs <= 0 or self.identity:
            return max(outputs, 0)
        # Output j sits at t + j*down on the upsampled grid and needs the input under it.
        return (self._t + (outputs - 1) * self.down) // self.up + 1

    def reset(self) -> None:
        """Forget history, as if the stream started anew (e.g. after a capture gap)."""
        self._xbuf[:] = 0.0
        self._t = 0

    def process(self, x: np.ndarray, out: np.ndarray) -> int:
        """Resample float32 `x` (1-D) into `out`; return the number of samples written."""
        n_total = x.shape[0]
        if out.shape[0] < self.max_output(n_total):
            raise ValueError(
                f"out holds {out.shape[0]} samples, {self.max_output(n_total)} needed "
                f"for {n_total} inputs"
            )
        if self.identity:
            out[:n_total] = x
            return n_total
        hist = self._hist
        written = 0
        done = 0
        while done < n_total:
            n = min(self.max_block, n_total - done)
            self._xbuf[hist : hist + n] = x[done : done + n]
            k, self._t = _polyphase_kernel(
                self._xbuf, hist, n, self.bank, self.up, self.down, self._t, out[written:]
            )
            written += k
            done += n
        return written
