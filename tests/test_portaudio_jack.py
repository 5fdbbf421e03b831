"""The real capture path: JACK (dummy driver) -> PortAudio -> MicSource callback -> ring.

A JACK client plays a known recording into PortAudio's capture port; what
arrives in the ring must be that recording, sample for sample. Needs `jackd`
(Debian jackd2); skipped with the reason shown by `-ra` if it is missing, or
failed when AUDIO_MONITOR_REQUIRE_JACK=1 (CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

try:
    from tests.jack_server import jack_server, portaudio_on, require_jackd
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from jack_server import jack_server, portaudio_on, require_jackd  # type: ignore[no-redef]

from monitor.sources import MicSource

RATE = 16000
REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AUDIO_MONITOR_DATA", REPO.parent / "shared" / "data"))
CLIP = DATA / "safe" / "fall" / "01-020-02-073-01.flac"  # a real 3 s, 16 kHz mono recording


def _reference_clip() -> np.ndarray:
    """The real recording if the data set is beside the repo, else a seeded noise burst train."""
    if CLIP.is_file():
        clip, rate = sf.read(CLIP, dtype="float32")
        assert rate == RATE and clip.ndim == 1
        return np.ascontiguousarray(clip)
    rng = np.random.default_rng(1234)
    env = np.repeat(rng.uniform(0.05, 0.5, size=30), RATE // 10)
    return (rng.standard_normal(env.shape[0]) * env).astype(np.float32)


class _Player:
    """A JACK client that plays `clip` once into its output port after `arm()`, silence otherwise."""

    def __init__(self, server_name: str, clip: np.ndarray) -> None:
        import jack

        self.clip = clip
        self.pos = 0
        self.armed = False
        self.client = jack.Client("am-player", servername=server_name, no_start_server=True)
        self.port = self.client.outports.register("out")
        self.client.set_process_callback(self._process)

    def _process(self, frames: int) -> None:
        buf = self.port.get_array()
        n = 0
        if self.armed:
            n = min(frames, self.clip.shape[0] - self.pos)
            buf[:n] = self.clip[self.pos : self.pos + n]
            self.pos += n
        buf[n:] = 0.0

    def portaudio_inputs(self) -> list[str]:
        ports = self.client.get_ports(is_audio=True, is_input=True)
        return sorted(p.name for p in ports if p.name.startswith("PortAudio:"))


def _normalised_xcorr(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Correlation coefficient of `ref` with every window of `x` (valid lags only)."""
    from scipy import signal

    x64, r64 = x.astype(np.float64), ref.astype(np.float64)
    num = signal.correlate(x64, r64, mode="valid", method="fft")
    csum = np.concatenate([[0.0], np.cumsum(x64 * x64)])
    win = csum[r64.shape[0] :] - csum[: -r64.shape[0]]
    return num / np.sqrt(np.maximum(win, 1e-20) * np.dot(r64, r64))


def test_capture_through_portaudio_jack_is_bit_exact(tmp_path: Path) -> None:
    clip = _reference_clip()
    name = f"amtest{os.getpid()}"
    with jack_server(name, rate=RATE, period=160, log_dir=tmp_path) as server, portaudio_on(server):
        mic = MicSource("system", sample_rate=RATE, channels=2, ring_seconds=2.0, block_ms=10)
        assert "JACK" in mic.description and mic.sample_rate == RATE and mic.channels == 2
        player = _Player(server.name, clip)
        captured = np.zeros(RATE * 2 * 12, dtype=np.float32)
        count = 0
        mic.start()
        try:
            player.client.activate()
            inputs = player.portaudio_inputs()
            assert len(inputs) == 2, inputs
            for dst in inputs:  # PortAudio auto-connects system:capture_N; cut those
                for src in player.client.get_all_connections(dst):
                    player.client.disconnect(src, dst)
            player.client.connect(player.port, inputs[0])  # left channel only
            time.sleep(0.2)
            player.armed = True
            deadline = time.monotonic() + clip.shape[0] / RATE + 10.0
            tail_until = None
            # Drain the ring like the consumer thread does, until 0.5 s after the clip ended.
            while time.monotonic() < deadline:
                count += mic.ring.readinto(captured[count:], multiple_of=2)
                mic.poll(time.monotonic())
                if tail_until is None and player.pos >= clip.shape[0]:
                    tail_until = time.monotonic() + 0.5
                if tail_until is not None and time.monotonic() > tail_until:
                    break
                time.sleep(0.05)
            count += mic.ring.readinto(captured[count:], multiple_of=2)
        finally:
            player.client.deactivate()
            player.client.close()
            mic.stop()

    assert player.pos == clip.shape[0], "player did not finish: JACK did not run"
    frames = captured[:count].reshape(-1, 2)
    left, right = frames[:, 0], frames[:, 1]
    assert left.shape[0] >= clip.shape[0]
    corr = _normalised_xcorr(left, clip)
    lag = int(np.argmax(corr))
    # One peak over the whole clip: no sample dropped or inserted anywhere inside it.
    assert corr[lag] > 0.99, f"peak correlation {corr[lag]:.4f} at lag {lag}"
    # Float32 all the way through JACK and PortAudio: bit-exact at the aligned lag.
    np.testing.assert_array_equal(left[lag : lag + clip.shape[0]], clip)
    # Silence before arming and after the end; the unconnected right channel is silent.
    assert not np.any(left[:lag]) and not np.any(left[lag + clip.shape[0] :])
    assert left.shape[0] - lag - clip.shape[0] >= RATE // 4, "tail after the clip missing"
    assert not np.any(right)
    assert mic.ring.overrun_samples == 0 and mic.counters.input_overflow == 0
    assert mic.counters.callbacks > 0 and mic.counters.errors == 0
    assert mic.last_error is None
