"""The detector owns a real onnxruntime session and refuses models that do not fit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_model import build_tiny_model, loud_score

from monitor.detect.detector import Detector
from monitor.dsp.frontend import FrontendParams, logmel_of
from monitor.errors import ModelError

EVENTS = Path(__file__).resolve().parents[1] / "models" / "events.onnx"


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


EXACT_PROBE = round(64 * 255 * 127 / 1e4) * 1e4
"""The probe convolution's exact integer sum, requantised (2,072,640 -> 207 x 1e4)."""


def test_unsigned_int8_weights_sum_exactly_where_signed_kernels_saturate() -> None:
    """The probe's s8 weights stored as u8 give the exact sum on every CPU; the s8 graph is
    exact on an x86 CPU with VNNI or AMX and loses half the sum (16-bit lanes) on one with
    AVX2 and neither (the CPU's flags, read independently of the probe)."""
    from monitor.detect.detector import (
        _saturation_probe,
        int8_saturates,
        probe_int8,
        unsigned_int8_weights,
    )

    assert probe_int8(unsigned_int8_weights(_saturation_probe())) == EXACT_PROBE
    signed = probe_int8()
    from monitor.training.train import cpu_kind

    flags = set(cpu_kind()["flags"])
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        assert signed == EXACT_PROBE
        assert not int8_saturates()
    elif "avx2" in flags:
        assert signed < 0.6 * EXACT_PROBE
        assert int8_saturates()
    else:
        pytest.skip("not an x86 CPU whose int8 kernels are known from its flags")


def test_the_shipped_probe_file_is_the_probe_graph() -> None:
    """`int8_saturates` reads the probe from a file (no `onnx` import at start); it must be
    the graph `_saturation_probe` builds. To remake it: `PROBE_FILE.write_bytes(
    _saturation_probe())`."""
    from monitor.detect.detector import PROBE_FILE, _saturation_probe

    assert PROBE_FILE.read_bytes() == _saturation_probe()


