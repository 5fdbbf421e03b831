"""Typed, frozen configuration, validated once at start-up.

Every key of ``config.yaml`` maps to a field below; each section is a `monitor.protocol.schema`
Struct, so types, ranges, finiteness (no NaN or infinity), choices and unknown keys are
checked by msgspec. ``load_config`` reports the first problem as one line naming the key
path, the bad value and what is allowed, so the CLI can print it and exit 2 without a
traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from msgspec import Meta, field
from msgspec.structs import replace

from monitor.errors import ConfigError
from monitor.protocol.schema import PATTERN_HINTS, Endpoint, SensorId, Strict, convert


def _range(lo: float, hi: float) -> Meta:
    return Meta(ge=lo, le=hi)


class AudioConfig(Strict, frozen=True):
    """How audio is captured, before it reaches the front end."""

    sample_rate: Annotated[int, _range(4000, 384000)] | None = None
    """Rate to open the device at (Hz); null: the device's default. For stdin: the PCM rate
    (null means 16000)."""
    channels: Annotated[int, _range(1, 64)] | None = None
    """Channels to open (downmixed to mono); null: up to 2 from the device."""
    block_ms: Annotated[float, _range(1, 200)] = 10.0
    """Capture block length in milliseconds."""
    ring_seconds: Annotated[float, _range(0.1, 60)] = 4.0
    """Capacity of the lock-free ring between capture and processing, in seconds."""
    realtime: bool = True
    """For file sources: pace at real time (true) or as fast as possible (false, `--fast`)."""


class ModelConfig(Strict, frozen=True):
    """The event detector: an ONNX model with its model card beside it (same name, .json)."""

    path: Path = Path("models/events.onnx")
    """ONNX file; a relative path is resolved against the config file's folder (without a
    config file, the working folder). Left out: the shipped model, from any folder."""
    threads: Annotated[int, _range(1, 64)] = 1
    """onnxruntime intra-op threads."""
    stride_ms: Annotated[float, _range(10, 5000)] = 100.0
    """How often the sliding window is scored; the detection latency, not the window length."""
    top_k: Annotated[int, _range(0, 50)] = 5
    """How many top class scores each `scores` message carries (0: none are published)."""


class EventRule(Strict, frozen=True):
    """Event logic of one class. Null fields take the model card's or `events.default` value."""

    threshold: Annotated[float, _range(0.0, 1.0)] | None = None
    """Score at or above which a window counts as a hit."""
    release: Annotated[float, _range(0.0, 1.0)] | None = None
    """Score below which an active event ends (hysteresis); must be <= threshold."""
    confirm_n: Annotated[int, _range(1, 100)] | None = None
    """Hits needed among the last `confirm_m` windows to start an event (N-of-M)."""
    confirm_m: Annotated[int, _range(1, 100)] | None = None
    """Window count of the N-of-M confirmation."""
    min_duration_ms: Annotated[float, _range(0, 600000)] | None = None
    """An event is published only once it has lasted this long."""
    refractory_ms: Annotated[float, _range(0, 3600000)] | None = None
    """After an event ends, the same class cannot start again for this long."""

    def __post_init__(self) -> None:
        if self.threshold is not None and self.release is not None and \
                self.release > self.threshold:
            raise ValueError(f"release {self.release} is above threshold {self.threshold}; "
                             "release must be <= threshold")
        if self.confirm_n is not None and self.confirm_m is not None and \
                self.confirm_n > self.confirm_m:
            raise ValueError(f"confirm_n {self.confirm_n} is above confirm_m "
                             f"{self.confirm_m}; N of M needs N <= M")


class EventsConfig(Strict, frozen=True):
    """Which classes raise events, and how."""

    default: EventRule = EventRule(
        threshold=0.5, release=None, confirm_n=1, confirm_m=1, min_duration_ms=0.0,
        refractory_ms=1000.0,
    )
    """Values used where neither a class's rule nor the model card sets a field (release
    null: 0.8 x threshold)."""
    classes: dict[Annotated[str, Meta(min_length=1, max_length=200)], EventRule] = \
        field(default_factory=dict)
    """Per-class rules, by the class name in the model card."""
    only_listed: bool = False
    """True: only classes under `classes` raise events. False: also every class the model card
    gives a default threshold."""


class CurveConfig(Strict, frozen=True):
    """CURVE encryption and authentication of the daemon's sockets (keys: `audio-monitor keys`)."""

    secret_key: Path | None = None
    """This daemon's NAME.key_secret file; relative paths: against the config file's folder."""
    allowed_clients: Path | None = None
    """Folder of client public keys (NAME.key) allowed to connect; null: any CURVE client."""


class JournalConfig(Strict, frozen=True):
    """The local event journal (SQLite, `state_dir/journal.db`): every event, before sending."""

    max_age_days: Annotated[float, _range(0.01, 3650)] = 30.0
    """Events older than this are pruned."""
    max_mb: Annotated[float, _range(1, 100000)] = 64.0
    """The oldest events are pruned once the journal grows past this size."""


