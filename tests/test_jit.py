"""Kernel compilation: the ahead-of-time build equals just-in-time Numba bit for bit, keeps
Numba out of the daemon, refuses wrong arrays, and is ignored when its source changed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from monitor.dsp import jit

REPO = Path(__file__).resolve().parents[1]
REQUIRE_AOT = os.environ.get("AUDIO_MONITOR_REQUIRE_AOT") == "1"  # CI: never skip


def _run(code: str, *, jit_only: bool = False) -> str:
    env = {**os.environ, jit.JIT_ENV: "1" if jit_only else "0"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def built() -> None:
    if not jit.is_fresh():
        if REQUIRE_AOT:
            pytest.fail("the ahead-of-time kernels are missing or stale: run "
                        "`python -m monitor.dsp.jit` (scripts/setup.sh does)")
        pytest.skip("ahead-of-time kernels not built (`python -m monitor.dsp.jit`)")


def test_kernel_modules_lists_every_file_with_kernels() -> None:
    defining = {".".join(path.relative_to(REPO).with_suffix("").parts)
                for path in (REPO / "monitor").rglob("*.py")
                if re.search(r"^@kernel\(", path.read_text(encoding="utf-8"), re.MULTILINE)}
    assert defining == set(jit.KERNEL_MODULES)


# The live chain on real audio: 48 kHz stereo through downmix, resampler, levels, front end
# and one anomaly scorer; every kernel runs. Prints where it saved the outputs.
CHAIN = """
    import sys
    import numpy as np
    import soundfile as sf
    from monitor.detect import anomaly
    from monitor.dsp import jit, levels
    from monitor.dsp.frontend import Frontend, FrontendParams
    from monitor.dsp.resample import StreamingResampler, downmix_into

    audio, rate = sf.read(sys.argv[1], dtype="float32", frames=8 * 16000)
    stereo = np.repeat(audio, 3)  # 48 kHz-long stereo interleaving of real samples
    stereo = np.ascontiguousarray(np.stack([stereo, stereo[::-1]], axis=1).reshape(-1))
    params = FrontendParams()
    frontend = Frontend(params, max_block=4096)
    resampler = StreamingResampler(48000, 16000, max_block=4096)
    mono = np.zeros(4096, np.float32)
    res = np.zeros(resampler.max_output(4096), np.float32)
    frames = np.zeros((frontend.max_frames(res.shape[0]), params.n_mels), np.float32)
    stats = np.zeros(levels.COUNT + 1, np.float64)
    mel, resampled = [], []
    for start in range(0, stereo.shape[0], 2 * 1000):
        n_mono = downmix_into(stereo[start:start + 2 * 1000], 2, mono)
        n = resampler.process(mono[:n_mono], res)
        resampled.append(res[:n].copy())
        levels.condition_block(res[:n].copy(), stats)
        k = frontend.process(res[:n], frames)
        mel.append(frames[:k].copy())
    mel = np.concatenate(mel)
    baseline_mel = mel[: mel.shape[0] // 2]
    mean = baseline_mel.mean(axis=0).astype(np.float64)
    whiten = np.eye(params.n_mels)
    context = 8
    ring = np.zeros((context, params.n_mels))
    acc, state, diff = np.zeros(params.n_mels), np.zeros(5), np.zeros(params.n_mels)
    state[:] = (0.0, 0.0, 0.1, -1.0, 0.0)
    raw = []
    for frame in mel:
        anomaly._frame_kernel(frame, ring, acc, state, mean, whiten, diff)
        raw.append(state[4])
    smooth = anomaly.ema(np.asarray(raw), 0.05)
    np.savez(sys.argv[2], mel=mel, resampled=np.concatenate(resampled), stats=stats,
             raw=np.asarray(raw), smooth=smooth)
    print(sum(k.ahead_of_time for k in jit.KERNELS), len(jit.KERNELS))
"""


def test_ahead_of_time_kernels_equal_just_in_time(built: None, shared_data: Path,
                                                  tmp_path: Path) -> None:
    clip = sorted((shared_data / "safe").rglob("*.flac"))[0]
    outputs = {}
    for label, jit_only in (("aot", False), ("jit", True)):
        out = tmp_path / f"{label}.npz"
        env = {**os.environ, jit.JIT_ENV: "1" if jit_only else "0"}
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(CHAIN), str(clip),
                                 str(out)], env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr
        aot, total = map(int, result.stdout.split())
        assert (aot, total) == ((0, total) if jit_only else (total, total))
        outputs[label] = np.load(out)
    for key in outputs["aot"].files:
        assert outputs["aot"][key].size > 0, key
        np.testing.assert_array_equal(outputs["aot"][key], outputs["jit"][key], err_msg=key)


def test_daemon_chain_with_ahead_of_time_kernels_never_imports_numba(
        built: None, tiny_model: Path) -> None:
    out = _run(f"""
        import sys
        import numpy as np
        import monitor.service.daemon
        from monitor.config import load_config
        from monitor.detect.detector import Detector
        from monitor.pipeline.processor import Processor
        from monitor.pipeline.results import NullSink
        config = load_config(None, overrides={{"model.path": {str(tiny_model)!r}}})
        processor = Processor.from_config(
            config, Detector(config.model.path), in_rate=48000, channels=2, max_block=4096,
            sink=NullSink())
        processor.warm_up()
        processor.process(np.zeros(2 * 48000, np.float32))
        print(processor.frames, sorted(m for m in ("numba", "llvmlite") if m in sys.modules))
    """)
    frames, loaded = out.split(" ", 1)
    assert int(frames) > 90
    assert loaded == "[]"


def test_ahead_of_time_kernel_refuses_wrong_arrays(built: None) -> None:
    out = _run("""
        import numpy as np
        from monitor.dsp import levels
        for x in (np.zeros(8), np.zeros(16, np.float32)[::2]):
            try:
                levels.condition_block(x, np.zeros(levels.COUNT + 1))
            except TypeError as err:
                print(err)
    """)
    assert out.splitlines() == [
        "kernel levels__condition_block: argument 0 must be a C-contiguous 1-d float32 "
        "array, got a C-contiguous 1-d float64 array",
        "kernel levels__condition_block: argument 0 must be a C-contiguous 1-d float32 "
        "array, got a strided 1-d float32 array"]


def test_just_in_time_kernels_have_the_same_type_contract() -> None:
    out = _run("""
        import numpy as np
        from monitor.dsp import levels
        try:
            levels.condition_block(np.zeros(8), np.zeros(levels.COUNT + 1))
        except TypeError as err:
            print(type(err).__name__)
    """, jit_only=True)
    assert out == "TypeError"


def test_changed_kernel_file_falls_back_to_just_in_time(built: None, tmp_path: Path) -> None:
    source = REPO / "monitor" / "dsp" / "levels.py"
    assert jit._fresh_extension(source) is not None
    changed = tmp_path / "levels.py"
    shutil.copy(source, changed)
    with changed.open("a", encoding="utf-8") as handle:
        handle.write("# edited after the build\n")
    assert jit._fresh_extension(changed) is None


def test_signature_array_arguments_are_parsed() -> None:
    checks = jit._array_checks("UniTuple(i8, 2)(f4[::1], i8, f8[:, ::1], b1, i8[::1])")
    assert checks == [(0, np.dtype(np.float32), 1), (2, np.dtype(np.float64), 2),
                      (4, np.dtype(np.int64), 1)]
    with pytest.raises(ValueError, match="C-contiguous"):
        jit._array_checks("void(f4[:])")


def test_daemon_kernels_run_without_importing_scipy_linalg() -> None:
    """Just in time: numba's BLAS probe must not drag scipy.linalg into the daemon."""
    out = _run("""
        import sys
        import numpy as np
        import monitor.service.daemon
        from monitor.dsp.frontend import Frontend, FrontendParams
        frontend = Frontend(FrontendParams(), max_block=1600)
        frames = np.zeros((frontend.max_frames(1600), FrontendParams().n_mels), np.float32)
        n = frontend.process(np.ones(1600, np.float32), frames)
        print(n, sorted(m for m in sys.modules if m.startswith("scipy.linalg")))
    """, jit_only=True)
    frames, loaded = out.split(" ", 1)
    assert int(frames) > 0
    assert loaded == "[]"


def test_scipy_and_numba_blas_still_work_afterwards() -> None:
    out = _run("""
        import numba
        import numpy as np
        import monitor.dsp.kernels
        import scipy.linalg
        import scipy.signal
        dot = numba.njit(lambda a, b: np.dot(a, b))
        print(dot(np.ones(3), np.ones(3)), scipy.linalg.cholesky(np.eye(2))[1, 1])
    """, jit_only=True)
    assert out == "3.0 1.0"
