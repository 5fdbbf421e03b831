"""Downmix and StreamingResampler: streaming equals one-shot, and the filter does its job."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from monitor.dsp.resample import StreamingResampler, downmix_into, kaiser_lowpass

RATES = [(48000, 16000), (44100, 16000), (8000, 16000), (22050, 16000)]


def _one_shot(rs: StreamingResampler, x: np.ndarray) -> np.ndarray:
    out = np.zeros(rs.max_output(x.shape[0]), dtype=np.float32)
    n = rs.process(x, out)
    return out[:n]


def _chunked(rs: StreamingResampler, x: np.ndarray, sizes: list[int]) -> np.ndarray:
    out = np.zeros(rs.max_output(x.shape[0]) + 16, dtype=np.float32)
    piece = np.zeros(rs.max_output(max(sizes)) + 1, dtype=np.float32)
    written = 0
    pos = 0
    i = 0
    while pos < x.shape[0]:
        n_in = min(sizes[i % len(sizes)], x.shape[0] - pos)
        n = rs.process(x[pos : pos + n_in], piece)
        assert n <= rs.max_output(n_in)
        out[written : written + n] = piece[:n]
        written += n
        pos += n_in
        i += 1
    return out[:written]


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.3).astype(np.float32)


@pytest.mark.parametrize(("in_rate", "out_rate"), RATES)
@pytest.mark.parametrize("chunk", [1, 7, 160, 4096, "random"])
def test_chunked_equals_one_shot(in_rate: int, out_rate: int, chunk: int | str) -> None:
    x = _noise(in_rate // 2 + 13)
    whole = _one_shot(StreamingResampler(in_rate, out_rate, max_block=x.shape[0]), x)
    assert whole.shape[0] == -(-x.shape[0] * out_rate // in_rate)
    sizes = (
        [int(v) for v in np.random.default_rng(5).integers(1, 3000, size=64)]
        if chunk == "random"
        else [int(chunk)]
    )
    # max_block smaller than some chunks: process() must split internally.
    rs = StreamingResampler(in_rate, out_rate, max_block=1024)
    parts = _chunked(rs, x, sizes)
    np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-6)


def test_reset_restarts_stream() -> None:
    rs = StreamingResampler(44100, 16000, max_block=512)
    x = _noise(5000, seed=3)
    first = _one_shot(rs, x)
    _one_shot(rs, _noise(777, seed=4))
    rs.reset()
    np.testing.assert_array_equal(_one_shot(rs, x), first)


def test_identity_is_a_copy() -> None:
    rs = StreamingResampler(16000, 16000, max_block=160)
    assert rs.identity and rs.delay_out == 0
    x = _noise(1000)
    np.testing.assert_array_equal(_one_shot(rs, x), x)


def test_out_too_small_is_rejected() -> None:
    rs = StreamingResampler(8000, 16000, max_block=160)
    with pytest.raises(ValueError, match="320 needed"):
        rs.process(np.zeros(160, dtype=np.float32), np.zeros(100, dtype=np.float32))


@pytest.mark.parametrize(("in_rate", "out_rate"), RATES)
def test_sine_keeps_frequency_and_amplitude(in_rate: int, out_rate: int) -> None:
    t = np.arange(in_rate * 2) / in_rate
    x = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    y = _one_shot(StreamingResampler(in_rate, out_rate, max_block=4096), x)
    seg = y[out_rate // 4 : out_rate // 4 + out_rate].astype(np.float64)  # 1 s, away from edges
    spec = np.abs(np.fft.rfft(seg * np.hanning(seg.shape[0])))
    assert np.argmax(spec) == 1000  # 1 Hz bins over exactly one second
    rms_db = 20 * np.log10(np.sqrt(np.mean(seg**2)) / (0.5 / np.sqrt(2)))
    assert abs(rms_db) < 0.5


@pytest.mark.parametrize(("in_rate", "tone"), [(48000, 10000.0), (44100, 10000.0), (22050, 9500.0)])
def test_tone_above_new_nyquist_is_attenuated(in_rate: int, tone: float) -> None:
    t = np.arange(in_rate * 2) / in_rate
    x = (0.5 * np.sin(2 * np.pi * tone * t)).astype(np.float32)
    y = _one_shot(StreamingResampler(in_rate, 16000, max_block=4096), x)
    seg = y[4000:28000].astype(np.float64)
    atten_db = 20 * np.log10(np.sqrt(np.mean(seg**2)) / (0.5 / np.sqrt(2)))
    assert atten_db < -40.0


@pytest.mark.parametrize(("in_rate", "out_rate"), RATES)
def test_matches_scipy_resample_poly_after_delay(in_rate: int, out_rate: int) -> None:
    x = _noise(in_rate, seed=9)
    rs = StreamingResampler(in_rate, out_rate, max_block=777)
    y = _chunked(rs, x, [333])
    ref = signal.resample_poly(x.astype(np.float64), rs.up, rs.down)
    d = rs.delay_out
    m = y.shape[0] - d
    assert m > 0.9 * ref.shape[0]
    a, b = y[d:].astype(np.float64), ref[:m]
    corr = np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b))
    assert corr > 0.999
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_downmix_into_means_channels() -> None:
    frames = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = np.full(5, -1.0, dtype=np.float32)
    assert downmix_into(frames.reshape(-1), 3, out) == 4
    np.testing.assert_allclose(out[:4], frames.mean(axis=1))
    assert out[4] == -1.0
    mono = np.arange(5, dtype=np.float32)
    assert downmix_into(mono, 1, out) == 5
    np.testing.assert_array_equal(out, mono)
    # Trailing partial frame is ignored; a too-small out is an error, not a silent cut.
    assert downmix_into(np.ones(7, dtype=np.float32), 2, out) == 3
    with pytest.raises(ValueError):
        downmix_into(np.ones(20, dtype=np.float32), 2, out)


@pytest.mark.parametrize(("numtaps", "max_rate"), [(61, 3), (2 * 10 * 160 + 1, 160)])
def test_filter_design_is_scipys(numtaps: int, max_rate: int) -> None:
    from scipy.signal import firwin

    expected = firwin(numtaps, 1.0 / max_rate, window=("kaiser", 5.0))
    np.testing.assert_allclose(kaiser_lowpass(numtaps, 1.0 / max_rate, 5.0), expected,
                               rtol=0, atol=1e-12)
