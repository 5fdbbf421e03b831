"""Typed, frozen configuration, validated once at start-up.

Every key of ``config.yaml`` maps to a field below. ``load_config`` reports the
first problem as one line naming the key path, the bad value and what is
allowed, so the CLI can print it and exit 2 without a traceback.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from monitor.errors import ConfigError

SENSOR_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"lo": lo, "hi": hi}


@dataclass(frozen=True)
class AudioConfig:
    """How audio is captured, before it reaches the front end."""

    sample_rate: int | None = field(default=None, metadata=_range(4000, 384000))
    """Rate to open the device at (Hz); null: the device's default. For stdin: the PCM rate
    (null means 16000)."""
    channels: int | None = field(default=None, metadata=_range(1, 64))
    """Channels to open (downmixed to mono); null: up to 2 from the device."""
    block_ms: float = field(default=10.0, metadata=_range(1, 200))
    """Capture block length in milliseconds."""
    ring_seconds: float = field(default=4.0, metadata=_range(0.1, 60))
    """Capacity of the lock-free ring between capture and processing, in seconds."""
    realtime: bool = True
    """For file sources: pace at real time (true) or as fast as possible (false, `--fast`)."""


@dataclass(frozen=True)
class ModelConfig:
    """The event detector: an ONNX model with its model card beside it (same name, .json)."""

    path: Path = Path("models/events.onnx")
    """ONNX file; relative paths are resolved against the config file's folder."""
    threads: int = field(default=1, metadata=_range(1, 64))
    """onnxruntime intra-op threads."""
    stride_ms: float = field(default=100.0, metadata=_range(10, 5000))
    """How often the sliding window is scored; the detection latency, not the window length."""
    top_k: int = field(default=5, metadata=_range(0, 50))
    """How many top class scores each `scores` message carries (0: none are published)."""


@dataclass(frozen=True)
class EventRule:
    """Event logic of one class. Null fields take the model card's or `events.default` value."""

    threshold: float | None = field(default=None, metadata=_range(0.0, 1.0))
    """Score at or above which a window counts as a hit."""
    release: float | None = field(default=None, metadata=_range(0.0, 1.0))
    """Score below which an active event ends (hysteresis); must be <= threshold."""
    confirm_n: int | None = field(default=None, metadata=_range(1, 100))
    """Hits needed among the last `confirm_m` windows to start an event (N-of-M)."""
    confirm_m: int | None = field(default=None, metadata=_range(1, 100))
    """Window count of the N-of-M confirmation."""
    min_duration_ms: float | None = field(default=None, metadata=_range(0, 600000))
    """An event is published only once it has lasted this long."""
    refractory_ms: float | None = field(default=None, metadata=_range(0, 3600000))
    """After an event ends, the same class cannot start again for this long."""


@dataclass(frozen=True)
class EventsConfig:
    """Which classes raise events, and how."""

    default: EventRule = EventRule(
        threshold=0.5, release=None, confirm_n=1, confirm_m=1, min_duration_ms=0.0,
        refractory_ms=1000.0,
    )
    """Values used where neither a class's rule nor the model card sets a field (release
    null: 0.8 x threshold)."""
    classes: dict[str, EventRule] = field(default_factory=dict)
    """Per-class rules, by the class name in the model card."""
    only_listed: bool = False
    """True: only classes under `classes` raise events. False: also every class the model card
    gives a default threshold."""


@dataclass(frozen=True)
class CurveConfig:
    """CURVE encryption and authentication of the daemon's sockets (keys: `audio-monitor keys`)."""

    secret_key: Path | None = None
    """This daemon's NAME.key_secret file; relative paths: against the config file's folder."""
    allowed_clients: Path | None = None
    """Folder of client public keys (NAME.key) allowed to connect; null: any CURVE client."""


