"""Prometheus metrics over HTTP (config `metrics:`, or `run --metrics ADDR:PORT`; off by
default).

Nothing is counted twice: the daemon's own counters (the ones in `status` messages)
are read when Prometheus scrapes, by a collector running in the HTTP server's thread.
Reading ints another thread writes is safe in CPython; a scrape may see counters a
few microseconds apart, which Prometheus tolerates. Only what the counters lack is
recorded as it happens (events by class, inference latency per scored window), by
`MetricsOutput`, an output of the daemon like any other.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from monitor.config import MetricsConfig
from monitor.errors import ConfigError
from monitor.outputs.composer import Live, Output, OutputContext
from monitor.protocol.messages import Event, Message

logger = logging.getLogger(__name__)

__all__ = ["MetricsOutput", "build", "parse_address"]

PREFIX = "audio_monitor"
INFERENCE_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)

# Status counter -> (metric name without _total, help). Counters not listed here (added
# to the status message later) are exported as audio_monitor_<name>_total.
COUNTERS: dict[str, tuple[str, str]] = {
    "samples": ("samples", "Audio samples processed, at the front-end rate"),
    "frames": ("frames", "Log-mel frames computed"),
    "windows": ("windows", "Detector windows scored"),
    "events_suppressed": ("events_suppressed", "Events held back by refractory or duration"),
    "overrun_samples": ("overrun_samples", "Samples lost because the ring was full"),
    "overrun_events": ("overruns", "Times the ring overran"),
    "callbacks": ("capture_blocks", "Blocks delivered by the source (callbacks or reads)"),
    "input_overflow": ("input_overflows", "Blocks PortAudio flagged as input overflow"),
    "input_underflow": ("input_underflows", "Blocks PortAudio flagged as input underflow"),
    "source_errors": ("source_errors", "Run-time source failures (stream died, read error)"),
    "reconnects": ("device_reconnects", "Successful microphone reopens after a failure"),
    "nonfinite_samples": ("nonfinite_samples", "NaN/Inf samples replaced by 0"),
    "clipped_samples": ("clipped_samples", "Samples at or beyond full scale"),
    "publish_sent": ("published", "Messages handed to ZeroMQ"),
    "publish_dropped": ("publish_dropped", "Messages ZeroMQ refused (not sent)"),
    "publish_unencodable": ("publish_unencodable",
                            "Messages that could not be encoded (not sent; no seq used)"),
    "levels_clamped": ("levels_clamped", "Level values (dBFS) clamped into -120..+120"),
}
SKIPPED = {"events"}  # exported per class by MetricsOutput instead
STATES = ("running", "degraded", "stalled")
_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})$")


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT' (loopback) or '[V6]:PORT' -> (host, port); port 0 picks one."""
    match = _ADDRESS.match(text.strip())
    port = int(match["port"]) if match else -1
    if match is None or not 0 <= port <= 65535:
        raise ConfigError(f"$.metrics.address: {text!r} is not ADDR:PORT (e.g. 127.0.0.1:9108, "
                          ":9108, [::1]:9108, 0.0.0.0:9108)")
    host = match["v6"] or match["host"] or "127.0.0.1"
    return host, port


class _DaemonCollector(Collector):
    """Reads the daemon's counters at scrape time."""

    def __init__(self, counters: Callable[[], dict[str, int]], state: Callable[[], str],
                 gauges: Callable[[], dict[str, float]]) -> None:
        self._counters = counters
        self._state = state
        self._gauges = gauges

    def collect(self) -> Iterator[Any]:
        for key, value in self._counters().items():
            if key in SKIPPED:
                continue
            name, doc = COUNTERS.get(key, (key, f"Status counter {key}"))
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        for key, number in self._gauges().items():
            if key.endswith("_total"):
                yield CounterMetricFamily(f"{PREFIX}_{key[:-6]}", key.replace("_", " "),
                                          value=number)
            else:
                yield GaugeMetricFamily(f"{PREFIX}_{key}", key.replace("_", " "), value=number)
        state = self._state()
        family = GaugeMetricFamily(f"{PREFIX}_state", "1 for the current health state",
                                   labels=["state"])
        for name in STATES:
            family.add_metric([name], 1.0 if name == state else 0.0)
        yield family


def build(settings: MetricsConfig, context: OutputContext) -> MetricsOutput:
    """The `metrics:` output (`monitor.outputs.composer.build_outputs`)."""
    return MetricsOutput(parse_address(settings.address))


class MetricsOutput(Output):
    """A private registry served over HTTP by prometheus_client's server thread (from
    `start`): the daemon's counters read at scrape time, events counted by class and the
    inference latency of every scored window observed as they happen."""

    name = "metrics"

    def __init__(self, address: tuple[str, int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._events = Counter(f"{PREFIX}_events", "Events started, by class", ["class"],
                               registry=self.registry)
        self._inference = Histogram(f"{PREFIX}_inference_seconds",
                                    "Detector inference time per scored window",
                                    buckets=INFERENCE_BUCKETS_S, registry=self.registry)
        self._listen = address
        self._server: Any = None
        self.address: tuple[str, int] | None = None
        """The bound (host, port), once started."""

    def start(self, live: Live) -> None:
        """Read `live` at every scrape and serve /metrics. ConfigError if it cannot bind."""
        self.registry.register(_DaemonCollector(live.counters, live.state, live.gauges))
        host, port = self._listen
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise ConfigError(f"$.metrics.address: cannot listen on {host}:{port}: "
                              f"{err.strerror}; pick a free port") from err
        self._server = server
        self.address = (host, int(server.server_port))
        logger.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]",
                    self.address[1])

    def send(self, message: Message) -> None:
        if isinstance(message, Event) and message.phase == "start":
            self._events.labels(message.label).inc()

    def scored(self, inference_ms: float) -> None:
        self._inference.observe(inference_ms / 1000.0)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
