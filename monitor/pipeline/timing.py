"""Every size the chain uses, in samples or frames, derived in one place from the config and
the model card (hop, analysis window, detector window and stride, level span)."""

from __future__ import annotations

from dataclasses import dataclass

from monitor.config import Config
from monitor.detect.detector import Detector

DEFAULT_METER_HZ = 10.0
"""Level spans per second when no `level` messages are published (the machines' level gate
still needs a meter)."""


@dataclass(frozen=True)
class Timing:
    """Every size in samples or frames, derived in one place from config and model card."""

    sample_rate: int
    hop: int
    window: int
    """Front-end analysis window, samples."""
    window_frames: int
    stride_frames: int
    level_span: int
    """Samples per level span: one `level` message, one update of the meter."""
    publish_levels: bool

    @property
    def detector_window(self) -> int:
        """Samples covered by one scored window of `window_frames` frames."""
        return (self.window_frames - 1) * self.hop + self.window

    @property
    def stride(self) -> int:
        return self.stride_frames * self.hop

    def frame_end(self, frame_index: int) -> int:
        """Sample just after the last sample of frame `frame_index` (0-based)."""
        return frame_index * self.hop + self.window

    def first_frame_ending_at(self, sample: int) -> int:
        """Index of the first frame whose `frame_end` is at or after `sample`."""
        return max(0, -(-(sample - self.window) // self.hop))


def derive_timing(config: Config, detector: Detector) -> Timing:
    params = detector.card.frontend
    hop = params.hop_length
    stride_frames = max(1, round(config.model.stride_ms / params.hop_ms))
    level_hz = config.publish.level_hz or DEFAULT_METER_HZ  # machines' level gate needs a meter
    return Timing(sample_rate=params.sample_rate, hop=hop, window=params.win_length,
                  window_frames=detector.window_frames, stride_frames=stride_frames,
                  level_span=round(params.sample_rate / level_hz),
                  publish_levels=config.publish.level_hz > 0)
