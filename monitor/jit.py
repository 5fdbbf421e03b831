"""How every Numba kernel here is compiled: `@kernel` (cached, GIL released).

Importing this module also loads Numba's numpy support with `scipy.linalg` hidden.
Numba probes for BLAS by importing `scipy.linalg` when it first types a numpy
function, which costs ~150 ms of start-up and ~12 MB resident in a daemon that never
uses BLAS (the probe only picks how `np.convolve` is compiled). scipy imports made
later, by training or evaluation code, work as usual.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba

__all__ = ["kernel"]

F = TypeVar("F", bound=Callable[..., Any])


def _load_numpy_support_without_scipy() -> None:
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return  # already loaded by someone else, or the probe already ran
    sys.modules["scipy.linalg"] = None  # type: ignore[assignment]  # import fails
    try:
        import numba.np.arraymath  # noqa: F401  # runs the probe
    finally:
        for name in [m for m in sys.modules if m.startswith("scipy.linalg")]:
            del sys.modules[name]  # the marker, and any half-imported submodule


_load_numpy_support_without_scipy()


def kernel(function: F) -> F:
    """Compile `function` with Numba: nopython, cached on disk (`NUMBA_CACHE_DIR`), and
    releasing the GIL so the capture thread is never held up by a kernel."""
    return cast(F, numba.njit(cache=True, nogil=True)(function))
