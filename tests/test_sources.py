"""Sources: file and stdin deliver exactly their samples; errors are one line, never raised late."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from monitor.capture.mic import MicSource
from monitor.capture.sources import FileSource, Source, StdinSource, parse_source
from monitor.config import data_dir
from monitor.errors import AudioDeviceError, ConfigError, SourceError

REPO = Path(__file__).resolve().parents[1]
DATA = data_dir()
CLIP = DATA / "safe" / "fall" / "01-065-01-005-01.flac"  # a real 3 s, 16 kHz mono recording


def _real_clip() -> tuple[np.ndarray, int]:
    """A real recording if the data set is beside the repo, else a seeded noise burst train."""
    if CLIP.is_file():
        clip, rate = sf.read(CLIP, dtype="float32")
        return np.ascontiguousarray(clip), int(rate)
    rng = np.random.default_rng(7)
    env = np.repeat(rng.uniform(0.05, 0.5, size=30), 1600)
    return (rng.standard_normal(env.shape[0]) * env).astype(np.float32), 16000


def _drain(source: Source, *, timeout: float = 30.0) -> np.ndarray:
    """Read the ring like the consumer thread does until the source is exhausted and empty."""
    out = np.zeros(source.ring.capacity * 64, dtype=np.float32)
    count = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = source.exhausted  # read before draining: every write happened before it
        count += source.ring.readinto(out[count:], multiple_of=source.channels)
        if done and source.ring.available() < source.channels:
            return out[:count]
        time.sleep(0.002)
    raise AssertionError(f"source not exhausted within {timeout} s")


@pytest.fixture
def stereo_wav(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """The real clip as a 16-bit stereo WAV (right = -0.5 * left) and its exact decoded frames."""
    clip, rate = _real_clip()
    frames = np.stack([clip, -0.5 * clip], axis=1)
    path = tmp_path / "clip.wav"
    sf.write(path, frames, rate, subtype="PCM_16")
    decoded, _ = sf.read(path, dtype="float32", always_2d=True)
    return path, decoded


def test_file_source_fast_delivers_every_sample(stereo_wav: tuple[Path, np.ndarray]) -> None:
    path, expected = stereo_wav
    # A ring far smaller than the file: fast mode must wait for space, never drop.
    src = FileSource(path, realtime=False, ring_seconds=0.05, block_ms=10)
    assert src.sample_rate == 16000 and src.channels == 2
    assert src.ring.capacity == 2048  # 0.05 s * 16000 * 2 = 1600 -> next power of 2
    assert "clip.wav" in src.description and "16000 Hz, 2 ch" in src.description
    src.start()
    got = _drain(src)
    src.stop()
    np.testing.assert_array_equal(got, expected.reshape(-1))
    assert src.ring.overrun_samples == 0
    assert src.last_error is None and src.counters.errors == 0
    assert src.frames_read == expected.shape[0]


def test_file_source_realtime_delivers_in_order(tmp_path: Path) -> None:
    clip, rate = _real_clip()
    part = clip[: rate // 4]  # 0.25 s keeps the paced test short
    path = tmp_path / "part.flac"
    sf.write(path, part, rate, subtype="PCM_16")
    expected, _ = sf.read(path, dtype="float32")
    src = FileSource(path, realtime=True, ring_seconds=1.0, block_ms=20)
    src.start()
    got = _drain(src)
    src.stop()
    np.testing.assert_array_equal(got, expected)
    assert src.ring.overrun_samples == 0 and src.last_error is None


def test_file_source_stop_mid_file_is_prompt(stereo_wav: tuple[Path, np.ndarray]) -> None:
    path, _ = stereo_wav
    src = FileSource(path, realtime=True, ring_seconds=10.0, block_ms=10)
    src.start()
    time.sleep(0.05)
    src.stop()
    src.stop()  # idempotent
    assert src._thread is not None and not src._thread.is_alive()
    assert src.frames_read < 48000  # a 3 s file, paced in real time
    assert src.exhausted  # the thread has finished writing


@pytest.mark.parametrize(("suffix", "subtype"), [("flac", "PCM_16"), ("wav", "PCM_16"),
                                               ("wav", "FLOAT")])
def test_truncated_file_ends_with_one_line_naming_read_of_promised(
        tmp_path: Path, suffix: str, subtype: str) -> None:
    """Cut in transfer: a FLAC's decoder notices; a WAV reads cleanly to the cut (libsndfile
    trusts the file's length), so its header's promise is checked. Same line for both."""
    clip, rate = _real_clip()
    good = tmp_path / f"good.{suffix}"
    sf.write(good, clip, rate, subtype=subtype)
    data = good.read_bytes()
    bad = tmp_path / f"truncated.{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    src = FileSource(bad, realtime=False, ring_seconds=0.5, block_ms=10)
    src.start()
    got = _drain(src)  # must not raise, must end
    src.stop()
    assert src.exhausted
    assert src.last_error is not None and "\n" not in src.last_error
    assert src.last_error.startswith(f"{bad}: ended after {src.frames_read} of {clip.shape[0]} "
                                     "frames the header promised"), src.last_error
    assert src.counters.errors == 1
    # What decoded before the damage is the real audio, in order.
    decoded, _ = sf.read(good, dtype="float32")
    assert 0 < got.shape[0] < decoded.shape[0]
    np.testing.assert_array_equal(got, decoded[: got.shape[0]])


def test_whole_wav_and_streamed_wav_are_not_called_truncated(tmp_path: Path) -> None:
    clip, rate = _real_clip()
    whole = tmp_path / "whole.wav"
    sf.write(whole, clip[:rate], rate, subtype="PCM_16")
    streamed = tmp_path / "streamed.wav"  # a WAV written to a pipe: size fields 0xFFFFFFFF
    data = bytearray(whole.read_bytes())
    data[4:8] = data[40:44] = b"\xff\xff\xff\xff"
    assert data[36:40] == b"data"
    streamed.write_bytes(bytes(data))
    for path in (whole, streamed):
        src = FileSource(path, realtime=False, ring_seconds=0.5, block_ms=10)
        src.start()
        assert _drain(src).shape[0] == rate
        src.stop()
        assert src.last_error is None, src.last_error


def test_file_source_open_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.wav"
    with pytest.raises(SourceError, match=r"nope\.wav: no such file"):
        FileSource(missing, realtime=False, ring_seconds=1.0, block_ms=10)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all" * 64)
    with pytest.raises(SourceError, match=r"garbage\.wav: .*recogni") as info:
        FileSource(garbage, realtime=False, ring_seconds=1.0, block_ms=10)
    assert "\n" not in str(info.value)


def _pcm(n_samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pcm = rng.integers(-32768, 32768, size=n_samples, dtype=np.int16)
    pcm[:4] = [-32768, 32767, 0, -1]  # the extremes convert exactly
    return pcm


def test_stdin_source_reads_a_real_pipe_with_odd_splits() -> None:
    pcm = _pcm(16000 * 2 + 6, seed=3)  # 1 s of stereo plus 3 frames
    payload = pcm.astype("<i2").tobytes() + b"\x7f"  # and a trailing odd byte
    rfd, wfd = os.pipe()

    def feed() -> None:
        view = memoryview(payload)
        pos = 0
        for size in [1, 3, 1001, 7, 4096] * 1000:  # odd sizes split samples across reads
            if pos >= len(view):
                break
            pos += os.write(wfd, view[pos : pos + size])
        os.close(wfd)

    with os.fdopen(rfd, "rb", buffering=0) as stream:
        src = StdinSource(sample_rate=16000, channels=2, stream=stream, ring_seconds=0.1,
                          block_ms=10)
        assert src.channels == 2 and src.ring.capacity == 4096
        writer = threading.Thread(target=feed, name="test-pipe-writer")
        src.start()
        writer.start()
        got = _drain(src)
        writer.join(10)
        src.stop()
    np.testing.assert_array_equal(got, pcm.astype(np.float32) / 32768.0)
    assert got.min() == -1.0 and got.max() == np.float32(32767 / 32768)
    assert src.bytes_read == len(payload)
    assert src.ring.overrun_samples == 0 and src.last_error is None


def test_stdin_source_stop_while_pipe_idle() -> None:
    rfd, wfd = os.pipe()
    with os.fdopen(rfd, "rb", buffering=0) as stream:
        src = StdinSource(sample_rate=8000, stream=stream, ring_seconds=1.0, block_ms=20)
        src.start()
        os.write(wfd, _pcm(100, seed=1).tobytes())
        time.sleep(0.05)
        src.stop()  # the reader is blocked waiting for data: select() lets it see the stop
        assert src._thread is not None and not src._thread.is_alive()
        out = np.zeros(200, dtype=np.float32)
        assert src.ring.readinto(out) == 100
    os.close(wfd)


def test_stdin_source_from_a_file_object_without_fileno() -> None:
    pcm = _pcm(3000, seed=5)
    src = StdinSource(sample_rate=16000, stream=io.BytesIO(pcm.tobytes()), ring_seconds=0.05,
                      block_ms=10)
    src.start()
    got = _drain(src)
    src.stop()
    np.testing.assert_array_equal(got, pcm / np.float32(32768.0))


def test_stdin_source_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="-5"):
        StdinSource(sample_rate=-5, stream=io.BytesIO(b""), ring_seconds=1.0, block_ms=10)
    with pytest.raises(ConfigError, match="channels"):
        StdinSource(sample_rate=16000, channels=0, stream=io.BytesIO(b""), ring_seconds=1.0,
                    block_ms=10)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("mic", ("mic", None)),
        ("mic:USB Audio", ("mic", "USB Audio")),
        ("mic:2", ("mic", "2")),
        ("file:/tmp/a b.wav", ("file", "/tmp/a b.wav")),
        ("file:C:/x.wav", ("file", "C:/x.wav")),
        ("stdin", ("stdin", None)),
    ],
)
def test_parse_source_accepts(spec: str, expected: tuple[str, str | None]) -> None:
    assert parse_source(spec) == expected


@pytest.mark.parametrize("spec", ["", "microphone", "mic:", "file:", "file", "stdin:x", "alsa:hw0"])
def test_parse_source_rejects_with_allowed_forms(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_source(spec)
    message = str(info.value)
    assert repr(spec) in message and "'mic:NAME-OR-INDEX'" in message and "'file:PATH'" in message


def test_mic_source_bad_device_name_is_one_useful_line() -> None:
    with pytest.raises(AudioDeviceError) as info:
        MicSource("no-such-microphone-xyz", ring_seconds=1.0, block_ms=10)
    message = str(info.value)
    assert "'no-such-microphone-xyz'" in message
    assert "audio-monitor devices" in message
    assert "\n" not in message
    with pytest.raises(AudioDeviceError, match="index 999 not found"):
        MicSource(999, ring_seconds=1.0, block_ms=10)
