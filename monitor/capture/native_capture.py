"""The PortAudio input callback in C: it copies into the ring without entering Python.

A Python callback costs each audio period a GIL acquisition from PortAudio's thread (which
waits while the processing thread holds the GIL, the one lock left between capture and
processing) plus the interpreter's own overhead: ~0.5 % of a core at 100 callbacks a
second on a small board. This callback does what `MicSource._callback` does (copy into
the SPSC ring, drop and count what does not fit, count callbacks and status flags, ring
the reader's doorbell) in a few lines of C, with C11 acquire/release on the ring indices.

`python -m monitor.capture.native_capture` (run by `scripts/setup.sh`, beside the ahead-of-time
kernels) compiles it with cffi into the extension `monitor/capture/_native_capture`. It is used
only if it was built from this file's C source (its sha256 is compiled in) and
AUDIO_MONITOR_PYTHON_CAPTURE is not "1"; otherwise capture uses the Python callback.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

__all__ = ["STATE_FIELDS", "Capture", "build", "load"]

MODULE = "monitor.capture._native_capture"
PYTHON_CAPTURE_ENV = "AUDIO_MONITOR_PYTHON_CAPTURE"  # "1": ignore the C callback

STATE_FIELDS = ("write_index", "read_index", "wake_at", "wait_number", "rung_number",
                "doorbell_fd", "overrun_samples", "overrun_events")
"""The int64 slots shared by the ring's writer and reader (`SpscRingBuffer._state`)."""

CDEF = """
typedef struct {
    float *buf;
    int64_t *state;
    int64_t *counters;
    int64_t capacity;
    int64_t channels;
} am_capture;
int am_capture_callback(const void *input, void *output, unsigned long frames,
                        const void *time_info, unsigned long flags, void *user);
void am_acquire_fence(void);
void am_release_fence(void);
void am_full_fence(void);
const char *am_source_digest(void);
"""

C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <unistd.h>

enum { WRITE_INDEX, READ_INDEX, WAKE_AT, WAIT_NUMBER, RUNG_NUMBER, DOORBELL_FD,
       OVERRUN_SAMPLES, OVERRUN_EVENTS };                /* STATE_FIELDS */
enum { CALLBACKS, INPUT_OVERFLOW, INPUT_UNDERFLOW };  /* Capture.counts() */

typedef struct {
    float *buf;          /* the ring's samples, `capacity` floats (a power of 2) */
    int64_t *state;      /* the ring's shared slots, indexed by the first enum */
    int64_t *counters;   /* written here only, indexed by the second enum */
    int64_t capacity;
    int64_t channels;    /* interleaved samples per frame */
} am_capture;

/* PortAudio's PaStreamCallback: copy, count, maybe ring; never block, allocate or lock. */
int am_capture_callback(const void *input, void *output, unsigned long frames,
                        const void *time_info, unsigned long flags, void *user)
{
    am_capture *c = (am_capture *)user;
    int64_t *s = c->state;
    (void)output; (void)time_info;
    c->counters[CALLBACKS] += 1;
    if (flags & 0x1) c->counters[INPUT_UNDERFLOW] += 1;  /* paInputUnderflow */
    if (flags & 0x2) c->counters[INPUT_OVERFLOW] += 1;   /* paInputOverflow */
    if (input == NULL) return 0;
    int64_t offered = (int64_t)frames * c->channels;
    int64_t w = s[WRITE_INDEX];  /* ours */
    int64_t r = __atomic_load_n(&s[READ_INDEX], __ATOMIC_ACQUIRE);
    int64_t n = c->capacity - (w - r);
    if (n > offered) n = offered;
    if (n > 0) {
        int64_t start = w & (c->capacity - 1);
        int64_t first = c->capacity - start < n ? c->capacity - start : n;
        memcpy(c->buf + start, input, (size_t)first * sizeof(float));
        if (n > first)
            memcpy(c->buf, (const float *)input + first, (size_t)(n - first) * sizeof(float));
        __atomic_store_n(&s[WRITE_INDEX], w + n, __ATOMIC_RELEASE);  /* after the copy */
        w += n;
    }
    /* Store index, load mark; the reader stores mark, loads index: neither may pass. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (n < offered) {
        s[OVERRUN_SAMPLES] += offered - (n > 0 ? n : 0);
        s[OVERRUN_EVENTS] += 1;
    }
    int64_t wait = __atomic_load_n(&s[WAIT_NUMBER], __ATOMIC_ACQUIRE);
    if (wait != s[RUNG_NUMBER] && w >= __atomic_load_n(&s[WAKE_AT], __ATOMIC_RELAXED)) {
        s[RUNG_NUMBER] = wait;
        char byte = 0;
        ssize_t ignored = write((int)s[DOORBELL_FD], &byte, 1);  /* non-blocking pipe */
        (void)ignored;  /* full: wake-ups are pending anyway */
    }
    return 0;  /* paContinue */
}

