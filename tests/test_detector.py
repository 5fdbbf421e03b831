"""The detector owns a real onnxruntime session and refuses models that do not fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_model import build_tiny_model, loud_score

from monitor.detect.detector import Detector
from monitor.dsp.frontend import FrontendParams, logmel_of
from monitor.errors import ModelError


def test_scores_the_newest_window_like_the_oracle(tiny_model: Path) -> None:
    detector = Detector(tiny_model, threads=1)
    assert detector.classes == ("loud", "quiet")
    rng = np.random.default_rng(1)
    frames = rng.normal(-4.0, 1.0, size=(60, 64)).astype(np.float32)
    for i, frame in enumerate(frames):
        detector.push(frame)
        assert detector.window_full == (i + 1 >= detector.window_frames)
    scores = detector.score()
    expected = loud_score(frames[-detector.window_frames:])
    assert scores[0] == pytest.approx(expected, abs=1e-5)
    assert scores[1] == pytest.approx(1 - expected, abs=1e-5)
    np.testing.assert_array_equal(detector.latest_frame, frames[-1])
    detector.reset()
    assert not detector.window_full
    # A new stream starts after silence: the history is the front end's silent frame.
    silence = logmel_of(np.zeros(400, np.float32), FrontendParams())[0]
    np.testing.assert_array_equal(detector.silence, silence)
    assert detector.score()[0] == pytest.approx(
        loud_score(np.tile(silence, (detector.window_frames, 1))), abs=1e-5)


def copy_model(tiny_model: Path, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    target = folder / tiny_model.name
    shutil.copy(tiny_model, target)
    shutil.copy(tiny_model.with_suffix(".json"), target.with_suffix(".json"))
    return target


def edit_card(model: Path, **changes: object) -> None:
    card_path = model.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card.update(changes)
    card_path.write_text(json.dumps(card))


def test_missing_model_file_names_the_fix(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path)
    edit_card(model, fetch="audio-monitor fetch-models")
    model.unlink()
    with pytest.raises(ModelError, match=r"tiny.onnx not found; run `audio-monitor fetch-models`"):
        Detector(model)


def test_missing_card(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path)
    model.with_suffix(".json").unlink()
    with pytest.raises(ModelError, match="model card .*tiny.json not found"):
        Detector(model)


def test_front_end_mismatch_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path)
    card = json.loads(model.with_suffix(".json").read_text())
    frontend = dict(card["frontend"])
    frontend["fmax_hz"] = 7000.0  # parameters changed, hash left as it was
    edit_card(model, frontend=frontend)
    with pytest.raises(ModelError, match="front-end hash .* does not match its parameters"):
        Detector(model)


def test_card_window_disagreeing_with_model_is_named(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path)
    edit_card(model, window_frames=48, input={"name": "log_mel", "shape": [1, 48, 64]})
    with pytest.raises(ModelError, match=r"tensor 'log_mel' has shape \[1, 24, 64\], its card "
                                         r"and front end need \[1, 48, 64\]"):
        Detector(model)


def test_wrong_input_name(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path)
    edit_card(model, input={"name": "waveform", "shape": [1, 24, 64]})
    with pytest.raises(ModelError,
                       match=r"card names input 'waveform', the model has \['log_mel'\]"):
        Detector(model)


def test_class_count_mismatch(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path)
    edit_card(model, classes=["a", "b", "c"])
    with pytest.raises(ModelError, match=r"output shape \[1, 2\] does not match its 3 classes"):
        Detector(model)


def test_checksum_mismatch(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path)
    edit_card(model, sha256="0" * 64)
    with pytest.raises(ModelError, match="has sha256 .* its card expects 0000"):
        Detector(model)


def test_corrupt_model_file(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path)
    model.write_bytes(b"not an onnx model")
    with pytest.raises(ModelError, match="cannot be loaded"):
        Detector(model)


def test_other_front_end_parameters_work(tmp_path: Path) -> None:
    params = FrontendParams(sample_rate=22050, n_fft=1024, window_ms=40.0, hop_ms=20.0,
                            n_mels=40, fmin_hz=50.0, fmax_hz=11000.0)
    detector = Detector(build_tiny_model(tmp_path, params=params, window_frames=10))
    assert detector.card.frontend == params
    assert detector.card.frontend.n_mels == 40


@pytest.mark.parametrize(("threads", "spinning"), [(1, None), (2, "0"), (4, "0")])
def test_pool_threads_sleep_between_windows(tiny_model: Path, threads: int,
                                            spinning: str | None) -> None:
    """onnxruntime's pool threads spin-wait by default: with 2 threads ~34 % of a core at
    real time instead of ~5 % (benchmarks/suite.py measures it). Off where there is a pool."""
    session = Detector(tiny_model, threads=threads)._session
    entries = session.get_session_options().get_session_config_entry
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        if spinning is None:
            with pytest.raises(Exception, match="does not have configuration"):
                entries(key)
        else:
            assert entries(key) == spinning


def _qdq_matmul(path: Path, k: int) -> None:
    """x (1, k) float -> u8 QDQ -> MatMul with s8 weights (QDQ) -> u8 QDQ output (scale 1e4):
    the pattern onnxruntime fuses into an int8 u8 x s8 kernel."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.full((k, 1), 127, np.int8), "w_q"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(1e4, np.float32), "out_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "zp_u8"),
             numpy_helper.from_array(np.array(0, np.int8), "zp_s8")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "one", "zp_u8"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "one", "zp_u8"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "one", "zp_s8"], ["w"]),
             helper.make_node("MatMul", ["x_dq", "w"], ["y_f"]),
             helper.make_node("QuantizeLinear", ["y_f", "out_scale", "zp_u8"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "out_scale", "zp_u8"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, k])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_unfused_int8_is_exact_where_fused_kernels_saturate(tmp_path: Path) -> None:
    """A u8 x s8 product whose pairs overflow 16 bits (255 x 127 x 2 > 32767): with
    `exact_int8_options` the quantised graph gives the exact integer sum (2,072,640 -> 207 x
    1e4) on every CPU; the fused kernels on a CPU `int8_saturates` names lose it."""
    import onnxruntime as ort

    from monitor.detect.detector import exact_int8_options, int8_saturates

    k = 64
    _qdq_matmul(tmp_path / "q.onnx", k)
    x = np.full((1, k), 255.0, np.float32)
    exact = round(255 * 127 * k / 1e4) * 1e4

    def run(unfused: bool) -> float:
        options = ort.SessionOptions()
        assert exact_int8_options(options, saturates=unfused) is unfused
        session = ort.InferenceSession(str(tmp_path / "q.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        return float(session.run(None, {"x": x})[0][0, 0])

    assert run(True) == exact
    fused = run(False)
    if int8_saturates():
        assert fused < 0.6 * exact
    assert run(int8_saturates()) == exact


@pytest.mark.parametrize(("flags", "saturates"), [
    ("fpu sse sse2 avx avx2 fma", True),
    ("fpu sse sse2 avx2 avx512f avx512bw avx512dq avx512vl", True),
    ("fpu sse sse2 avx2 avx512f avx512bw avx512_vnni", False),
    ("fpu sse sse2 avx2 avx_vnni", False),
    ("fpu sse sse2 avx2 avx512f amx_int8", False),
    ("fp asimd evtstrm aes pmull sha1 sha2 crc32 asimddp", False),
])
def test_int8_saturates_reads_the_first_processors_flags(flags: str, saturates: bool) -> None:
    """x86 without VNNI or AMX saturates; ARM (no sse2) and unreadable flags do not."""
    from monitor.detect.detector import int8_saturates

    cpuinfo = f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
    assert int8_saturates(cpuinfo) is saturates
    assert int8_saturates("processor\t: 0\n") is False
