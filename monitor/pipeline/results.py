"""What the chain finds and where it goes: the `Sink` a `Processor` hands its results to.

Positions are samples at the front-end rate. The live sink is the composer of the outputs
(`monitor.outputs.composer.Composer`); `analyze` and `calibrate` collect instead.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from monitor.detect.anomaly import MachineReading
from monitor.detect.events import Transition
from monitor.dsp.levels import LevelMeter


class Sink(Protocol):
    """Receives what the processor finds; positions are samples at the front-end rate."""

    def on_transition(self, transition: Transition) -> None: ...

    def on_scores(self, end: int, scores: np.ndarray, inference_ms: float) -> None:
        """One scored window ending at sample `end`; `inference_ms`: the model's time on it."""

    def on_level(self, end: int, meter: LevelMeter, mel_frame: np.ndarray) -> None: ...

    def on_machine(self, reading: MachineReading) -> None: ...


class NullSink:
    """A sink that ignores everything (warm-up; base for sinks that need only part)."""

    def on_transition(self, transition: Transition) -> None:
        pass

    def on_scores(self, end: int, scores: np.ndarray, inference_ms: float) -> None:
        pass

    def on_level(self, end: int, meter: LevelMeter, mel_frame: np.ndarray) -> None:
        pass

    def on_machine(self, reading: MachineReading) -> None:
        pass