/* For the Python side of the ring, so its plain loads and stores order like C11's. */
void am_acquire_fence(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
void am_release_fence(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
void am_full_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
"""


def source_digest() -> str:
    return hashlib.sha256((CDEF + C_SOURCE).encode()).hexdigest()


def build(output_dir: Path | None = None) -> Path:
    """Compile the extension into `output_dir` (default: this package); returns its path."""
    import cffi

    ffibuilder = cffi.FFI()
    ffibuilder.cdef(CDEF)
    digest_function = f'\nconst char *am_source_digest(void) {{ return "{source_digest()}"; }}\n'
    ffibuilder.set_source(MODULE, C_SOURCE + digest_function,
                          extra_compile_args=["-O2", "-std=gnu11"])
    target = output_dir or Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as scratch:
        built = Path(ffibuilder.compile(tmpdir=scratch, verbose=False))
        destination = target / built.name
        os.replace(built, destination)
    return destination


def load() -> ModuleType | None:
    """The built extension if it matches this source and is not switched off; else None."""
    if os.environ.get(PYTHON_CAPTURE_ENV) == "1":
        return None
    return _fresh_module()


@functools.cache
def _fresh_module() -> ModuleType | None:
    try:
        module = importlib.import_module(MODULE)
    except ImportError:
        return None
    digest = module.ffi.string(module.lib.am_source_digest()).decode()
    return module if digest == source_digest() else None


class Capture:
    """The C callback bound to one ring: what `sounddevice` needs to open a stream with it,
    and the callback's counters.

    Keeps the C struct and the arrays it points into alive while a stream may call it.
    """

    def __init__(self, module: ModuleType, *, buf: np.ndarray, state: np.ndarray,
                 channels: int) -> None:
        ffi, lib = module.ffi, module.lib
        self._buf, self._state = buf, state
        self._counters = np.zeros(3, dtype=np.int64)
        self._struct = ffi.new("am_capture *")
        self._struct.buf = ffi.cast("float *", buf.ctypes.data)
        self._struct.state = ffi.cast("int64_t *", state.ctypes.data)
        self._struct.counters = ffi.cast("int64_t *", self._counters.ctypes.data)
        self._struct.capacity = buf.shape[0]
        self._struct.channels = channels
        self.callback = ffi.addressof(lib, "am_capture_callback")
        self.userdata = ffi.cast("void *", self._struct)

    def counts(self) -> tuple[int, int, int]:
        """(callbacks, input overflows, input underflows) so far."""
        callbacks, overflows, underflows = self._counters.tolist()
        return callbacks, overflows, underflows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitor.capture.native_capture",
        description="Compile the C capture callback (needs gcc and the Python headers).")
    parser.add_argument("--if-stale", action="store_true",
                        help="do nothing when the built extension matches the source")
    args = parser.parse_args(argv)
    if args.if_stale and _fresh_module() is not None:
        print("capture callback: up to date")
        return 0
    path = build()
    print(f"capture callback: compiled into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