@dataclass(frozen=True)
class JournalConfig:
    """The local event journal (SQLite, `state_dir/journal.db`): every event, before sending."""

    max_age_days: float = field(default=30.0, metadata=_range(0.01, 3650))
    """Events older than this are pruned."""
    max_mb: float = field(default=64.0, metadata=_range(1, 100000))
    """The oldest events are pruned once the journal grows past this size."""


@dataclass(frozen=True)
class PublishConfig:
    """The ZeroMQ PUB socket that subscribers connect to."""

    endpoint: str = "tcp://127.0.0.1:5557"
    """Where to bind: tcp://HOST:PORT or ipc:///path."""
    send_hwm: int = field(default=1000, metadata=_range(1, 1000000))
    """Messages queued per subscriber before sends are dropped (and counted)."""
    level_hz: float = field(default=10.0, metadata=_range(0, 100))
    """`level` messages per second of audio (0: none)."""
    level_mel_bands: int = field(default=32, metadata=_range(1, 256))
    """Mel bands in each `level` message's spectrum (averaged down from the front end's)."""
    status_interval_s: float = field(default=5.0, metadata=_range(0.1, 3600))
    """Heartbeat period of `status` messages."""
    catchup_endpoint: str | None = None
    """ROUTER endpoint answering "events of sensor S since seq N" from the journal; null: off."""
    curve: CurveConfig | None = None
    """CURVE settings for the PUB and catch-up sockets; null: clear text."""
    allow_insecure: bool = False
    """Allow binding a non-loopback endpoint without CURVE."""


@dataclass(frozen=True)
class MachineConfig:
    """Anomaly watch of one machine, scored against its learned baseline."""

    threshold_scale: float = field(default=1.0, metadata=_range(0.1, 10.0))
    """Multiplies the learned alarm threshold (above 1: fewer alarms)."""
    min_duration_ms: float = field(default=2000.0, metadata=_range(0, 3600000))
    """The score must stay above threshold this long before `event.machine_fault`."""
    refractory_ms: float = field(default=30000.0, metadata=_range(0, 86400000))
    """After a fault event ends, the same machine stays quiet for this long."""
    publish_hz: float = field(default=4.0, metadata=_range(0.1, 50))
    """`anomaly.<machine>` health messages per second of audio."""
    smoothing_ms: float = field(default=1000.0, metadata=_range(0, 60000))
    """Time constant of the published (smoothed) health score."""
    min_level_dbfs: float | None = field(default=None, metadata=_range(-120, 0))
    """Below this level the machine counts as off: no score, no alarm. Null: learned."""


@dataclass(frozen=True)
class Config:
    """The whole daemon configuration."""

    sensor_id: str = "sensor-1"
    """Names this sensor in every message: letters, digits, `_.-`, up to 64."""
    source: str = "mic"
    """mic | mic:NAME-OR-INDEX | file:PATH | stdin."""
    log_level: str = field(default="INFO", metadata={"choices": ("DEBUG", "INFO", "WARNING",
                                                                 "ERROR")})
    """Log level of stderr logs."""
    audio: AudioConfig = AudioConfig()
    model: ModelConfig = ModelConfig()
    events: EventsConfig = EventsConfig()
    publish: PublishConfig = PublishConfig()
    journal: JournalConfig = JournalConfig()
    state_dir: Path = Path("~/.local/state/audio-monitor")
    """Where learned machine baselines (and later the event journal) live."""
    machines: dict[str, MachineConfig] = field(default_factory=dict)
    """Machines to watch for faults, by the name given to `audio-monitor learn --machine`."""


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
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys, "
                          f"got {type(loaded).__name__}")
    return loaded


