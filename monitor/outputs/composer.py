"""The seam between the processing chain and everything that leaves the daemon.

processor results (audio-time positions) -> `Composer` (wire messages: header with
`seq`, wall-clock times, top-k scores, coarse spectrum) -> every configured `Output`
(ZeroMQ publisher with journal and catch-up, MQTT, Prometheus metrics, ...).

The composer builds each message once; outputs see the same frozen `Message`
objects, so an event carries the same `event_id` and journal `seq` on every
output. The chain does not know which outputs exist. An output that raises is
logged and counted (`output_errors`); the others and the daemon carry on.

Adding an output: a module `monitor/outputs/<key>.py` with an `Output` subclass and a
`build(section, context)` function, and a section `<key>:` with an `enabled` flag in
`Config` (and `config.yaml`); `build_outputs` builds every enabled one.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from monitor.config import Config
from monitor.detect.anomaly import MachineReading
from monitor.detect.events import Transition
from monitor.dsp.levels import LevelMeter
from monitor.outputs.publisher import Publisher
from monitor.protocol.messages import Anomaly, Event, Level, Message, Scores, Status, encode

logger = logging.getLogger(__name__)

RESYNC_S = 0.05  # re-tie audio time to wall time when they drift apart by more than this


@dataclass(frozen=True)
class Catalog:
    """What this sensor produces (for outputs that announce it, e.g. MQTT discovery)."""

    model: str
    """The event model's name (model card)."""
    classes: tuple[str, ...]
    """Classes that raise events, as in the model card."""
    machines: tuple[str, ...]
    """Machines watched for faults."""


@dataclass(frozen=True)
class OutputContext:
    """What every optional output is built with, beside its own config section."""

    sensor_id: str
    state_dir: Path
    """Where an output keeps its state (e.g. what a broker has acknowledged)."""
    journal_path: Path | None = None
    """The event journal of the ZeroMQ output, to replay what an output has not delivered."""


@dataclass(frozen=True)
class Live:
    """Snapshots of the running daemon, safe to call from any thread (e.g. an HTTP server's)."""

    counters: Callable[[], dict[str, int]]
    """The `status` message's counters."""
    state: Callable[[], str]
    """The health state: running, degraded or stalled."""
    gauges: Callable[[], dict[str, float]]
    """Values beside the counters (`*_total` ones only grow)."""


class Output:
    """One output of the daemon. Every method is called from the processing thread and
    must not block it: queue, drop and count instead. Defaults do nothing."""

    name: ClassVar[str] = "output"

    def start(self, live: Live) -> None:
        """The daemon is built and about to run; `live` reads its state at any time. A
        MonitorError here (say, a port in use) stops the start, naming the config key."""

    def announce(self, catalog: Catalog) -> None:
        """What the sensor produces; again after a reload changed it."""

    def send(self, message: Message) -> None:
        """A wire message, numbered; an `Event` is already in the journal when it arrives."""

    def scored(self, inference_ms: float) -> None:
        """One detector window was scored in `inference_ms` milliseconds."""

    def poll(self, now: float) -> None:
        """Housekeeping, a few times a second (`now`: time.monotonic())."""

    def stats(self) -> dict[str, int]:
        """Monotonic counters for the `status` message, keys prefixed by the output's name."""
        return {}

    def close(self) -> None:
        """Flush what can be flushed quickly and release the output's resources."""


class ZmqOutput(Output):
    """The ZeroMQ PUB socket (with its journal): the wire contract of
    `monitor.protocol.messages`."""

    name = "publish"

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def send(self, message: Message) -> None:
        self.publisher.send(message)

    def poll(self, now: float) -> None:
        self.publisher.drain_subscriptions()

    def stats(self) -> dict[str, int]:
        publisher, journal = self.publisher, self.publisher.journal
        return {"publish_sent": publisher.sent, "publish_dropped": publisher.dropped,
                "journal_written": journal.written if journal is not None else 0,
                "journal_errors": journal.errors if journal is not None else 0}