def test_unsigned_int8_weights_keep_every_dequantised_value() -> None:
    """Every INT8 zero point (and INT8 initializer a DequantizeLinear reads) moves up by 128
    as UINT8; the graph's float outputs on the shipped model are the same bit for bit."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from monitor.detect.detector import int8_saturates, unsigned_int8_weights

    model = EVENTS.read_bytes() if EVENTS.is_file() else None
    if model is None:
        pytest.skip("models/events.onnx absent")
    moved = unsigned_int8_weights(model)
    before = {t.name: t for t in onnx.load_from_string(model).graph.initializer}
    after = {t.name: t for t in onnx.load_from_string(moved).graph.initializer}
    int8 = [n for n, t in before.items() if t.data_type == onnx.TensorProto.INT8]
    assert int8 and not [n for n, t in after.items() if t.data_type == onnx.TensorProto.INT8]
    for name in int8:
        assert np.array_equal(numpy_helper.to_array(after[name]).astype(np.int16) - 128,
                              numpy_helper.to_array(before[name]))
    windows = np.random.default_rng(0).normal(-4.0, 2.0, (8, 1, 96, 64)).astype(np.float32)

    def scores(data: bytes,
               level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
               ) -> np.ndarray:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return np.concatenate([session.run(None, {name: w})[0] for w in windows])

    # Unoptimised: the reference QuantizeLinear/DequantizeLinear arithmetic, no fused kernel.
    assert np.array_equal(scores(model), scores(moved))
    if not int8_saturates():  # fused: u8 x u8 kernels against this CPU's exact u8 x s8 ones
        assert np.array_equal(scores(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                              scores(moved, ort.GraphOptimizationLevel.ORT_ENABLE_ALL))


def _int8_weight_probe() -> bytes:
    """The probe with its weights stored as an INT8 initializer that DequantizeLinear reads
    (a pre-quantised model), instead of float weights behind a QuantizeLinear."""
    import onnx
    from onnx import numpy_helper

    from monitor.detect.detector import _saturation_probe

    model = onnx.load_from_string(_saturation_probe())
    nodes = [n for n in model.graph.node if n.output[0] != "w_q"]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    inits = [t for t in model.graph.initializer if t.name != "w"]
    inits.append(numpy_helper.from_array(np.full((1, 64, 1, 1), 127, np.int8), "w_q"))
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return bytes(model.SerializeToString())


def test_unsigned_int8_weights_move_int8_initializers_with_their_zero_point() -> None:
    import onnx
    from onnx import numpy_helper

    from monitor.detect.detector import int8_saturates, probe_int8, unsigned_int8_weights

    stored = _int8_weight_probe()
    moved = unsigned_int8_weights(stored)
    inits = {t.name: t for t in onnx.load_from_string(moved).graph.initializer}
    assert inits["zp_s8"].data_type == inits["w_q"].data_type == onnx.TensorProto.UINT8
    assert (numpy_helper.to_array(inits["w_q"]) == 255).all()
    assert probe_int8(moved) == EXACT_PROBE
    assert (probe_int8(stored) != EXACT_PROBE) is int8_saturates()


def test_unsigned_int8_weights_retype_declared_value_info() -> None:
    """Shape inference's value_info (as YAMNet's graph carries for every tensor) declares the
    quantised weights INT8; the declaration follows them to UINT8, and the sum is exact."""
    import onnx
    from onnx import TensorProto, helper

    from monitor.detect.detector import _saturation_probe, probe_int8, unsigned_int8_weights

    model = onnx.load_from_string(_saturation_probe())
    model.graph.value_info.append(helper.make_tensor_value_info("w_q", TensorProto.INT8,
                                                                [1, 64, 1, 1]))
    moved = onnx.load_from_string(unsigned_int8_weights(model.SerializeToString()))
    assert [v.type.tensor_type.elem_type for v in moved.graph.value_info] == [TensorProto.UINT8]
    assert probe_int8(moved.SerializeToString()) == EXACT_PROBE


def test_every_shipped_graph_loses_its_int8_weights() -> None:
    """The event model, YAMNet as fetched (with value_info) and the training embedder's cut:
    no INT8 initializer is left, so none of them runs a saturating kernel."""
    import onnx

    from monitor.detect.detector import signed_zero_points, unsigned_int8_weights
    from monitor.training.compose import embedding_model_bytes

    yamnet = EVENTS.parent / "yamnet.onnx"
    if not (EVENTS.is_file() and yamnet.is_file()):
        pytest.skip("models absent: run `audio-monitor fetch-models`")
    for data in (EVENTS.read_bytes(), yamnet.read_bytes(), embedding_model_bytes(yamnet)):
        moved = unsigned_int8_weights(data)
        graph = onnx.load_from_string(moved).graph
        assert not [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert signed_zero_points(data) > 0 and signed_zero_points(moved) == 0


@pytest.mark.parametrize("exposed", ["graph output", "other operator"])
def test_unsigned_int8_weights_leave_a_zero_point_others_can_see(exposed: str) -> None:
    """Where anything but its own Q/DQ pairs sees an int8 tensor (a graph output of type
    INT8, another operator reading it), moving its zero point would break the graph: it
    stays INT8, and the graph still loads and sums as before."""
    import onnx
    from onnx import TensorProto, helper

    from monitor.detect.detector import (
        _saturation_probe,
        probe_int8,
        signed_zero_points,
        unsigned_int8_weights,
    )

    model = onnx.load_from_string(_saturation_probe())
    info = helper.make_tensor_value_info("w_q", TensorProto.INT8, [1, 64, 1, 1])
    if exposed == "graph output":
        model.graph.output.append(info)
    else:
        model.graph.node.append(helper.make_node("Identity", ["w_q"], ["w_copy"]))
        model.graph.output.append(helper.make_tensor_value_info(
            "w_copy", TensorProto.INT8, [1, 64, 1, 1]))
    data = model.SerializeToString()
    moved = unsigned_int8_weights(data)
    zero_points = {t.name: t.data_type for t in onnx.load_from_string(moved).graph.initializer}
    assert zero_points["zp_s8"] == TensorProto.INT8
    assert probe_int8(moved) == probe_int8(data)
    assert signed_zero_points(moved) == 1  # what open_session warns about


def test_a_failing_int8_probe_runs_models_as_stored(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    import monitor.detect.detector as detector

    def broken(model: bytes | None = None) -> float:
        raise RuntimeError("no CPU provider")

    monkeypatch.setattr(detector, "probe_int8", broken)
    assert detector.int8_saturates.__wrapped__() is False
    assert "int8 kernel probe failed (no CPU provider)" in caplog.text


def test_a_u8_form_that_does_not_load_falls_back_to_the_model_as_stored(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        u8_cache: Path) -> None:
    import monitor.detect.detector as detector

    monkeypatch.setattr(detector, "int8_saturates", lambda: True)
    monkeypatch.setattr(detector, "unsigned_int8_weights", lambda model: b"not a model")
    det = Detector(tiny_model, threads=1)
    assert det.unsigned_int8 is False
    assert "as u8 do not load" in caplog.text
    frames = np.random.default_rng(2).normal(-4.0, 1.0, (det.window_frames, 64))
    for frame in frames.astype(np.float32):
        det.push(frame)
    assert det.score()[0] == pytest.approx(loud_score(frames.astype(np.float32)), abs=1e-5)


@pytest.fixture
def u8_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of this test's own for u8 forms (`u8_cache_dir`)."""
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path / "cache"))
    return tmp_path / "cache" / "int8"