class PublishConfig(Strict, frozen=True):
    """The ZeroMQ PUB socket that subscribers connect to."""

    endpoint: Endpoint = "tcp://127.0.0.1:5557"
    """Where to bind: tcp://HOST:PORT or ipc:///path."""
    send_hwm: Annotated[int, _range(1, 1000000)] = 1000
    """Messages queued per subscriber before sends are dropped (and counted)."""
    level_hz: Annotated[float, _range(0, 100)] = 10.0
    """`level` messages per second of audio (0: none)."""
    level_mel_bands: Annotated[int, _range(1, 256)] = 32
    """Mel bands in each `level` message's spectrum (averaged down from the front end's)."""
    status_interval_s: Annotated[float, _range(0.1, 3600)] = 5.0
    """Heartbeat period of `status` messages."""
    catchup_endpoint: Endpoint | None = None
    """ROUTER endpoint answering "events of sensor S since seq N" from the journal; null: off."""
    curve: CurveConfig | None = None
    """CURVE settings for the PUB and catch-up sockets; null: clear text."""
    allow_insecure: bool = False
    """Allow binding a non-loopback endpoint without CURVE."""


class MqttTlsConfig(Strict, frozen=True):
    """TLS to the broker; every file null: the system's CA certificates, no client cert."""

    ca_file: Path | None = None
    """CA certificate(s) that signed the broker's certificate (PEM)."""
    cert_file: Path | None = None
    """Client certificate (PEM), for brokers that authenticate clients by certificate."""
    key_file: Path | None = None
    """The client certificate's private key (PEM)."""


TOPIC_PREFIX_PATTERN = r"^[^#+\x00]*[^#+/\x00][^#+\x00]*$"
PATTERN_HINTS[TOPIC_PREFIX_PATTERN] = "an MQTT topic prefix: not empty, without # or +"
TopicPrefix = Annotated[str, Meta(pattern=TOPIC_PREFIX_PATTERN, max_length=200)]


class MqttConfig(Strict, frozen=True):
    """The MQTT output (Home Assistant, Node-RED, plant systems); off unless `enabled`."""

    enabled: bool = False
    host: Annotated[str, Meta(min_length=1, max_length=253)] = "127.0.0.1"
    """Broker host name or address."""
    port: Annotated[int, _range(1, 65535)] = 1883
    client_id: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    """MQTT client id; null: audio-monitor-<sensor_id>."""
    topic_prefix: TopicPrefix = "audio-monitor"
    """Topics are <topic_prefix>/<sensor_id>/..."""
    keepalive_s: Annotated[int, _range(5, 3600)] = 30
    username_file: Path | None = None
    """File holding the user name (relative paths: against the config file's folder)."""
    password_file: Path | None = None
    """File holding the password."""
    tls: MqttTlsConfig | None = None
    """TLS settings; null: plain TCP (keep it on a trusted network)."""
    level_hz: Annotated[float, _range(0, 10)] = 1.0
    """`level` and `anomaly` messages per second of audio (0: none)."""
    scores_hz: Annotated[float, _range(0, 10)] = 0.0
    """`scores` messages per second of audio (0: none)."""
    discovery: bool = True
    """Announce entities for Home Assistant MQTT discovery (retained config topics)."""
    discovery_prefix: TopicPrefix = "homeassistant"
    reconnect_min_s: Annotated[int, _range(1, 3600)] = 1
    """First reconnect delay; doubles per failed attempt up to `reconnect_max_s`."""
    reconnect_max_s: Annotated[int, _range(1, 3600)] = 60
    queue_max: Annotated[int, _range(10, 10000000)] = 10000
    """Event messages held in memory while the broker is away (beyond it: from the journal
    at the next start)."""

    def __post_init__(self) -> None:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(f"reconnect_min_s {self.reconnect_min_s} is above "
                             f"reconnect_max_s {self.reconnect_max_s}")

    def resolved(self, base: Path) -> MqttConfig:
        """The same settings with relative file paths resolved against `base`."""
        def at(path: Path | None) -> Path | None:
            return None if path is None else base / path.expanduser()

        tls = self.tls if self.tls is None else MqttTlsConfig(
            ca_file=at(self.tls.ca_file), cert_file=at(self.tls.cert_file),
            key_file=at(self.tls.key_file))
        return replace(self, username_file=at(self.username_file),
                       password_file=at(self.password_file), tls=tls)


LISTEN_ADDRESS_PATTERN = r"^(?:\[[0-9a-fA-F:.]+\]|[^:\[\]\s]*):\d{1,5}$"
PATTERN_HINTS[LISTEN_ADDRESS_PATTERN] = ("ADDR:PORT (e.g. 127.0.0.1:9108, :9108 for loopback, "
                                         "[::1]:9108, 0.0.0.0:9108)")


class MetricsConfig(Strict, frozen=True):
    """Prometheus metrics over HTTP at /metrics; off unless `enabled` (`run --metrics ADDR:PORT`
    turns them on at that address)."""

    enabled: bool = False
    address: Annotated[str, Meta(pattern=LISTEN_ADDRESS_PATTERN)] = "127.0.0.1:9108"
    """Where to listen; ':PORT' is loopback, port 0 picks a free one."""


