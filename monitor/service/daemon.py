"""The live daemon: composes a source, the processor and the publisher, and runs the loop.

Threads: the source's capture thread (PortAudio callback or a reader thread) is the
ring's only writer; the thread that calls `Daemon.run` is its only reader, and it
owns the ZeroMQ socket. Between them there is no lock, only the SPSC ring.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from monitor.capture.sources import FileSource, Source, StdinSource, parse_source
from monitor.config import Config
from monitor.detect.detector import Detector
from monitor.errors import DeviceAbsentError, MonitorError
from monitor.outputs.composer import Catalog, Composer, Output, ZmqOutput
from monitor.outputs.publisher import Publisher
from monitor.pipeline.processor import Processor
from monitor.pipeline.rules import resolve_rules
from monitor.protocol.messages import Status
from monitor.service.sdnotify import Notifier
from monitor.service.watchdog import Health, Progress

logger = logging.getLogger(__name__)

READ_BLOCK_FRAMES = 4096
POLL_INTERVAL_S = 0.1
DEFAULT_STDIN_RATE = 16000
STALL_S = 5.0  # a stage without progress this long stops the watchdog pings
DRAIN_S = 2.0  # on stop: at most this long processing audio already captured
COUNTERS = ("samples", "frames", "windows", "events", "events_suppressed", "overrun_samples",
            "overrun_events", "callbacks", "input_overflow", "input_underflow",
            "source_errors", "reconnects", "nonfinite_samples", "clipped_samples",
            "levels_clamped", "publish_sent", "publish_dropped", "publish_unencodable",
            "clock_resyncs", "journal_written", "journal_errors")
"""Counters every `status` message carries (README, "Wire contract")."""


def build_source(config: Config) -> Source:
    """The source named by `config.source`; raises a one-line MonitorError if it cannot."""
    kind, arg = parse_source(config.source)
    audio = config.audio
    if kind == "file":
        assert arg is not None
        return FileSource(Path(arg), realtime=audio.realtime, ring_seconds=audio.ring_seconds,
                          block_ms=audio.block_ms)
    if kind == "stdin":
        return StdinSource(sample_rate=audio.sample_rate or DEFAULT_STDIN_RATE,
                           channels=audio.channels or 1, ring_seconds=audio.ring_seconds,
                           block_ms=audio.block_ms)
    from monitor.capture.mic import MicSource  # PortAudio is loaded for a microphone only

    device: str | int | None = arg
    if arg is not None and arg.isdigit():
        device = int(arg)
    return MicSource(device, sample_rate=audio.sample_rate, channels=audio.channels,
                     ring_seconds=audio.ring_seconds, block_ms=audio.block_ms)


DEVICE_BACKOFF_FIRST_S = 0.5
DEVICE_BACKOFF_MAX_S = 30.0


def wait_for_source(config: Config, *, stop: threading.Event, publisher: Publisher,
                    notifier: Notifier | None = None,
                    clock: Callable[[], float] = time.monotonic) -> Source | None:
    """`build_source`, waiting for a microphone that is absent (not yet enumerated).

    While it waits: `READY=1` with `STATUS=degraded: ...`, watchdog pings, and `status`
    messages with state `degraded` and `last_error` naming the device; retries with
    backoff 0.5 s doubling to 30 s. Returns None if `stop` is set meanwhile. Any other
    MonitorError (a configuration error) is raised at once.
    """
    notifier = notifier or Notifier.from_env()
    backoff, attempts, started = DEVICE_BACKOFF_FIRST_S, 0, clock()
    while True:
        try:
            return build_source(config)
        except DeviceAbsentError as err:
            attempts += 1
            text = f"waiting for the input device ({config.source}): {err}"
            if attempts == 1:
                logger.warning("%s; retrying with backoff up to %.0f s", text,
                               DEVICE_BACKOFF_MAX_S)
                notifier.ready(f"degraded: {text}")
            notifier.status(f"degraded: {text}")
            publisher.publish(Status, state="degraded", source=config.source,
                              uptime_s=round(clock() - started, 3), t_audio_s=0.0,
                              counters={"device_waits": attempts}, inference_ms_p50=0.0,
                              inference_ms_max=0.0, dc_offset=0.0, last_error=text)
            deadline = clock() + backoff
            interval = notifier.ping_interval_s or backoff
            while not stop.is_set() and clock() < deadline:
                notifier.watchdog()
                stop.wait(min(interval, max(0.0, deadline - clock())))
            if stop.is_set():
                return None
            backoff = min(backoff * 2.0, DEVICE_BACKOFF_MAX_S)
            from monitor.capture.mic import rescan_devices

            rescan_devices()


class Daemon:
    """Runs one source through the processor and hands what it finds to the outputs: the
    ZeroMQ `publisher` (it numbers every message and journals events) first, then
    `outputs` (MQTT, metrics, ...) in order."""

    def __init__(self, config: Config, *, source: Source, detector: Detector,
                 publisher: Publisher, outputs: Sequence[Output] = ()) -> None:
        self.config = config
        self.source = source
        self.publisher = publisher
        card = detector.card
        self.sink = Composer([ZmqOutput(publisher), *outputs], header=publisher.next_header,
                             give_back=publisher.give_back,
                             sample_rate=card.frontend.sample_rate,
                             top_k=min(config.model.top_k, len(card.classes)),
                             classes=card.classes, mel_bands=config.publish.level_mel_bands,
                             n_mels=card.frontend.n_mels)
        self.processor = Processor.from_config(
            config, detector, in_rate=source.sample_rate, channels=source.channels,
            max_block=READ_BLOCK_FRAMES, sink=self.sink)
        self.sink.thresholds = {name: rule.threshold
                                for name, rule in self.processor.rules.items()}
        self._announce()
        self._raw = np.zeros(READ_BLOCK_FRAMES * source.channels, dtype=np.float32)
        self.processor.warm_up()
        self._started = time.monotonic()
        self._samples_at_status = -1
        self._journal_generation = 0
        self.health = Health(Notifier.from_env(), stall_s=STALL_S,
                             capture_may_idle=source.live)
        self.reloader: Callable[[], Config] | None = None
        """Re-reads the configuration on SIGHUP (set by the CLI)."""
        self.reload_requested = threading.Event()
        self.processing_s = 0.0
        self.restart_required = False
        """Set when the source can only recover in a new process (see MicSource)."""

    def run(self, stop: threading.Event) -> None:
        """Process until `stop` is set or a finite source is exhausted."""
        source, ring, processor = self.source, self.source.ring, self.processor
        live = source.live  # a file's audio time is its own clock
        status_every = self.config.publish.status_interval_s
        self.sink.close_left_open(self.publisher.open_events())  # before new audio is judged
        journal = self.publisher.journal
        self._journal_generation = 0 if journal is None else journal.generation
        self.source.start()
        self.publish_status("running")
        self.health.ready(self._describe())
        next_status = time.monotonic() + status_every
        next_poll = time.monotonic() + POLL_INTERVAL_S
        try:
            while not stop.is_set():
                n = ring.readinto(self._raw, multiple_of=source.channels)
                if n:
                    if self.sink.wall_anchor is None:
                        self.sink.anchor(0, now=time.time(), caught_up=False)
                    began = time.perf_counter()
                    processor.process(self._raw[:n])
                    self.processing_s += time.perf_counter() - began
                    if live:
                        self.sink.anchor(processor.samples, now=time.time(),
                                         caught_up=ring.available() <= self._raw.shape[0] // 4)
                elif source.exhausted and ring.available() == 0:
                    break
                now = time.monotonic()
                if now >= next_poll:
                    source.poll(now)
                    next_poll = now + POLL_INTERVAL_S
                    if source.needs_restart:
                        self.restart_required = True
                        logger.error("%s; only a new process can recover the device: exiting "
                                     "for the service manager to restart", source.last_error)
                        break
                    if self.reload_requested.is_set():
                        self.reload()
                    self.health.tick(now, self._progress(), self._describe)
                if now >= next_status:
                    self.sink.poll(now)
                    self._close_left_open_late()
                    self.publish_status(self._state())
                    next_status = now + status_every
                if not source.exhausted:  # sleep until the next result's audio has landed
                    ring.wait_for(processor.frames_until_output() * source.channels,
                                  timeout=min(next_poll, next_status) - now)
        finally:
            self.health.stopping(f"stopping: {self._describe()}")
            if not self.restart_required:  # stopping a dead PortAudio stream would hang
                source.stop()
            if stop.is_set():
                self._drain()
            processor.finish()
            self.publish_status("stopped")

    def _drain(self) -> None:
        """Process what the source captured before it stopped (at most DRAIN_S), so events
        in that audio are still published."""
        ring, channels = self.source.ring, self.source.channels
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            n = ring.readinto(self._raw, multiple_of=channels)
            if not n:
                return
            self.processor.process(self._raw[:n])
        logger.warning("stopped draining after %.1f s; %d samples left unprocessed", DRAIN_S,
                       ring.available())

    def reload(self) -> bool:
        """SIGHUP: re-read the config and swap in new event rules between two blocks.

        Only `events` and `log_level` change live; other changed keys need a restart
        (logged). Events active at the swap are ended first, so every start has an end.
        A bad config is refused with one logged line and the running rules stay.
        """
        self.reload_requested.clear()
        if self.reloader is None:
            return False
        self.health.reloading()
        processor = self.processor
        try:
            config = self.reloader()
            rules = resolve_rules(config, processor.detector, processor.timing)
        except Exception as err:  # a reload must never end the daemon
            text = str(err) if isinstance(err, MonitorError) else f"{type(err).__name__}: {err}"
            logger.error("reload refused, keeping the running rules: %s", text)
            self.health.reloaded(self._describe())
            return False
        # The audio goes on: a candidate short of min_duration is dropped, not decided.
        for transition in processor.events.flush(processor.samples, decide_pending=False):
            processor.sink.on_transition(transition)
        processor.set_rules(rules)
        self.sink.thresholds = {name: rule.threshold for name, rule in rules.items()}
        self._announce()
        restart = [key for key in ("source", "sensor_id", "audio", "model", "publish")
                   if getattr(config, key) != getattr(self.config, key)]
        if restart:
            logger.warning("reload: %s changed; that takes a restart", ", ".join(restart))
        logging.getLogger("monitor").setLevel(config.log_level)
        self.config = config
        logger.info("reloaded: %d event rules", len(rules))
        self.health.reloaded(self._describe())
        return True

    def _announce(self) -> None:
        self.sink.announce(Catalog(model=self.processor.detector.card.name,
                                   classes=tuple(self.processor.rules),
                                   machines=tuple(s.machine for s in self.processor.machines)))

    def _progress(self) -> Progress:
        source, ring, publisher = self.source, self.source.ring, self.publisher
        return Progress(captured=source.counters.callbacks, capture_done=source.exhausted,
                        backlog=ring.available(), ring_capacity=ring.capacity,
                        processed=self.processor.samples, sent=publisher.sent,
                        attempts=publisher.sent + publisher.dropped)

    def _describe(self) -> str:
        """One line for systemd's STATUS=."""
        processor, counters = self.processor, self.source.counters
        line = (f"{processor.samples / processor.timing.sample_rate:.0f} s audio, "
                f"{self.sink.events_started} events, {self.source.ring.overrun_events} overruns,"
                f" {counters.reconnects} reconnects")
        if self.source.last_error:
            line += f"; last error: {self.source.last_error}"
        return line

    def gauges(self) -> dict[str, float]:
        """Values beside `counters()` for metrics; `*_seconds_total` ones only grow."""
        return {
            "uptime_seconds": time.monotonic() - self._started,
            "audio_seconds": self.processor.samples / self.processor.timing.sample_rate,
            "processing_seconds_total": self.processing_s,
            "ring_backlog_samples": float(self.source.ring.available()),
            "dc_offset": self.processor.meter.dc_offset,
            "watchdog_pings_total": float(self.health.pings),
        }

    def _state(self) -> str:
        flowing = self.processor.samples != self._samples_at_status
        self._samples_at_status = self.processor.samples
        if self._journal_error() is not None:
            return "degraded"
        return "running" if flowing or self.source.exhausted else "degraded"

    def _close_left_open_late(self) -> None:
        """A journal that opened only after start (it could not be opened then) may hold
        events a killed run left open: end them as a start would. This run's own events
        (its `run_id`) are not among them."""
        journal = self.publisher.journal
        if journal is None or journal.generation == self._journal_generation:
            return
        self._journal_generation = journal.generation
        mine = f"{self.sink.run_id}-"
        self.sink.close_left_open([start for start in self.publisher.open_events()
                                   if not start.event_id.startswith(mine)])

    def _journal_error(self) -> str | None:
        journal = self.publisher.journal
        return None if journal is None else journal.last_error

    def counters(self) -> dict[str, int]:
        """The `status` message's counters: snapshots of the chain, the source and the
        outputs, merged in the order of `COUNTERS` (counters of optional outputs last)."""
        merged = {**self.processor.stats(), **self.source.stats(), **self.sink.stats()}
        return {**{key: merged.pop(key) for key in COUNTERS}, **merged}

    def publish_status(self, state: str) -> None:
        p50, worst = self.processor.inference_stats()
        self.sink.status(
            state=state, source=self.source.description,
            uptime_s=round(time.monotonic() - self._started, 3),
            t_audio_s=round(self.processor.samples / self.processor.timing.sample_rate, 4),
            counters=self.counters(), inference_ms_p50=round(p50, 3),
            inference_ms_max=round(worst, 3), dc_offset=round(self.processor.meter.dc_offset, 5),
            last_error=self.source.last_error or self._journal_error())