def test_a_model_without_int8_weights_runs_as_stored_where_kernels_saturate(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch, u8_cache: Path) -> None:
    import monitor.detect.detector as detector

    monkeypatch.setattr(detector, "int8_saturates", lambda: True)
    assert Detector(tiny_model, threads=1).unsigned_int8 is False
    if EVENTS.is_file():
        assert Detector(EVENTS).unsigned_int8 is True


def test_the_u8_form_is_kept_and_later_starts_use_it(
        monkeypatch: pytest.MonkeyPatch, u8_cache: Path) -> None:
    """Where kernels saturate, the first start keeps the u8 form (named by the model's and
    its own sha256); a later start loads it without rewriting the graph, with the same
    scores; a kept form whose bytes changed (truncated, or flipped in place) is made again."""
    import hashlib

    import monitor.detect.detector as detector

    if not EVENTS.is_file():
        pytest.skip("models/events.onnx not composed (audio-monitor fetch-models)")
    monkeypatch.setattr(detector, "int8_saturates", lambda: True)
    windows = np.random.default_rng(3).normal(-4.0, 2.0, (2, 96, 64)).astype(np.float32)
    rewrites = []
    rewrite = detector.unsigned_int8_weights

    def counted(model: bytes) -> bytes:
        rewrites.append(1)
        return rewrite(model)

    monkeypatch.setattr(detector, "unsigned_int8_weights", counted)
    first = Detector(EVENTS)
    assert first.unsigned_int8 is True and len(rewrites) == 1
    (kept,) = u8_cache.glob(f"u8-v*-{hashlib.sha256(EVENTS.read_bytes()).hexdigest()}-*.onnx")
    form = kept.read_bytes()
    assert kept.name.endswith(f"-{hashlib.sha256(form).hexdigest()}.onnx")
    assert detector.signed_zero_points(form) == 0
    second = Detector(EVENTS)
    assert second.unsigned_int8 is True and len(rewrites) == 1  # read, not rewritten
    want = _scores_of(first, windows)
    assert np.array_equal(_scores_of(second, windows), want)
    middle = len(form) // 2
    for damaged in (form[:1000], form[:middle] + bytes(b ^ 0x5A for b in form[middle:middle + 64])
                    + form[middle + 64:]):
        kept.write_bytes(damaged)
        again = Detector(EVENTS)
        assert again.unsigned_int8 is True
        assert kept.read_bytes() == form  # made again, whole
        assert np.array_equal(_scores_of(again, windows), want)
    assert len(rewrites) == 3
    assert [p.name for p in u8_cache.iterdir()] == [kept.name]  # no write leftovers


