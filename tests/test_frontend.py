"""Front end: streaming equals offline for every chunking, agrees with librosa and TF's formula."""

import glob
import math
import tracemalloc

import librosa
import numpy as np
import pytest
import soundfile as sf

from monitor.dsp.frontend import (
    Frontend,
    FrontendParams,
    hann_periodic,
    logmel_of,
    mel_filterbank,
    offline_logmel,
)
from monitor.errors import ConfigError

DEFAULT = FrontendParams()
OTHER = FrontendParams(
    sample_rate=22050, n_fft=1024, n_mels=40, magnitude="power", hop_ms=5.0, fmax_hz=11025.0
)
CHUNKS = (1, 2, 3, 159, 160, 161, 400, 1000, 4096)


def _clip(folder: str, seconds: float) -> np.ndarray:
    files = sorted(glob.glob(f"/work/shared/data/{folder}/*.flac"))
    if not files:
        pytest.skip(f"no recordings in /work/shared/data/{folder}")
    x, sr = sf.read(files[0], dtype="float32", always_2d=True)
    assert sr == 16000
    return np.ascontiguousarray(x[: int(seconds * sr), 0])


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.3).astype(np.float32)


def _stream(fe: Frontend, x: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Feed x in chunks of the given sizes (cycled) and stack every frame written."""
    out = np.empty((fe.max_frames(max(sizes)), fe.n_mels), dtype=np.float32)
    rows, i, k = [], 0, 0
    while i < x.shape[0]:
        chunk = x[i : i + sizes[k % len(sizes)]]
        n = fe.process(chunk, out)
        assert n <= fe.max_frames(chunk.shape[0])
        rows.append(out[:n].copy())
        i += chunk.shape[0]
        k += 1
    return np.concatenate(rows) if rows else np.zeros((0, fe.n_mels), np.float32)


def _signals() -> dict[str, np.ndarray]:
    return {
        "cough": _clip("cough", 1.5),
        "fall": _clip("safe/fall", 1.5),
        "noise": _noise(24000),
    }


@pytest.mark.parametrize("name", ["cough", "fall", "noise"])
def test_streaming_equals_offline_for_every_chunking(name: str) -> None:
    x = _signals()[name]
    ref = offline_logmel(x, DEFAULT)
    assert ref.shape == ((x.shape[0] - 400) // 160 + 1, 64)
    assert np.ptp(ref) > 1.0  # the signal is not trivially flat
    whole = logmel_of(x, DEFAULT)
    np.testing.assert_allclose(whole, ref, rtol=0, atol=1e-4)
    rng = np.random.default_rng(7)
    patterns = [[c] for c in CHUNKS] + [list(rng.integers(0, 700, size=50))]
    fe = Frontend(DEFAULT)
    for sizes in patterns:
        fe.reset()
        got = _stream(fe, x, [int(s) for s in sizes])
        assert got.shape == ref.shape, sizes
        np.testing.assert_array_equal(got, whole, err_msg=str(sizes))  # bitwise
        assert fe.frames_emitted == ref.shape[0]


def test_pieces_longer_than_max_block_are_split_internally() -> None:
    x = _noise(9000, seed=3)
    fe = Frontend(OTHER, max_block=37)
    got = _stream(fe, x, [4096])
    np.testing.assert_allclose(got, offline_logmel(x, OTHER), rtol=0, atol=1e-4)


def test_float64_and_strided_input_give_the_same_frames() -> None:
    x = _noise(5000, seed=4)
    ref = logmel_of(x, DEFAULT)
    np.testing.assert_array_equal(logmel_of(x.astype(np.float64), DEFAULT), ref)
    stereo = np.stack([x, -x], axis=1)
    np.testing.assert_array_equal(logmel_of(stereo[:, 0], DEFAULT), ref)


@pytest.mark.parametrize("params", [DEFAULT, OTHER], ids=["yamnet", "other"])
def test_agrees_with_librosa_stft(params: FrontendParams) -> None:
    x = _noise(12000, seed=5)
    win, nfft = params.win_length, params.n_fft
    window = np.zeros(nfft)
    window[:win] = hann_periodic(win)
    assert np.allclose(window[:win], librosa.filters.get_window("hann", win, fftbins=True))
    stft = librosa.stft(
        x.astype(np.float64), n_fft=nfft, hop_length=params.hop_length, window=window,
        center=False,
    )  # fmt: skip
    spec = np.abs(stft) ** (2 if params.magnitude == "power" else 1)
    ref = np.log(mel_filterbank(params).astype(np.float64) @ spec + params.log_offset).T
    ours = logmel_of(x, params)
    # librosa frames need n_fft samples, ours only win; compare the frames both have.
    assert ours.shape[0] >= ref.shape[0] > 10
    np.testing.assert_allclose(ours[: ref.shape[0]], ref, rtol=0, atol=1e-4)


def _tf_mel_matrix(n_mels: int, n_bins: int, sr: float, lo: float, hi: float) -> np.ndarray:
    """TF linear_to_mel_weight_matrix written again, loop by loop, as (n_bins, n_mels)."""
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    edges = [mel(lo) + i * (mel(hi) - mel(lo)) / (n_mels + 1) for i in range(n_mels + 2)]
    w = np.zeros((n_bins, n_mels))
    for b in range(1, n_bins):  # bands_to_zero = 1: the DC bin stays 0
        m = mel(b * (sr / 2) / (n_bins - 1))
        for j in range(n_mels):
            left, center, right = edges[j], edges[j + 1], edges[j + 2]
            lower = (m - left) / (center - left)
            upper = (right - m) / (right - center)
            w[b, j] = max(0.0, min(lower, upper))
    return w


@pytest.mark.parametrize(
    "params",
    [DEFAULT, OTHER, FrontendParams(sample_rate=8000, n_fft=512, fmin_hz=0.0, fmax_hz=4000.0)],
    ids=["yamnet", "other", "from-dc"],
)
def test_filterbank_equals_tf_formula(params: FrontendParams) -> None:
    fb = mel_filterbank(params)
    assert fb.shape == (params.n_mels, params.n_fft // 2 + 1)
    assert fb.dtype == np.float32
    tf = _tf_mel_matrix(
        params.n_mels, params.n_bins, params.sample_rate, params.fmin_hz, params.fmax_hz
    )
    np.testing.assert_allclose(fb.T, tf, rtol=0, atol=1e-6)
    assert not fb[:, 0].any()  # TF zeroes the DC bin even when fmin is 0
    assert mel_filterbank(params) is fb  # cached
    assert not fb.flags.writeable
    # Triangles overlap pairwise, so each bin feeds at most two mels (~2 MACs per bin).
    assert np.count_nonzero(fb, axis=0).max() <= 2


def test_non_default_params_match_the_oracle() -> None:
    x = _noise(20000, seed=6)
    for params in (
        OTHER,
        FrontendParams(window_ms=32.0, hop_ms=32.0, n_fft=512),  # hop == win == n_fft
        FrontendParams(sample_rate=8000, window_ms=30.0, hop_ms=7.5, n_fft=256, n_mels=20,
                       fmin_hz=0.0, fmax_hz=4000.0, log_offset=1e-6),
    ):  # fmt: skip
        ref = offline_logmel(x, params)
        got = _stream(Frontend(params), x, [333, 1, 2048])
        n_frames = (x.shape[0] - params.win_length) // params.hop_length + 1
        assert got.shape == ref.shape == (n_frames, params.n_mels)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sample_rate", 0),
        ("sample_rate", 16000.0),
        ("window_ms", -1.0),
        ("hop_ms", 0.0),
        ("hop_ms", 30.0),  # longer than the window
        ("n_fft", 500),  # not a power of 2
        ("n_fft", 256),  # shorter than the 400-sample window
        ("n_mels", 0),
        ("fmin_hz", 8000.0),  # >= fmax
        ("fmax_hz", 9000.0),  # above Nyquist
        ("log_offset", 0.0),
        ("magnitude", "db"),
        ("mel_scale", "slaney"),
    ],
)
def test_bad_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^frontend\.{field}="):
        FrontendParams(**{field: value}).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=rf"^cfg\.fe\.{field}="):
        FrontendParams.from_dict({field: value}, where="cfg.fe")
    with pytest.raises(ConfigError, match=rf"{field}="):
        Frontend(FrontendParams(**{field: value}))  # type: ignore[arg-type]


def test_from_dict_round_trip_unknown_key_and_hash() -> None:
    assert FrontendParams.from_dict(OTHER.to_dict(), where="x") == OTHER
    assert FrontendParams.from_dict({}, where="x") == DEFAULT
    with pytest.raises(ConfigError, match=r"^cfg\.fe\.nfft: unknown key"):
        FrontendParams.from_dict({"nfft": 512}, where="cfg.fe")
    h = DEFAULT.hash()
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == FrontendParams().hash() == FrontendParams(window_ms=25).hash()
    assert h != FrontendParams(n_mels=63).hash()
    assert DEFAULT.win_length == 400 and DEFAULT.hop_length == 160


def test_no_allocation_per_hop() -> None:
    fe = Frontend(DEFAULT)
    x = _noise(DEFAULT.hop_length, seed=8)
    out = np.empty((fe.max_frames(x.shape[0]), fe.n_mels), dtype=np.float32)
    for _ in range(10):
        fe.process(x, out)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        written = 0
        for _ in range(1000):
            written += fe.process(x, out)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written == 1000
    # Nothing kept: 1000 hops leave no trace. Nothing sized by the signal either: the transient
    # peak is numba's argument boxing for one call (~50 B per argument), far below one frame's
    # scratch (a 400-sample window is 1.6 kB, the FFT scratch 4 kB).
    assert current - base < 100, (base, current, peak)
    assert peak - base < 1024, (base, current, peak)


def test_silence_gives_log_offset() -> None:
    got = logmel_of(np.zeros(4000, dtype=np.float32), DEFAULT)
    assert got.shape == (23, 64)
    np.testing.assert_allclose(got, np.log(0.001), rtol=0, atol=1e-6)


def test_frames_emitted_follows_samples_fed() -> None:
    fe = Frontend(DEFAULT)
    out = np.empty((fe.max_frames(1000), fe.n_mels), dtype=np.float32)
    rng = np.random.default_rng(9)
    fed = 0
    for size in rng.integers(0, 1000, size=60):
        n = fe.process(_noise(int(size)), out)
        fed += int(size)
        assert fe.frames_emitted == max(0, (fed - 400) // 160 + 1)
        assert n <= fe.max_frames(int(size))
    fe.reset()
    assert fe.frames_emitted == 0
    assert fe.process(_noise(399), out) == 0
    assert fe.process(_noise(1), out) == 1


def test_out_too_small_or_wrong_is_refused() -> None:
    fe = Frontend(DEFAULT)
    with pytest.raises(ValueError, match="expected float32"):
        fe.process(_noise(800), np.empty((2, 64), dtype=np.float32))  # needs 3
    with pytest.raises(ValueError, match="expected float32"):
        fe.process(_noise(800), np.empty((5, 64), dtype=np.float64))
    with pytest.raises(ValueError, match="expected 1-D"):
        fe.process(np.zeros((2, 400), np.float32), np.empty((5, 64), dtype=np.float32))
    assert fe.frames_emitted == 0