class Composer:
    """A processor `Sink`: turns results into wire messages, converting audio time to wall
    time, and hands each to every output, in order.

    `header` numbers messages (`Publisher.next_header`: the journal reserves the numbers);
    `give_back` returns the latest number when its message cannot be encoded (a non-finite
    number: a bug upstream), which then reaches no output and is counted in
    `publish_unencodable`: a gap in `seq` only ever means a lost message.
    """

    def __init__(self, outputs: Sequence[Output], *, header: Callable[[], dict[str, Any]],
                 give_back: Callable[[int], None], sample_rate: int, top_k: int,
                 classes: tuple[str, ...], mel_bands: int, n_mels: int) -> None:
        self.outputs = tuple(outputs)
        self.header = header
        self.give_back = give_back
        self.thresholds: dict[str, float] = {}
        """Event threshold per watched class, sent beside its score (set by the daemon)."""
        self.sample_rate = sample_rate
        self.top_k = top_k
        self.classes = classes
        self.run_id = f"{int(time.time() * 1000):x}"
        self.wall_anchor: float | None = None
        """Wall time of audio sample 0; set when the first audio arrives."""
        self.events_started = 0
        self.clock_resyncs = 0
        self.output_errors = 0
        self.unencodable = 0
        edges = np.linspace(0, n_mels, min(mel_bands, n_mels) + 1).astype(int)
        self._mel_edges = edges[:-1]
        self._mel_widths = np.diff(edges)

    def anchor(self, samples: int, *, now: float, caught_up: bool) -> None:
        """Tie audio time to wall time: `samples` have been processed and the newest of them
        arrived about `now`.

        Set once at the first audio; afterwards, whenever the reader has caught up with a
        live source, re-tied if it has drifted by more than RESYNC_S. Audio time alone
        would drift: a sound card's clock runs off the system clock (100 ppm is 8.6 s a
        day), and samples dropped in an overrun are a gap audio time does not see.
        """
        candidate = now - samples / self.sample_rate
        if self.wall_anchor is None:
            self.wall_anchor = candidate
        elif caught_up and abs(candidate - self.wall_anchor) > RESYNC_S:
            self.wall_anchor = candidate
            self.clock_resyncs += 1

    def wall(self, sample: int) -> float:
        return (self.wall_anchor or 0.0) + sample / self.sample_rate

    def publish(self, cls: type, **fields: Any) -> Message:
        """Build a message of type `cls` with the next header and hand it to every output."""
        message: Message = cls(**self.header(), **fields)
        try:
            encode(message)  # what every output will need; checked once, before any has it
        except ValueError as err:
            self.unencodable += 1
            self.give_back(message.seq)
            logger.warning("unencodable %s message not sent: %s", message.TYPE, err)
            return message
        for output in self.outputs:
            try:
                output.send(message)
            except Exception:  # an output's bug must not stop detection or the others
                self.output_errors += 1
                logger.exception("output %s failed on a %s message", output.name, message.TYPE)
        return message

    def on_transition(self, transition: Transition) -> None:
        onset_s = transition.onset / self.sample_rate
        offset_s = None if transition.offset is None else transition.offset / self.sample_rate
        if transition.phase == "start":
            self.events_started += 1
        subject = transition.label if transition.machine is None else \
            f"{transition.label}-{transition.machine}"
        self.publish(
            Event, event_id=f"{self.run_id}-{subject}-{transition.event_number}",
            label=transition.label, phase=transition.phase, onset_s=round(onset_s, 4),
            offset_s=None if offset_s is None else round(offset_s, 4),
            onset_time=self.wall(transition.onset),
            offset_time=None if transition.offset is None else self.wall(transition.offset),
            peak_score=round(transition.peak_score, 4), threshold=transition.threshold,
            machine=transition.machine)
        logger.info("event %s %s at %.2f s (score %.2f)", transition.label, transition.phase,
                    offset_s if offset_s is not None else onset_s, transition.peak_score)

    def close_left_open(self, starts: Sequence[Event]) -> int:
        """Publish the `end` of events a killed run left open (`starts`, from the journal)
        with `reason: "restart"`; when they really ended is unknown, so the offsets are
        null. Returns how many. Call at start-up, before any audio is judged."""
        for start in starts:
            self.publish(Event, event_id=start.event_id, label=start.label, phase="end",
                         onset_s=start.onset_s, offset_s=None, onset_time=start.onset_time,
                         offset_time=None, peak_score=start.peak_score,
                         threshold=start.threshold, machine=start.machine, reason="restart")
            logger.warning("closed event %s (%s) left open by the previous run; when it "
                           "ended is unknown", start.event_id, start.label)
        return len(starts)

    def on_scores(self, end: int, scores: np.ndarray, inference_ms: float) -> None:
        for output in self.outputs:
            output.scored(inference_ms)
        if self.top_k == 0:
            return
        best = np.argpartition(scores, -self.top_k)[-self.top_k:] \
            if scores.shape[0] > self.top_k else np.arange(scores.shape[0])
        best = best[np.argsort(scores[best])[::-1]]
        self.publish(Scores, t_audio_s=round(end / self.sample_rate, 4),
                     top=[[self.classes[i], round(float(scores[i]), 4),
                           self.thresholds.get(self.classes[i])] for i in best])

    def on_machine(self, reading: MachineReading) -> None:
        self.publish(Anomaly, machine=reading.machine,
                     t_audio_s=round(reading.end / self.sample_rate, 4),
                     score=round(reading.score, 4), threshold=round(reading.threshold, 4),
                     running=reading.running)

    def on_level(self, end: int, meter: LevelMeter, mel_frame: np.ndarray) -> None:
        mel = np.add.reduceat(mel_frame, self._mel_edges) / self._mel_widths
        self.publish(Level, t_audio_s=round(end / self.sample_rate, 4),
                     rms_dbfs=round(meter.rms_dbfs, 2), peak_dbfs=round(meter.peak_dbfs, 2),
                     mel=[round(v, 2) for v in mel.tolist()])

    def status(self, **fields: Any) -> Status:
        """Publish a `status` heartbeat (fields as in `messages.Status`, header excluded)."""
        message = self.publish(Status, **fields)
        assert isinstance(message, Status)
        return message

    def start(self, live: Live) -> None:
        """Start every output (errors propagate: they are configuration errors)."""
        for output in self.outputs:
            output.start(live)

    def announce(self, catalog: Catalog) -> None:
        for output in self.outputs:
            try:
                output.announce(catalog)
            except Exception:
                self.output_errors += 1
                logger.exception("output %s failed to announce", output.name)

    def poll(self, now: float) -> None:
        for output in self.outputs:
            try:
                output.poll(now)
            except Exception:
                self.output_errors += 1
                logger.exception("output %s failed in poll", output.name)

    def stats(self) -> dict[str, int]:
        """Counters of the composer and of every output (merged; names do not collide)."""
        merged = {"events": self.events_started, "clock_resyncs": self.clock_resyncs,
                  "publish_unencodable": self.unencodable}
        for output in self.outputs:
            merged.update(output.stats())
        if self.output_errors:
            merged["output_errors"] = self.output_errors
        return merged

    def close(self) -> None:
        for output in self.outputs:
            try:
                output.close()
            except Exception:
                logger.exception("output %s failed to close", output.name)


def build_outputs(config: Config, context: OutputContext) -> list[Output]:
    """Every optional output whose config section is enabled, in the order of `Config`.

    A section `<key>:` with `enabled: true` is built by `monitor.outputs.<key>.build(section,
    context)`. The ZeroMQ output is not among them: it is always there, and first, since it
    numbers and journals every message.
    """
    outputs = []
    for key in config.__struct_fields__:
        section = getattr(config, key)
        if getattr(section, "enabled", None) is True:
            module = importlib.import_module(f"{__package__}.{key}")
            outputs.append(module.build(section, context))
    return outputs