@pytest.mark.parametrize("where", ["a file", "a long name"])
def test_a_cache_that_cannot_be_used_only_costs_the_rewrite(
        where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import monitor.detect.detector as detector

    if not EVENTS.is_file():
        pytest.skip("models/events.onnx not composed (audio-monitor fetch-models)")
    monkeypatch.setattr(detector, "int8_saturates", lambda: True)
    blocked = tmp_path / "cache"
    if where == "a file":
        blocked.write_text("not a folder")
    else:
        blocked = tmp_path / ("x" * 300)
    monkeypatch.setenv("CACHE_DIRECTORY", str(blocked))
    assert Detector(EVENTS).unsigned_int8 is True
    assert Detector(EVENTS).unsigned_int8 is True


def test_u8_forms_are_kept_where_systemd_or_xdg_says(monkeypatch: pytest.MonkeyPatch) -> None:
    from monitor.detect.detector import u8_cache_dir

    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/audio-monitor:/var/cache/other")
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/cache")
    assert u8_cache_dir() == Path("/var/cache/audio-monitor/int8")
    monkeypatch.setenv("CACHE_DIRECTORY", "relative")  # not absolute: ignored
    assert u8_cache_dir() == Path("/x/cache/audio-monitor/int8")
    monkeypatch.delenv("CACHE_DIRECTORY")
    monkeypatch.setenv("XDG_CACHE_HOME", "cache")  # not absolute: ignored (XDG spec)
    monkeypatch.setenv("HOME", "/home/nurse")
    assert u8_cache_dir() == Path("/home/nurse/.cache/audio-monitor/int8")
    monkeypatch.setenv("HOME", "")
    assert u8_cache_dir() is None


def _scores_of(det: Detector, windows: np.ndarray) -> np.ndarray:
    out = []
    for w in windows:
        for frame in w:
            det.push(frame)
        out.append(det.score().copy())
    return np.stack(out)


QEMU_CPU = "Haswell"
"""An x86 CPU with AVX2 and without VNNI: onnxruntime's s8 kernels saturate on it."""

_EMULATED_SCORES = """
import sys
import numpy as np
from pathlib import Path
from monitor.detect.detector import Detector, int8_saturates
windows = np.load(sys.argv[1])
for i, model in enumerate(sys.argv[3:]):
    det = Detector(Path(model))
    out = []
    for w in windows:
        for frame in w:
            det.push(frame)
        out.append(det.score().copy())
    np.save(f"{sys.argv[2]}{i}.npy", np.stack(out))
print(int8_saturates(), "onnx" in sys.modules)
"""


def test_detector_scores_are_the_same_on_an_emulated_avx2_cpu(tmp_path: Path) -> None:
    """The shipped event model's and YAMNet's scores on an emulated AVX2-only CPU (qemu user
    mode) equal this CPU's bit for bit, where the s8 graphs' own fused kernels would
    saturate there; a second start reads the u8 forms the first kept, without `onnx`."""
    import platform
    import subprocess
    import sys

    yamnet = EVENTS.parent / "yamnet.onnx"
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or platform.machine() != "x86_64" or not EVENTS.is_file() \
            or not yamnet.is_file():
        pytest.skip("needs qemu-user (scripts/setup.sh dev), an x86-64 host and the models")
    windows = np.random.default_rng(1).normal(-4.0, 2.0, (6, 96, 64)).astype(np.float32)
    np.save(tmp_path / "w.npy", windows)
    script = tmp_path / "emulated.py"
    script.write_text(_EMULATED_SCORES)
    env = {**os.environ, "CACHE_DIRECTORY": str(tmp_path / "cache")}
    for start in ("first", "second"):
        run = subprocess.run(
            [qemu, "-cpu", QEMU_CPU, sys.executable, str(script), str(tmp_path / "w.npy"),
             str(tmp_path / "out"), str(EVENTS), str(yamnet)],
            capture_output=True, text=True, timeout=600, check=False, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        if "requested feature: CPUID.07H:EBX.avx2" in run.stderr:
            pytest.skip("this qemu cannot emulate AVX2 (qemu >= 7.2 can)")
        # The emulated CPU saturates (the test has teeth); only the first start rewrites.
        assert run.stdout.split() == ["True", str(start == "first")], (start, run.stdout)
        for i, model in enumerate((EVENTS, yamnet)):
            assert np.array_equal(np.load(tmp_path / f"out{i}.npy"),
                                  _scores_of(Detector(model), windows)), (start, model)
    assert len(list((tmp_path / "cache" / "int8").glob("u8-*.onnx"))) == 2
