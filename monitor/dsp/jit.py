"""How every Numba kernel here is compiled: ahead of time when built, else just in time.

`@kernel(signature)` declares a kernel with its one Numba type signature, the same type
contract on both paths. `python -m monitor.dsp.jit` (run by `scripts/setup.sh`) compiles every
kernel ahead of time with `numba.pycc` into the extension `monitor/dsp/_aot_kernels`. A process
whose kernels all come from there never imports Numba or LLVM: ~100 MB less resident and
nothing to compile at start-up, which is what a small always-on board wants.

A file's kernels use their ahead-of-time code only if the file is byte-identical to the one
they were built from (its sha256 is stored in the extension); otherwise, or without the
extension, or with AUDIO_MONITOR_JIT=1, they are compiled just in time as before (cached on
disk in NUMBA_CACHE_DIR). pycc's wrappers do not check argument types, so ahead-of-time
kernels are called through a guard that raises TypeError for an array of the wrong dtype,
rank or layout, as Numba would, instead of reading memory wrongly.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, cast

import numpy as np

__all__ = ["KERNELS", "KERNEL_MODULES", "Kernel", "aot_status", "build", "kernel"]

F = TypeVar("F", bound=Callable[..., Any])

AOT_MODULE = "monitor.dsp._aot_kernels"
KERNEL_MODULES = (
    "monitor.dsp.kernels", "monitor.dsp.levels", "monitor.dsp.resample", "monitor.detect.anomaly")
"""Every module defining a `@kernel` (a test keeps this list complete)."""
JIT_ENV = "AUDIO_MONITOR_JIT"  # "1": ignore the ahead-of-time build

_DTYPES: dict[str, np.dtype[Any]] = {
    "f4": np.dtype(np.float32), "f8": np.dtype(np.float64), "i8": np.dtype(np.int64)}


@dataclass(frozen=True)
class Kernel:
    """One declared kernel: its export name in the extension, signature and Python source."""

    name: str
    signature: str
    function: Callable[..., Any]
    path: Path
    ahead_of_time: bool


KERNELS: list[Kernel] = []
"""Every kernel declared so far in this process, in declaration order."""

_aot_loaded: ModuleType | None = None
_aot_tried = False


def kernel(signature: str) -> Callable[[F], F]:
    """Compile the decorated function as a kernel of `signature` (Numba's syntax, arrays
    C-contiguous: `f4[::1]`, `f8[:, ::1]`; scalars `i8`, `f8`, `b1`)."""

    def decorate(function: F) -> F:
        path = Path(function.__code__.co_filename)
        name = f"{function.__module__.rsplit('.', 1)[-1]}__{function.__name__}"
        aot = _fresh_extension(path)
        ahead_of_time = aot is not None and hasattr(aot, name)
        if ahead_of_time:
            compiled = _guarded(getattr(aot, name), signature, name)
        else:
            compiled = _jit(function, signature)
        KERNELS.append(Kernel(name, signature, function, path, ahead_of_time))
        return cast(F, compiled)

    return decorate


def aot_status() -> str:
    """One line for logs: which kernels run ahead-of-time code."""
    aot = sum(k.ahead_of_time for k in KERNELS)
    if aot == len(KERNELS):
        return f"all {aot} kernels compiled ahead of time"
    return (f"{aot} of {len(KERNELS)} kernels compiled ahead of time, the rest just in time "
            "(run `python -m monitor.dsp.jit` to build them)")


# --- ahead of time -------------------------------------------------------------------------


@functools.cache
def file_digest(path: Path) -> int:
    """sha256 of a kernel file as a positive int64, as stored in the extension."""
    return int(hashlib.sha256(path.read_bytes()).hexdigest()[:15], 16)


def _digest_name(path: Path) -> str:
    return f"digest__{path.stem}"


def _extension() -> ModuleType | None:
    global _aot_loaded, _aot_tried
    if os.environ.get(JIT_ENV) == "1":
        return None
    if not _aot_tried:
        _aot_tried = True
        try:
            _aot_loaded = importlib.import_module(AOT_MODULE)
        except ImportError:
            _aot_loaded = None
    return _aot_loaded


def _fresh_extension(path: Path) -> ModuleType | None:
    """The extension, if it was built from exactly this file."""
    aot = _extension()
    if aot is None:
        return None
    stored = getattr(aot, _digest_name(path), None)
    if stored is None or stored() != file_digest(path):
        return None
    return aot


def _array_checks(signature: str) -> list[tuple[int, np.dtype[Any], int]]:
    """(argument index, dtype, rank) of each array argument of `signature`."""
    depth, open_at = 0, 0
    for i in range(len(signature) - 1, -1, -1):  # the "(" matching the final ")"
        depth += (signature[i] == ")") - (signature[i] == "(")
        if depth == 0:
            open_at = i
            break
    inside = signature[open_at + 1 : -1]
    args, depth, start = [], 0, 0
    for i, char in enumerate(inside + ","):
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            args.append(inside[start:i].strip())
            start = i + 1
    checks = []
    for index, arg in enumerate(args):
        if "[" in arg:
            base, dims = arg.split("[", 1)
            if not dims.endswith("::1]") or base not in _DTYPES:
                raise ValueError(f"kernel signature {signature!r}: argument {arg!r} must be a "
                                 f"C-contiguous array of {sorted(_DTYPES)}")
            checks.append((index, _DTYPES[base], dims.count(":") - 1))
    return checks


def _guarded(compiled: Callable[..., Any], signature: str, name: str) -> Callable[..., Any]:
    checks = _array_checks(signature)

    def call(*args: Any) -> Any:
        for index, dtype, ndim in checks:
            a = args[index]
            if type(a) is not np.ndarray or a.dtype is not dtype or a.ndim != ndim \
                    or not a.flags.c_contiguous:
                raise TypeError(f"kernel {name}: argument {index} must be a C-contiguous "
                                f"{ndim}-d {dtype} array, got {_describe(a)}")
        return compiled(*args)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = compiled.__doc__
    return call


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        layout = "C-contiguous" if value.flags.c_contiguous else "strided"
        return f"a {layout} {value.ndim}-d {value.dtype} array"
    return type(value).__name__


# --- just in time --------------------------------------------------------------------------


def _jit(function: Callable[..., Any], signature: str) -> Callable[..., Any]:
    import numba

    _load_numpy_support_without_scipy()
    compiled: Callable[..., Any] = numba.njit(signature, cache=True, nogil=True)(function)
    return compiled


def _load_numpy_support_without_scipy() -> None:
    """Numba probes for BLAS by importing `scipy.linalg` when it first types a numpy
    function: ~150 ms and ~12 MB resident for a probe that only picks how `np.convolve` is
    compiled. Load that support with `scipy.linalg` hidden; later scipy imports work."""
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return  # already loaded by someone else, or the probe already ran
    sys.modules["scipy.linalg"] = None  # type: ignore[assignment]  # import fails
    try:
        import numba.np.arraymath  # noqa: F401  # runs the probe
    finally:
        for name in [m for m in sys.modules if m.startswith("scipy.linalg")]:
            del sys.modules[name]  # the marker, and any half-imported submodule


# --- build ---------------------------------------------------------------------------------


def build(output_dir: Path | None = None) -> Path:
    """Compile every kernel of KERNEL_MODULES into the extension; return its path.

    Run in a fresh process (`python -m monitor.dsp.jit`): the kernels must be imported here,
    just in time, so that kernels calling kernels compile.
    """
    os.environ[JIT_ENV] = "1"
    if any(name in sys.modules for name in KERNEL_MODULES):
        raise RuntimeError("build() needs a process that has not imported the kernels yet")
    for module in KERNEL_MODULES:
        importlib.import_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pycc's pending-deprecation notice
        from numba.pycc import CC

        target = output_dir or Path(__file__).resolve().parent
        cc = CC(AOT_MODULE.rsplit(".", 1)[-1])
        cc.output_dir = str(target)
        # pycc's default generic target, not "host": a tree copied to an older CPU (an
        # image built elsewhere) must not die of an illegal instruction. Measured: the
        # front end's hop costs the same either way (~5 us).
        cc.verbose = False
        for k in KERNELS:
            cc.export(k.name, k.signature)(k.function)
        for path in sorted({k.path for k in KERNELS}):
            cc.export(_digest_name(path), "i8()")(_constant(file_digest(path)))
        cc.compile()
    built = sorted(target.glob(AOT_MODULE.rsplit(".", 1)[-1] + ".*"))
    return built[-1]


def _constant(value: int) -> Callable[[], int]:
    def constant() -> int:
        return value

    return constant


def is_fresh() -> bool:
    """True when the extension exists and every kernel file matches it (nothing to build)."""
    for module in KERNEL_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            return False
        if _fresh_extension(Path(spec.origin)) is None:
            return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitor.dsp.jit",
        description="Compile the Numba kernels ahead of time (needs a C compiler).")
    parser.add_argument("--if-stale", action="store_true",
                        help="do nothing when the extension matches every kernel file")
    args = parser.parse_args(argv)
    if args.if_stale and is_fresh():
        print("kernels: ahead-of-time build is up to date")
        return 0
    try:
        path = build()
    except Exception as err:  # any compiler failure: report, and the kernels stay JIT
        print(f"kernels: ahead-of-time build failed ({type(err).__name__}: {err}); they will "
              "be compiled just in time instead (install gcc and the Python headers to "
              "build them)", file=sys.stderr)
        return 1
    print(f"kernels: {len(KERNELS)} compiled ahead of time into {path}")
    return 0


if __name__ == "__main__":
    # Run the module's own copy (kernel modules register with `monitor.dsp.jit`, not __main__).
    from monitor.dsp.jit import main as jit_main

    sys.exit(jit_main())