def load_config(path: Path | None, *, overrides: dict[str, Any] | None = None) -> Config:
    """Read, validate and freeze a config file; `overrides` maps dotted keys to values (CLI)."""
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        loaded = read_yaml_mapping(path, what="config file")
        data = loaded
        base = path.resolve().parent
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    config = _build(Config, data, "")
    config = _fill_event_defaults(config)
    _check_cross_fields(config)
    model_path = config.model.path if config.model.path.is_absolute() else base / config.model.path
    state_dir = config.state_dir.expanduser()
    state_dir = state_dir if state_dir.is_absolute() else base / state_dir
    curve = config.publish.curve
    if curve is not None:
        if curve.secret_key is None:
            raise ConfigError("publish.curve.secret_key: must be set when publish.curve is; "
                              "create one with `audio-monitor keys NAME`")
        curve = CurveConfig(
            secret_key=base / curve.secret_key.expanduser(),
            allowed_clients=None if curve.allowed_clients is None
            else base / curve.allowed_clients.expanduser())
        config = dataclasses.replace(config, publish=dataclasses.replace(config.publish,
                                                                          curve=curve))
    return dataclasses.replace(config, model=dataclasses.replace(config.model, path=model_path),
                               state_dir=state_dir)


def _fill_event_defaults(config: Config) -> Config:
    """Keys left out of (or null in) `events.default` keep their built-in values."""
    builtin = EventsConfig().default
    given = config.events.default
    merged = dataclasses.replace(builtin, **{f.name: getattr(given, f.name)
                                            for f in dataclasses.fields(given)
                                            if getattr(given, f.name) is not None})
    return dataclasses.replace(config, events=dataclasses.replace(config.events,
                                                                  default=merged))


def _check_cross_fields(config: Config) -> None:
    if not SENSOR_ID_PATTERN.match(config.sensor_id):
        raise ConfigError(f"sensor_id: {config.sensor_id!r} is not allowed; use letters, digits "
                          "and _.- (up to 64, starting with a letter or digit)")
    check_endpoint(config.publish.endpoint, where="publish.endpoint")
    for name in config.machines:
        if not SENSOR_ID_PATTERN.match(name):
            raise ConfigError(f"machines.{name}: machine names use letters, digits and _.- "
                              "(up to 64)")
    rules = {"events.default": config.events.default}
    rules.update({f"events.classes.{name}": rule for name, rule in config.events.classes.items()})
    for where, rule in rules.items():
        if rule.threshold is not None and rule.release is not None and \
                rule.release > rule.threshold:
            raise ConfigError(f"{where}.release: {rule.release} is above threshold "
                              f"{rule.threshold}; release must be <= threshold")
        if rule.confirm_n is not None and rule.confirm_m is not None and \
                rule.confirm_n > rule.confirm_m:
            raise ConfigError(f"{where}.confirm_n: {rule.confirm_n} is above confirm_m "
                              f"{rule.confirm_m}; N of M needs N <= M")


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             Path: "a path"}
    if tp in names:
        return names[tp]
    return getattr(tp, "__name__", str(tp))


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value."""
    label = where or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        allowed = ", ".join(fields)
        raise ConfigError(f"{_join(where, str(unknown[0]))}: unknown key; allowed keys here: "
                          f"{allowed}")
    values = {name: _convert(hints[name], data[name], _join(where, name), fields[name].metadata)
              for name in fields if name in data}
    return cls(**values)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(tp: Any, value: Any, where: str, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where, meta)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)  # type: ignore[arg-type]
    if origin is dict:
        _, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of class name to rule, got {value!r}")
        return {str(k): _convert(value_type, {} if v is None else v, f"{where}.{k}", {})
                for k, v in value.items()}
    if value is None:
        raise ConfigError(f"{where}: must not be null; expected {_type_name(tp)}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} is not true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {value!r} is not an integer")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: {value!r} is not a number")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {value!r} is not a non-empty string")
    elif tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {value!r} is not a path")
        return Path(value).expanduser()
    lo, hi = meta.get("lo"), meta.get("hi")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{where}: {value!r} is out of range; allowed {lo} to {hi}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not allowed; choose one of "
                          f"{', '.join(choices)}")
    return value