class MachineConfig(Strict, frozen=True):
    """Anomaly watch of one machine, scored against its learned baseline."""

    threshold_scale: Annotated[float, _range(0.1, 10.0)] = 1.0
    """Multiplies the learned alarm threshold (above 1: fewer alarms)."""
    min_duration_ms: Annotated[float, _range(0, 3600000)] = 2000.0
    """The score must stay above threshold this long before `event.machine_fault`."""
    refractory_ms: Annotated[float, _range(0, 86400000)] = 30000.0
    """After a fault event ends, the same machine stays quiet for this long."""
    publish_hz: Annotated[float, _range(0.1, 50)] = 4.0
    """`anomaly.<machine>` health messages per second of audio."""
    smoothing_ms: Annotated[float, _range(0, 60000)] = 1000.0
    """Time constant of the published (smoothed) health score."""
    min_level_dbfs: Annotated[float, _range(-120, 0)] | None = None
    """Below this level the machine counts as off: no score, no alarm. Null: learned."""


class Config(Strict, frozen=True):
    """The whole daemon configuration."""

    sensor_id: SensorId = "sensor-1"
    """Names this sensor in every message: letters, digits, `_.-`, up to 64."""
    source: Annotated[str, Meta(min_length=1)] = "mic"
    """mic | mic:NAME-OR-INDEX | file:PATH | stdin."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of stderr logs."""
    audio: AudioConfig = field(default_factory=AudioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    state_dir: Path = Path("~/.local/state/audio-monitor")
    """Where learned machine baselines (and later the event journal) live."""
    machines: dict[SensorId, MachineConfig] = field(default_factory=dict)
    """Machines to watch for faults, by the name given to `audio-monitor learn --machine`."""


MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
"""The shipped models and their cards (`fetch-models` builds them here)."""
DATA_ENV = "AUDIO_MONITOR_DATA"


def data_dir() -> Path:
    """The folder of real recordings (training, evaluation, the demo, benchmarks, tests):
    $AUDIO_MONITOR_DATA, else `../shared/data` beside this checkout."""
    return Path(os.environ.get(DATA_ENV, MODELS_DIR.parent.parent / "shared" / "data"))


ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")


def check_endpoint(endpoint: str, *, where: str) -> None:
    """ConfigError unless `endpoint` is a ZeroMQ endpoint this project binds or connects."""
    if not endpoint.startswith(ENDPOINT_SCHEMES):
        raise ConfigError(f"{where}: {endpoint!r} is not a ZeroMQ endpoint; use "
                          "tcp://HOST:PORT or ipc:///path")


def read_yaml_mapping(path: Path, *, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (empty file: {}); one-line ConfigError if not."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start})") from err
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}") from err
    except RecursionError as err:  # PyYAML composes nested nodes recursively
        raise ConfigError(f"{what} {path} nests too deep") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys, "
                          f"got {type(loaded).__name__}")
    return loaded


def load_config(path: Path | None, *, overrides: dict[str, Any] | None = None) -> Config:
    """Read, validate and freeze a config file; `overrides` maps dotted keys to values (CLI).

    Raises ConfigError (one line: key path, value, what is allowed).
    """
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        data = read_yaml_mapping(path, what="config file")
        base = path.resolve().parent
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    classes = data.get("events", {}).get("classes") if isinstance(data.get("events"), dict) \
        else None
    if isinstance(classes, dict):  # `Cough:` with nothing under it: a rule of defaults
        classes.update({k: {} for k, v in classes.items() if v is None})
    config = convert(data, Config, error=ConfigError)
    config = _fill_event_defaults(config)
    model_base = base
    if not isinstance(data.get("model"), dict) or "path" not in data["model"]:
        model_base = MODELS_DIR.parent  # left out: the shipped model, from any folder
    model_path = (config.model.path if config.model.path.is_absolute()
                  else model_base / config.model.path)
    state_dir = config.state_dir.expanduser()
    state_dir = state_dir if state_dir.is_absolute() else base / state_dir
    curve = config.publish.curve
    if curve is not None:
        if curve.secret_key is None:
            raise ConfigError("$.publish.curve.secret_key: must be set when publish.curve is; "
                              "create one with `audio-monitor keys NAME`")
        curve = CurveConfig(
            secret_key=base / curve.secret_key.expanduser(),
            allowed_clients=None if curve.allowed_clients is None
            else base / curve.allowed_clients.expanduser())
        config = replace(config, publish=replace(config.publish, curve=curve))
    return replace(config, model=replace(config.model, path=model_path), state_dir=state_dir,
                   mqtt=config.mqtt.resolved(base))


def _fill_event_defaults(config: Config) -> Config:
    """Keys left out of (or null in) `events.default` keep their built-in values."""
    builtin = EventsConfig().default
    given = config.events.default
    merged = replace(builtin, **{name: getattr(given, name) for name in given.__struct_fields__
                                 if getattr(given, name) is not None})
    return replace(config, events=replace(config.events, default=merged))

