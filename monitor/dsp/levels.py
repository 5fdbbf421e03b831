"""Input conditioning and level metering in one pass over each block.

Bad samples must never reach the model: NaN/Inf are replaced by 0 and counted,
clipped samples are counted, and the running sums give RMS, peak and DC offset
for the `level` and `status` messages. Sums are taken in float64, so any finite
float32 sample (even 1e30) gives a finite level; a level outside
[DBFS_FLOOR, DBFS_CEILING] is clamped and counted, so none ever fails to encode.
"""

from __future__ import annotations

import math

import numpy as np

from monitor.dsp.jit import kernel

CLIP_LEVEL = 0.999
DBFS_FLOOR = -120.0
DBFS_CEILING = 120.0
"""A million times full scale: no audio; a level above it is clamped (and counted)."""

# Indices into the stats vector filled by `condition_block`.
SUM_SQUARES, PEAK, SUM, NONFINITE, CLIPPED, COUNT = range(6)


@kernel("void(f4[::1], f8[::1])")
def condition_block(x: np.ndarray, stats: np.ndarray) -> None:  # pragma: no cover - numba
    """Replace non-finite samples of `x` by 0 in place and accumulate level stats."""
    sum_squares = 0.0
    total = 0.0
    peak = stats[PEAK]
    nonfinite = 0
    clipped = 0
    for i in range(x.shape[0]):
        v = x[i]
        if not np.isfinite(v):
            x[i] = 0.0
            nonfinite += 1
            continue
        w = np.float64(v)  # float32 squares overflow from 1.8e19 on
        a = abs(w)
        if a >= CLIP_LEVEL:
            clipped += 1
        if a > peak:
            peak = a
        sum_squares += w * w
        total += w
    stats[SUM_SQUARES] += sum_squares
    stats[PEAK] = peak
    stats[SUM] += total
    stats[NONFINITE] += nonfinite
    stats[CLIPPED] += clipped
    stats[COUNT] += x.shape[0]


def to_dbfs(amplitude: float) -> float:
    """Amplitude (full scale 1.0) -> dBFS, floored at -120 (not clamped above)."""
    return 20.0 * math.log10(amplitude) if amplitude > 1e-6 else DBFS_FLOOR


def clamp_level(value: float) -> float:
    """`value` (dBFS) within [DBFS_FLOOR, DBFS_CEILING]; NaN becomes the floor."""
    if math.isnan(value):
        return DBFS_FLOOR
    return min(max(value, DBFS_FLOOR), DBFS_CEILING)


class LevelMeter:
    """Accumulates conditioning stats over a span (one `level` message) of audio."""

    def __init__(self) -> None:
        self.span = np.zeros(6, dtype=np.float64)
        self.nonfinite_total = 0
        self.clipped_total = 0
        self.clamped_levels_total = 0
        """Levels (RMS or peak of a span) outside [DBFS_FLOOR, DBFS_CEILING], clamped."""
        self.rms_dbfs = DBFS_FLOOR
        self.peak_dbfs = DBFS_FLOOR
        self.dc_offset = 0.0

    def condition(self, block: np.ndarray) -> None:
        """Clean `block` in place and add it to the current span."""
        condition_block(block, self.span)

    def close_span(self) -> None:
        """Turn the span's sums into levels and start a new span."""
        span = self.span
        count = max(span[COUNT], 1.0)
        rms = to_dbfs(math.sqrt(span[SUM_SQUARES] / count))
        peak = to_dbfs(span[PEAK])
        self.rms_dbfs = clamp_level(rms)
        self.peak_dbfs = clamp_level(peak)
        self.clamped_levels_total += (self.rms_dbfs != rms) + (self.peak_dbfs != peak)
        self.dc_offset = span[SUM] / count
        self.nonfinite_total += int(span[NONFINITE])
        self.clipped_total += int(span[CLIPPED])
        span.fill(0.0)
