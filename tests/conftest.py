"""Shared fixtures: the tiny real ONNX model and the real recordings in ../shared/data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Daemons started by tests keep their state (event journal, baselines) in a throw-away home.
os.environ["HOME"] = tempfile.mkdtemp(prefix="audio-monitor-test-home-")
# Kept u8 forms of models (monitor.detect.detector.u8_cache_dir) go to that home's ~/.cache.
os.environ["CACHE_DIRECTORY"] = ""
os.environ["XDG_CACHE_HOME"] = ""
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache"
                                             / "numba"))

from tiny_model import build_tiny_model

from monitor.config import data_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = data_dir()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "labels.csv").is_file():
        pytest.skip(f"real recordings not found at {SHARED_DATA} (set AUDIO_MONITOR_DATA)")
    return SHARED_DATA


@pytest.fixture
def config_file(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A daemon config on the tiny model: fast stride, top-2 scores, frequent status. Each
    test gets its own state_dir: a daemon killed by one test leaves its open events in its
    own journal, not in the next test's (a start closes those, see `close_open_events`)."""
    folder = tmp_path_factory.mktemp("config")
    path = folder / "config.yaml"
    path.write_text(f"sensor_id: test-room\nstate_dir: {folder / 'state'}\nmodel:\n"
                    f"  path: {tiny_model}\n  stride_ms: 50\n  top_k: 2\npublish:\n"
                    "  status_interval_s: 0.5\n")
    return path
