"""Numba kernels of the streaming log-mel front end; they write into caller arrays, never allocate.

Numba has no ``np.fft``, so the real FFT is an iterative radix-2 complex FFT of n_fft/2 points
(even samples as real part, odd as imaginary) followed by the standard split step; that costs
about half of a plain n_fft-point complex FFT. Tables (bit reversal, twiddles, window, the
compact mel filterbank) are built once by :class:`monitor.dsp.frontend.Frontend`. Related tables
are stacked into one array (cos/sin rows, etc.) to keep the argument count low: each argument
costs dispatch time, and calls with 20 or more arguments make CPython allocate per call.
"""

import numpy as np

from monitor.dsp.jit import kernel


@kernel("void(f4[::1], i8, f8[::1], i8[::1], f8[:, ::1], f8[:, ::1], i8[:, ::1], f8[::1], "
        "f8, b1, f8[:, ::1], f8[::1], f4[::1])")
def logmel_frame(
    buf: np.ndarray,
    start: int,
    window: np.ndarray,
    bitrev: np.ndarray,
    twiddle: np.ndarray,
    post: np.ndarray,
    mel_bins: np.ndarray,
    mel_w: np.ndarray,
    log_offset: float,
    power: bool,
    z: np.ndarray,
    spec: np.ndarray,
    out_row: np.ndarray,
) -> None:
    """Write log(mel(|rfft(window * buf[start:start+win], n_fft)|) + log_offset) into out_row.

    Shapes: window (win,); bitrev (n_fft/2,); twiddle (2, n_fft/4) = cos, sin rows of
    exp(-2πij/(n_fft/2)); post (2, n_fft/2+1) = cos, sin rows of exp(-2πik/n_fft); z scratch
    (2, n_fft/2) real, imaginary rows; spec scratch (n_fft/2+1,); mel_bins (3, n_mels) = first
    bin, bin count, offset into mel_w of each mel's nonzero weights.
    """
    win = window.shape[0]
    zr = z[0]
    zi = z[1]
    half = zr.shape[0]
    tw_re = twiddle[0]
    tw_im = twiddle[1]
    post_re = post[0]
    post_im = post[1]
    mel_first = mel_bins[0]
    mel_count = mel_bins[1]
    mel_offset = mel_bins[2]
    # Load: pack pairs of windowed samples as complex numbers, in bit-reversed order;
    # samples past win are the zero padding up to n_fft.
    for k in range(half):
        t = 2 * k
        j = bitrev[k]
        if t + 1 < win:
            zr[j] = buf[start + t] * window[t]
            zi[j] = buf[start + t + 1] * window[t + 1]
        elif t < win:
            zr[j] = buf[start + t] * window[t]
            zi[j] = 0.0
        else:
            zr[j] = 0.0
            zi[j] = 0.0
    # In-place iterative radix-2 butterflies on n_fft/2 points.
    size = 2
    while size <= half:
        h = size >> 1
        step = half // size
        for j in range(h):
            wr = tw_re[j * step]
            wi = tw_im[j * step]
            for a in range(j, half, size):
                b = a + h
                tr = wr * zr[b] - wi * zi[b]
                ti = wr * zi[b] + wi * zr[b]
                zr[b] = zr[a] - tr
                zi[b] = zi[a] - ti
                zr[a] += tr
                zi[a] += ti
        size <<= 1
    # Split step: spectrum of the real 2*half-point signal, bins 0..half, as |X| or |X|^2.
    for k in range(half + 1):
        ka = k if k < half else 0
        kb = half - k if k > 0 else 0
        a = zr[ka]
        b = zi[ka]
        c = zr[kb]
        d = zi[kb]
        er = 0.5 * (a + c)
        ei = 0.5 * (b - d)
        orr = 0.5 * (b + d)
        oi = -0.5 * (a - c)
        wr = post_re[k]
        wi = post_im[k]
        xr = er + wr * orr - wi * oi
        xi = ei + wr * oi + wi * orr
        p = xr * xr + xi * xi
        spec[k] = p if power else np.sqrt(p)
    # Compact triangular filterbank: about 2 MACs per bin in [fmin, fmax].
    for m in range(mel_first.shape[0]):
        acc = 0.0
        f = mel_first[m]
        o = mel_offset[m]
        for q in range(mel_count[m]):
            acc += mel_w[o + q] * spec[f + q]
        out_row[m] = np.float32(np.log(acc + log_offset))


@kernel("i8(f4[::1], f4[::1], i8[::1], i8, f8[::1], i8[::1], f8[:, ::1], f8[:, ::1], "
        "i8[:, ::1], f8[::1], f8, b1, f8[:, ::1], f8[::1], f4[:, ::1])")
def stream_block(
    samples: np.ndarray,
    buf: np.ndarray,
    state: np.ndarray,
    hop: int,
    window: np.ndarray,
    bitrev: np.ndarray,
    twiddle: np.ndarray,
    post: np.ndarray,
    mel_bins: np.ndarray,
    mel_w: np.ndarray,
    log_offset: float,
    power: bool,
    z: np.ndarray,
    spec: np.ndarray,
    out: np.ndarray,
) -> int:
    """Append samples to the history and write one frame per completed hop into out; return count.

    buf holds the not yet framed samples from the start of the next frame on (state[0] of them,
    always < win between calls); it has room for win + max_block samples, so samples are taken
    in pieces of max_block. Needs hop <= win. state[1] counts frames emitted since reset.
    """
    win = window.shape[0]
    max_block = buf.shape[0] - win
    n_buf = state[0]
    n = samples.shape[0]
    n_out = 0
    i = 0
    while i < n:
        m = min(max_block, n - i)
        buf[n_buf : n_buf + m] = samples[i : i + m]
        n_buf += m
        i += m
        s = 0
        while s + win <= n_buf:
            logmel_frame(
                buf, s, window, bitrev, twiddle, post, mel_bins, mel_w, log_offset, power,
                z, spec, out[n_out],
            )  # fmt: skip
            n_out += 1
            s += hop
        if s > 0:
            rem = n_buf - s
            for j in range(rem):
                buf[j] = buf[s + j]
            n_buf = rem
    state[0] = n_buf
    state[1] += n_out
    return n_out
