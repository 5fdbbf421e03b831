"""Config validation: every user mistake is one line naming the key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.config import Config, load_config
from monitor.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid_and_frozen() -> None:
    config = load_config(REPO / "config.yaml")
    assert config.model.path == REPO / "models" / "events.onnx"
    assert config.publish.endpoint.startswith("tcp://127.0.0.1")
    with pytest.raises(AttributeError):
        config.sensor_id = "other"  # type: ignore[misc]


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    from monitor.config import MODELS_DIR

    config = load_config(write(tmp_path, ""))
    assert config.audio == Config().audio
    assert config.model.path == MODELS_DIR / "events.onnx"


@pytest.mark.parametrize(("text", "expected"), [
    ("sensr_id: x\n", "$.sensr_id: unknown key; allowed keys here: sensor_id"),
    ("audio:\n  blok_ms: 5\n", "$.audio.blok_ms: unknown key"),
    ("audio:\n  block_ms: fast\n", "$.audio.block_ms: 'fast': expected `float`, got `str`"),
    ("audio:\n  block_ms: 0.5\n", "$.audio.block_ms: 0.5: expected `float` >= 1.0"),
    ("model:\n  threads: 1.5\n", "$.model.threads: 1.5: expected `int`, got `float`"),
    ("audio:\n  realtime: 1\n", "$.audio.realtime: 1: expected `bool`, got `int`"),
    ("log_level: LOUD\n", "$.log_level: 'LOUD': invalid enum value 'LOUD'; choose one of DEBUG"),
    ("sensor_id: 'bad id!'\n", "$.sensor_id: 'bad id!': expected letters, digits and _.-"),
    ("events:\n  classes:\n    Cough:\n      threshold: 1.5\n",
     "$.events.classes.Cough.threshold: 1.5: expected `float` <= 1.0"),
    ("events:\n  classes:\n    Cough:\n      threshold: 0.3\n      release: 0.5\n",
     "$.events.classes.Cough: release 0.5 is above threshold 0.3"),
    ("events:\n  default:\n    confirm_n: 3\n    confirm_m: 2\n",
     "$.events.default: confirm_n 3 is above confirm_m 2"),
    ("publish: 5\n", "$.publish: 5: expected `object`, got `int`"),
    ("- a\n- b\n", "must hold a mapping of keys, got list"),
    ("audio: [\n", "is not valid YAML at line"),
    # NaN and infinity fail every range (they used to pass, or crash start-up).
    ("events:\n  classes:\n    fall:\n      threshold: .nan\n",
     "$.events.classes.fall.threshold: nan: NaN and infinity are refused"),
    ("events:\n  default:\n    min_duration_ms: .nan\n",
     "$.events.default.min_duration_ms: nan: NaN and infinity are refused"),
    ("machines:\n  pump-1:\n    threshold_scale: .inf\n",
     "$.machines.pump-1.threshold_scale: inf: NaN and infinity are refused"),
    ("publish:\n  endpoint: http://x\n",
     "$.publish.endpoint: 'http://x': expected a ZeroMQ endpoint: tcp://HOST:PORT"),
    ("model:\n  path: ''\n", "$.model.path: '': expected a non-empty path"),
    ("[" * 100000, "nests too deep"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "source: mic\n"),
                         overrides={"source": "file:x.wav", "audio.realtime": False})
    assert config.source == "file:x.wav"
    assert config.audio.realtime is False
    with pytest.raises(ConfigError, match=r"\$.audio.sample_rate: 10: expected `int` >= 4000"):
        load_config(None, overrides={"audio.sample_rate": 10})


def test_partial_event_default_keeps_builtin_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "events:\n  default:\n    threshold: 0.7\n"))
    assert config.events.default.threshold == 0.7
    assert config.events.default.refractory_ms == Config().events.default.refractory_ms
    assert config.events.default.confirm_n == 1


def test_every_key_is_documented_in_the_shipped_config() -> None:
    """config.yaml is the reference: each key appears there, commented."""
    import re

    import msgspec

    text = (REPO / "config.yaml").read_text()

    def keys(cls: type, prefix: str) -> list[str]:
        out = []
        for f in msgspec.structs.fields(cls):
            out.append(prefix + f.name)
            default = f.default_factory() if f.default_factory is not msgspec.NODEFAULT \
                else f.default
            if isinstance(default, msgspec.Struct):
                out += keys(type(default), f"{prefix}{f.name}.")
        return out

    missing = [key for key in keys(Config, "")
               if not re.search(rf"^\s*#?\s*{re.escape(key.split('.')[-1])}:", text, re.M)]
    assert missing == []


def test_without_a_config_file_the_shipped_model_is_found_from_any_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`audio-monitor analyze clip.wav` run outside the checkout (or with a config file that
    leaves model.path out) uses the shipped model; a relative model.path given without a
    config file means the working folder's, in a config file the file's folder's."""
    from monitor.config import MODELS_DIR

    monkeypatch.chdir(tmp_path)
    assert load_config(None).model.path == MODELS_DIR / "events.onnx"
    given = load_config(None, overrides={"model.path": "mine.onnx"}).model.path
    assert given == tmp_path / "mine.onnx"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "a.yaml").write_text("log_level: INFO\n", encoding="utf-8")
    assert load_config(tmp_path / "site" / "a.yaml").model.path == MODELS_DIR / "events.onnx"
    (tmp_path / "site" / "b.yaml").write_text("model:\n  path: m/x.onnx\n", encoding="utf-8")
    assert load_config(tmp_path / "site" / "b.yaml").model.path == tmp_path / "site" / "m/x.onnx"
