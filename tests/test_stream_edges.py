"""Stream edges: a sound at the very start or end of a stream is judged like any other.

The chain treats a stream as if digital silence came before and after it: a raw clip
must give exactly the scores of the same clip padded with silence, window for window,
and every window that holds real audio is scored, however short the stream.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_processor import Recorder

from monitor.config import load_config
from monitor.detect.detector import Detector
from monitor.pipeline.processor import Processor
from monitor.pipeline.results import NullSink

RATE = 16000
PAD = 2 * RATE  # 2 s: a whole number of hops and of strides (50 ms)


def processor(model: Path, sink: object, *, in_rate: int = RATE,
              stride_ms: float = 50.0) -> Processor:
    config = load_config(None, overrides={"model.stride_ms": stride_ms})
    return Processor.from_config(
        config, Detector(model), in_rate=in_rate, channels=1, max_block=4096,
        sink=sink)  # type: ignore[arg-type]


def run(model: Path, audio: np.ndarray, *, block: int = 4096) -> tuple[Recorder, Processor]:
    recorder = Recorder()
    chain = processor(model, recorder)
    for start in range(0, audio.shape[0], block):
        chain.process(audio[start:start + block])
    chain.finish()
    return recorder, chain


def real_clip(shared_data: Path) -> np.ndarray:
    """A real 1 s glass-break recording, 16 kHz mono."""
    path = sorted((shared_data / "glassbreak" / "glass_break").glob("*.flac"))[0]
    audio, rate = sf.read(str(path), dtype="float32")
    assert rate == RATE and audio.ndim == 1
    return audio


def holds_audio(end: int, length: int, chain: Processor, offset: int = 0) -> bool:
    """Whether the window ending at sample `end` has a frame holding a sample of
    [offset, offset + length)."""
    timing = chain.timing
    first_frame_start = end - timing.detector_window
    last_frame_start = end - timing.window
    return first_frame_start < offset + length and last_frame_start + timing.window > offset


@pytest.mark.parametrize("seconds", [0.02, 0.3, 0.7, 1.0])
def test_raw_clip_scores_exactly_as_the_clip_padded_with_silence(
        shared_data: Path, tiny_model: Path, seconds: float) -> None:
    clip = real_clip(shared_data)[:round(seconds * RATE)]
    silence = np.zeros(PAD, np.float32)
    raw, chain = run(tiny_model, clip, block=333)
    padded, _ = run(tiny_model, np.concatenate([silence, clip, silence]))
    assert raw.scores, "no window scored"
    by_end = {end: scores for end, scores in padded.scores}
    for end, scores in raw.scores:
        np.testing.assert_array_equal(scores, by_end[end + PAD], err_msg=f"window ending {end}")
    # Every padded window whose frames hold the clip's audio (beyond the first 240
    # samples, which only the frames straddling its start hold) was scored raw too.
    raw_ends = {end + PAD for end, _ in raw.scores}
    timing = chain.timing
    missing = [end for end, _ in padded.scores
               if holds_audio(end, clip.shape[0] - (timing.window - timing.hop), chain,
                              offset=PAD + timing.window - timing.hop)
               and end not in raw_ends]
    assert not missing
    # ... and no window without any of it.
    assert all(holds_audio(end - PAD, clip.shape[0], chain, offset=0) or end - PAD <= 0
               for end in raw_ends)


def test_a_stream_shorter_than_one_window_is_scored_and_decided(tiny_model: Path) -> None:
    """A loud 0.2 s burst alone: scored, published as an event with start and end."""
    rng = np.random.default_rng(0)
    burst = (0.5 * rng.standard_normal(RATE // 5)).astype(np.float32)
    recorder, chain = run(tiny_model, burst)
    assert chain.timing.detector_window > burst.shape[0]
    assert recorder.scores and max(s[0] for _, s in recorder.scores) > 0.5
    phases = [(t.label, t.phase) for t in recorder.transitions]
    assert phases == [("loud", "start"), ("loud", "end")]
    end = recorder.transitions[-1]
    assert end.offset is not None and 0 <= end.onset < end.offset <= burst.shape[0]


def test_empty_stream_scores_nothing(tiny_model: Path) -> None:
    recorder, chain = run(tiny_model, np.zeros(0, np.float32))
    assert recorder.scores == [] and recorder.transitions == [] and chain.windows == 0


def test_warm_up_restores_the_silent_start(shared_data: Path, tiny_model: Path) -> None:
    clip = real_clip(shared_data)
    fresh, _ = run(tiny_model, clip)
    recorder = Recorder()
    chain = processor(tiny_model, recorder)
    chain.warm_up()
    chain.process(clip)
    chain.finish()
    assert [e for e, _ in recorder.scores] == [e for e, _ in fresh.scores]
    for (_, a), (_, b) in zip(recorder.scores, fresh.scores, strict=True):
        np.testing.assert_array_equal(a, b)
    assert recorder.transitions == fresh.transitions


def test_padding_reaches_only_the_detector(tiny_model: Path) -> None:
    """The end-of-stream padding is scored, but the audio clock, levels and meter see only
    the real audio."""
    chain = processor(tiny_model, NullSink())
    audio = np.full(RATE // 2, 0.1, np.float32)
    chain.process(audio)
    levels = chain.meter.span.copy()
    chain.finish()
    assert chain.samples == audio.shape[0]
    np.testing.assert_array_equal(chain.meter.span, levels)
    assert chain.frames > audio.shape[0] // chain.timing.hop


REPO = Path(__file__).resolve().parents[1]
EVENTS = REPO / "models" / "events.onnx"
need_events = pytest.mark.skipif(not EVENTS.is_file(),
                                 reason="models/events.onnx absent: run `audio-monitor "
                                        "fetch-models`")


def _peak(audio: np.ndarray) -> int:
    """Sample at the centre of the loudest 50 ms of `audio`."""
    energy = np.convolve(audio.astype(np.float64) ** 2, np.ones(800), mode="same")
    return int(np.argmax(energy))


def _crops(shared_data: Path) -> list[tuple[str, np.ndarray]]:
    """Real event recordings in real everyday background, cut 0.3 s to 3 s long with the
    event's loudest moment at the start, the middle or the end of the cut."""
    def first(folder: str, n: int, max_s: float = 99.0) -> list[np.ndarray]:
        out = []
        for path in sorted((shared_data / folder).glob("*.flac")):
            audio, rate = sf.read(str(path), dtype="float32")
            if rate == RATE and audio.ndim == 1 and audio.shape[0] <= max_s * RATE:
                out.append(audio)
            if len(out) == n:
                break
        return out

    background = np.concatenate(first("glassbreak/background", 6))
    events = (first("glassbreak/glass_break", 2) + first("cough", 2, max_s=1.2)
              + first("safe/fall", 2))
    crops = []
    for k, clip in enumerate(events):
        context = np.concatenate([background[:3 * RATE], clip, background[3 * RATE:]])
        peak = 3 * RATE + _peak(clip)
        for seconds in (0.3, 1.0, 3.0):
            length = round(seconds * RATE)
            lead = RATE // 20  # the peak 50 ms inside the cut at either edge
            for where, start in (("start", peak - lead), ("middle", peak - length // 2),
                                 ("end", peak - length + lead)):
                crops.append((f"clip {k}, {seconds} s, event at the {where}",
                              context[start:start + length]))
    return crops


@need_events
def test_analyze_finds_the_same_in_a_raw_clip_as_in_the_clip_padded_with_silence(
        shared_data: Path, tmp_path: Path) -> None:
    """The shipped model through `analyze`: whatever it finds in a clip padded with 2 s of
    silence either side, it finds in the clip alone, for any model (the chain scores the
    same windows); the cuts are short and put the event right at an edge."""
    from monitor.apps.analyze import analyze

    config = load_config(None, overrides={"model.path": str(EVENTS)})
    detector = Detector(EVENTS)
    silence = np.zeros(PAD, np.float32)
    differ, found = [], 0
    for name, crop in _crops(shared_data):
        labels = []
        for audio in (crop, np.concatenate([silence, crop, silence])):
            path = tmp_path / "clip.wav"
            sf.write(str(path), audio, RATE, subtype="FLOAT")
            result = analyze(path, config=config, detector=detector)
            assert result.error is None
            labels.append(sorted({e.label for e in result.events}))
        found += bool(labels[1])
        if labels[0] != labels[1]:
            differ.append((name, labels))
    assert not differ
    assert found >= 18, f"only {found} of 54 cuts raised an event: the test shows nothing"


def test_analyze_names_a_short_file_and_a_truncated_one(shared_data: Path, config_file: Path,
                                                        tmp_path: Path) -> None:
    """One warning line each: what the file holds and what was done with it."""
    import subprocess
    import sys

    clip = real_clip(shared_data)
    short = tmp_path / "short.wav"
    sf.write(str(short), clip[:round(0.2 * RATE)], RATE, subtype="PCM_16")  # window: 0.255 s
    whole = tmp_path / "whole.wav"
    sf.write(str(whole), clip, RATE, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    data = whole.read_bytes()
    cut.write_bytes(data[:44 + 2 * RATE // 2])  # header + 0.5 s of the 1 s promised
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "analyze", "--config", str(config_file), str(short),
         str(cut), str(whole)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 2, result.stderr
    assert re.fullmatch(f"audio-monitor: warning: {short}: holds 0.200 s of audio, less than "
                        r"one 0.255 s window: padded with silence and scored \((\d+) windows\)",
                        warnings[0]), warnings[0]
    assert warnings[1] == (f"audio-monitor: warning: {cut}: ended after {RATE // 2} of "
                           f"{clip.shape[0]} frames the header promised")
    assert int(re.findall(r"\d+", warnings[0].rsplit("(", 1)[1])[0]) >= 5


@need_events
def test_analyze_outside_the_checkout_uses_the_shipped_model(shared_data: Path,
                                                            tmp_path: Path) -> None:
    """`audio-monitor analyze` as a user runs it from their own folder, with no config file:
    a stereo 44.1 kHz recording of a held-out cough is judged by the shipped model."""
    import json
    import subprocess
    import sys

    from scipy.signal import resample_poly

    from monitor.training.dataset import read_clips

    clip = next(c for c in read_clips(shared_data)
                if c.split == "test" and c.label == "cough" and c.duration_s >= 2.0)
    audio, rate = sf.read(str(clip.path), dtype="float32", always_2d=True)
    stereo = np.repeat(resample_poly(audio[:, 0], 44100, rate), 2).reshape(-1, 2)
    sf.write(str(tmp_path / "cough.wav"), stereo, 44100, subtype="PCM_16")
    result = subprocess.run([sys.executable, "-m", "monitor", "analyze", "cough.wav"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert {e["class"] for e in events} == {"cough"}, result.stdout


def test_analyze_takes_a_folder_as_the_audio_files_under_it(shared_data: Path,
                                                            config_file: Path,
                                                            tmp_path: Path) -> None:
    """Every audio file under a folder, at any depth, in path order, once; other files, headerless
    RAW and hidden files and folders skipped; a folder with no audio is named in one error
    line (exit 2), the rest still analysed."""
    import subprocess
    import sys

    from monitor.apps.analyze import expand_folders

    short = real_clip(shared_data)[:round(0.2 * RATE)]  # each file named in a warning
    (tmp_path / "ward" / "night").mkdir(parents=True)
    sf.write(str(tmp_path / "ward" / "bed1.wav"), short, RATE, subtype="PCM_16")
    sf.write(str(tmp_path / "ward" / "night" / "bed2.FLAC"), short, RATE, format="FLAC")
    (tmp_path / "ward" / "notes.txt").write_text("not audio\n", encoding="utf-8")
    (tmp_path / "ward" / "take.raw").write_bytes(bytes(1000))  # headerless: no rate
    (tmp_path / "ward" / "._bed1.wav").write_bytes(b"AppleDouble")  # macOS metadata
    (tmp_path / "ward" / ".git").mkdir()
    sf.write(str(tmp_path / "ward" / ".git" / "x.wav"), short, RATE, subtype="PCM_16")
    (tmp_path / "empty").mkdir()
    found = [tmp_path / "ward" / "bed1.wav", tmp_path / "ward" / "night" / "bed2.FLAC"]
    assert expand_folders([tmp_path / "ward", found[0]]) == (found, [])
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "analyze", "--config", str(config_file),
         str(tmp_path / "ward"), str(tmp_path / "empty"), str(found[0])],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == (f"audio-monitor: error: folder {tmp_path / 'empty'} holds no audio "
                        "files (.wav, .flac, .ogg, .mp3 or another format libsndfile reads)")
    assert [line.split(": ")[2] for line in lines[1:]] == [str(f) for f in found]


def test_analyze_names_files_it_cannot_open_in_one_line(shared_data: Path, config_file: Path,
                                                       tmp_path: Path) -> None:
    """A headerless RAW file (no rate to read it at) is one error line; a name that is not
    UTF-8 (old Samba shares, Latin-1 drives) is read like any other. Neither ends the run."""
    import subprocess
    import sys

    raw = tmp_path / "take.raw"
    raw.write_bytes(bytes(1000))
    latin1 = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.wav")
    sf.write(os.fsencode(latin1), real_clip(shared_data)[:round(0.2 * RATE)], RATE)
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "analyze", "--config", str(config_file), str(raw),
         latin1], capture_output=True, text=True, timeout=120, errors="backslashreplace")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == (f"audio-monitor: error: cannot read audio file {raw}: samplerate "
                        "must be specified")
    assert lines[1].startswith("audio-monitor: warning: ") and "holds 0.200 s" in lines[1]
    assert len(lines) == 2
