"""The kernels' compile settings keep numba's BLAS probe from importing scipy.linalg."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_daemon_kernels_run_without_importing_scipy_linalg() -> None:
    out = _run("""
        import sys
        import numpy as np
        import monitor.daemon
        from monitor.frontend import Frontend, FrontendParams
        frontend = Frontend(FrontendParams(), max_block=1600)
        frames = np.zeros((frontend.max_frames(1600), FrontendParams().n_mels), np.float32)
        n = frontend.process(np.ones(1600, np.float32), frames)
        print(n, sorted(m for m in sys.modules if m.startswith("scipy.linalg")))
    """)
    frames, loaded = out.split(" ", 1)
    assert int(frames) > 0
    assert loaded == "[]"


def test_scipy_and_numba_blas_still_work_afterwards() -> None:
    out = _run("""
        import numba
        import numpy as np
        import monitor.jit
        import scipy.linalg
        import scipy.signal
        dot = numba.njit(lambda a, b: np.dot(a, b))
        print(dot(np.ones(3), np.ones(3)), scipy.linalg.cholesky(np.eye(2))[1, 1])
    """)
    assert out == "3.0 1.0"
