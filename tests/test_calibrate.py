"""`audio-monitor calibrate`: thresholds from a real recording with a known event count,
checked by running `analyze` with them (real ONNX model, real recordings, the real CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from tiny_model import build_tiny_model

from monitor.apps.analyze import analyze
from monitor.apps.calibrate import (
    ScoreRecorder,
    calibrate,
    count_events,
    listen,
)
from monitor.apps.calibrate_report import (
    parse_duration,
    parse_target,
    yaml_snippet,
)
from monitor.capture.sources import FileSource
from monitor.config import load_config
from monitor.detect.detector import Detector
from monitor.detect.events import ClassEventLogic, ClassRule
from monitor.detect.learn import read_file
from monitor.errors import ConfigError
from monitor.pipeline.rules import rule_at

RATE = 16000
EVENT_GAINS = (0.01, 0.0115, 0.013, 0.015, 0.017, 0.0195, 0.022, 0.025, 0.029, 0.033)
"""RMS of the ten glass breaks: with the model below their peak scores spread over
0.57-0.98, each above the card's threshold 0.5, while the room noise scores below it."""
EVENT_EVERY_S = 8.0
VALIDATION_PEAKS = [0.55, 0.7, 0.9, 0.95, 0.99]


def cli(*args: str, stdin: bytes | None = None,
        timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monitor", *args], input=None if stdin is None
                          else stdin.decode("latin-1"), capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ), check=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny real model, its card carrying validation peaks for the recall cost."""
    path = build_tiny_model(tmp_path_factory.mktemp("calib-model"), level=-1.5)
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["training"] = {"validation_positive_peaks": {"loud": VALIDATION_PEAKS}}
    card_path.write_text(json.dumps(card))
    return path


@pytest.fixture(scope="module")
def room(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 s of a room: 90 real background recordings back to back (quiet), and ten real
    glass breaks at rising levels, one every 8 s: a known count of ten loud events."""
    backgrounds = sorted((shared_data / "glassbreak" / "background").glob("*"))[:90]
    breaks = sorted((shared_data / "glassbreak" / "glass_break").glob("*"))[:10]
    audio = 0.003 * np.concatenate([sf.read(str(p), dtype="float32")[0] for p in backgrounds])
    for i, (path, gain) in enumerate(zip(breaks, EVENT_GAINS, strict=True)):
        clip = sf.read(str(path), dtype="float32")[0]
        clip *= gain / np.sqrt(np.mean(clip**2))
        at = int((5 + i * EVENT_EVERY_S) * RATE)
        audio[at:at + clip.shape[0]] += clip
    path = tmp_path_factory.mktemp("calib-audio") / "room.wav"
    sf.write(str(path), audio, RATE, subtype="FLOAT")
    return path


def config_for(folder: Path, model: Path, extra: str = "") -> Path:
    path = folder / "config.yaml"
    path.write_text(f"model:\n  path: {model}\n{extra}")
    return path


def events_found(config: Path, audio: Path) -> list[dict[str, object]]:
    result = cli("analyze", "--config", str(config), str(audio))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_calibrated_thresholds_hold_on_the_recording(model: Path, room: Path,
                                                     tmp_path: Path) -> None:
    hours = sf.info(str(room)).duration / 3600
    target = 130.0  # per hour: 3.25 events in these 90 s, so at most 3 of the ten
    config = config_for(tmp_path, model)
    out = tmp_path / "thresholds.yaml"
    result = cli("calibrate", "--config", str(config), "--source", f"file:{room}",
                 "--target-fa", f"{target:g}/h", "--out", str(out))
    assert result.returncode == 0, result.stderr
    chosen = yaml.safe_load(out.read_text())["events"]["classes"]["loud"]["threshold"]

    at_card = events_found(config, room)
    assert len(at_card) == 10  # the known count: every glass break, nothing else
    calibrated = config_for(tmp_path, model, out.read_text())
    found = events_found(calibrated, room)
    assert len(found) <= target * hours < len(at_card)
    assert len(found) == 3
    lower = config_for(tmp_path, model, "events:\n  classes:\n    loud:\n      threshold: "
                                        f"{chosen - 0.001:.3f}\n")
    assert len(events_found(lower, room)) > 3  # the lowest threshold that meets the target

    row = next(line for line in result.stdout.splitlines() if line.startswith("loud"))
    recall = np.mean(np.array(VALIDATION_PEAKS) >= chosen)
    assert row.split() == ["loud", "0.5", f"{10 / hours:.2f}", f"{chosen:g}",
                           f"{3 / hours:.2f}", "1.000", f"{recall:.3f}"]
    assert "heard 0.025 h (0:01:30.0)" in result.stdout


def test_a_file_shorter_than_asked_reports_the_hours_heard(room: Path, tiny_model: Path,
                                                           tmp_path: Path) -> None:
    config = config_for(tmp_path, tiny_model)  # its card has no validation peaks
    result = cli("calibrate", "--config", str(config), "--source", str(room),
                 "--duration", "10m", "--target-fa", "2")
    assert result.returncode == 0, result.stderr
    assert "heard 0.025 h (0:01:30.0)" in result.stdout
    assert "of 0.167 h asked: the source ended" in result.stdout
    assert "recall cost: unknown for this model" in result.stdout
    snippet = yaml.safe_load(result.stdout[result.stdout.index("# audio-monitor calibrate"):])
    assert 0.5 <= snippet["events"]["classes"]["loud"]["threshold"] <= 0.999


def test_a_truncated_recording_is_named_and_calibrated_on_what_it_holds(
        room: Path, model: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.wav"
    data = room.read_bytes()
    cut.write_bytes(data[:len(data) // 3])  # a copy that stopped a third of the way in
    result = cli("calibrate", "--config", str(config_for(tmp_path, model)), "--source",
                 str(cut))
    assert result.returncode == 0, result.stderr
    heard = result.stdout.splitlines()[0]
    assert heard.startswith("calibrate: heard 0.008 h (0:00:30.0)"), heard
    assert f"source: {cut}: ended after" in result.stdout
    assert "frames the header promised" in result.stdout


def test_duration_stops_listening(room: Path, model: Path) -> None:
    config = load_config(config_for(room.parent, model))
    detector = Detector(config.model.path)
    source = FileSource(room, realtime=False, ring_seconds=4.0, block_ms=10.0)
    heard, processor = listen(config, detector, source, seconds=30.0, stop=threading.Event())
    assert heard.samples == 30 * RATE
    assert heard.stopped_by == "duration"
    recorder = heard.recorder
    assert recorder.audio_windows == processor.windows - (recorder.count
                                                          - recorder.audio_windows)
    assert recorder.nbytes == recorder.count * 2  # one class, float16: no audio kept


@pytest.mark.parametrize(("option", "value"), [("--duration", "8"), ("--duration", "-1h"),
                                               ("--duration", "eight hours"),
                                               ("--target-fa", "1/d"), ("--target-fa", "-1"),
                                               ("--target-fa", "often")])
def test_bad_duration_or_target_exits_2_naming_the_option(option: str, value: str,
                                                          room: Path) -> None:
    result = cli("calibrate", "--source", str(room), f"{option}={value}")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"audio-monitor: error: {option} {value!r}")


def test_duration_and_target_forms() -> None:
    assert parse_duration("8h") == 8 * 3600
    assert parse_duration("30m") == 1800
    assert parse_duration("90s") == 90
    assert parse_duration("1.5h") == 5400
    assert parse_target("1/h") == 1.0
    assert parse_target("0.5/h") == 0.5
    assert parse_target("2") == 2.0
    assert parse_target("0") == 0.0
    for bad in ("0s", "h", "1x", "inf h", ""):
        with pytest.raises(ConfigError, match="--duration"):
            parse_duration(bad)
    for bad in ("1/m", "/h", "nan", "1e400"):
        with pytest.raises(ConfigError, match="--target-fa"):
            parse_target(bad)


def test_sigterm_while_listening_finishes_with_what_was_heard(model: Path, room: Path,
                                                              tmp_path: Path) -> None:
    audio = sf.read(str(room), dtype="float32")[0][:20 * RATE]
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    config = config_for(tmp_path, model)
    out = tmp_path / "t.yaml"
    process = subprocess.Popen(
        [sys.executable, "-m", "monitor", "calibrate", "--config", str(config), "--source",
         "stdin", "--rate", str(RATE), "--duration", "8h", "--out", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ))
    assert process.stdin is not None
    # 640 kB through a 64 kB pipe: when the write returns, the process has read all but the
    # pipe's content, and processed all but its 4 s ring: at least 14 s of the 20 s.
    process.stdin.write(pcm)
    process.stdin.flush()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)  # stdin stays open: the signal ends it, not an end of file
    process.stdin.close()
    assert process.stdout is not None and process.stderr is not None
    stdout, stderr = process.stdout.read().decode(), process.stderr.read().decode()
    assert process.returncode == 0, stderr
    h, m, s = stdout.split("(")[1].split(")")[0].split(":")
    heard_s = int(h) * 3600 + int(m) * 60 + float(s)
    assert 13.9 <= heard_s <= 20.0
    assert "of 8.000 h asked: stopped by a signal" in stdout
    assert yaml.safe_load(out.read_text())["events"]["classes"]["loud"]["threshold"] >= 0.5


def test_replay_of_kept_windows_equals_a_replay_of_every_window(model: Path,
                                                                room: Path) -> None:
    """Skipping quiet windows changes no count, for N-of-M, min duration and refractory."""
    config = load_config(config_for(room.parent, model))
    detector = Detector(config.model.path)
    source = FileSource(room, realtime=False, ring_seconds=4.0, block_ms=10.0)
    heard, processor = listen(config, detector, source, seconds=None, stop=threading.Event())
    recorder = heard.recorder
    scores = recorder.scores("loud")
    timing = processor.timing
    assert recorder.first_end is not None and recorder.audio_windows is not None
    rules = [rule_at(config, detector, timing, "loud", 0.5)]
    for threshold in (0.3, 0.6, 0.9, 0.95):
        for n, m in ((1, 1), (2, 3), (3, 4)):
            for min_duration, refractory in ((0, 0), (1600, 16000), (8000, 96000)):
                rules.append(ClassRule(threshold=threshold, release=0.8 * threshold,
                                       confirm_n=n, confirm_m=m, min_duration=min_duration,
                                       refractory=refractory))
    counts = set()
    for rule in rules:
        logic = ClassEventLogic("c", rule, window=timing.detector_window, stride=timing.stride)
        every = 0
        for k, score in enumerate(scores.tolist()):
            if k == recorder.audio_windows:
                logic.audio_end = heard.samples
            t = logic.update(score, recorder.first_end + k * timing.stride)
            every += t is not None and t.phase == "start"
        every += sum(t.phase == "start" for t in logic.flush(heard.samples))
        kept = count_events(scores, rule, first_end=recorder.first_end, stride=timing.stride,
                            window=timing.detector_window,
                            audio_windows=recorder.audio_windows, audio_end=heard.samples,
                            onset_lead=None)
        assert kept == every, rule
        counts.add(every)
    assert len(counts) > 3  # the rules differ in what they find


def test_recorder_keeps_complements_in_float16() -> None:
    recorder = ScoreRecorder({"b": 1}, stride=1600, capacity=2)
    live = np.array([0.5, 0.9, 0.99, 0.999, 0.9999, 0.25], dtype=np.float32)
    for k, score in enumerate(live):
        recorder.on_scores(4000 + k * 1600, np.array([0.0, score, 0.0], dtype=np.float32))
    kept = recorder.scores("b")
    assert recorder.count == 6 and recorder.nbytes == 12
    above = live >= 0.5
    assert np.all(kept >= live)  # rounded toward a higher score: a hit stays a hit
    assert np.all((kept - live)[above] <= 2.0**-10 * (1 - live[above]))
    for threshold in live.tolist():
        assert np.all((kept >= threshold) == (live >= threshold))


def test_thresholds_respect_the_configs_own_rule(model: Path, room: Path,
                                                 tmp_path: Path) -> None:
    """A release set in the config stays valid under the chosen threshold, and the
    written snippet, merged into that config, loads and raises what calibration counted."""
    extra = "events:\n  classes:\n    loud:\n      release: 0.95\n"
    config = load_config(config_for(tmp_path, model, extra))
    detector = Detector(config.model.path)
    source = FileSource(room, realtime=False, ring_seconds=4.0, block_ms=10.0)
    heard, results = calibrate(config, detector, source, seconds=None, target=0.0,
                               stop=threading.Event())
    (result,) = results
    assert result.card_threshold == 0.5 and result.card_events > 0
    assert result.threshold >= 0.95 and result.reached and result.events == 0
    snippet = yaml.safe_load(yaml_snippet(results, heard, target=0.0, source="room"))
    merged = config_for(tmp_path, model, "events:\n  classes:\n    loud:\n      release: 0.95\n"
                        f"      threshold: {snippet['events']['classes']['loud']['threshold']}\n")
    calibrated = load_config(merged)
    assert analyze(room, config=calibrated, detector=detector).events == []


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "events.onnx"


@pytest.mark.skipif(not SHIPPED.is_file(),
                    reason="models/events.onnx absent: run `audio-monitor fetch-models`")
def test_shipped_model_calibration_agrees_with_analyze(shared_data: Path,
                                                       tmp_path: Path) -> None:
    """On the shipped model and its tuned rules (N-of-M for falls), the counts calibration
    replays are the counts `analyze` finds with the card's and with the written thresholds."""
    extra = shared_data / "extra"
    if not extra.is_dir():
        pytest.skip(f"{extra} absent (speech and everyday sounds)")
    clips = sorted((shared_data / "safe" / "non_fall").glob("*.flac"))[:30] + \
        sorted((extra / "esc50").rglob("*.*"))[::8][:30] + \
        sorted((extra / "ravdess").rglob("*.flac"))[::40][:30]  # 5 min of everyday sounds
    audio = np.concatenate([read_file(p, rate=RATE) for p in clips])
    stream = tmp_path / "life.wav"
    sf.write(str(stream), audio, RATE, subtype="FLOAT")
    config = load_config(None, overrides={"model.path": str(SHIPPED)})
    detector = Detector(SHIPPED)
    target = 100.0  # per hour: 8 events in these 5 min
    heard, results = calibrate(config, detector,
                               FileSource(stream, realtime=False, ring_seconds=4.0,
                                          block_ms=10.0),
                               seconds=None, target=target, stop=threading.Event())
    assert heard.samples == audio.shape[0]
    at_card = analyze(stream, config=config, detector=detector).events
    snippet = yaml_snippet(results, heard, target=target, source="life")
    calibrated = load_config(config_for(tmp_path, SHIPPED, snippet))
    found = analyze(stream, config=calibrated, detector=detector).events
    for r in results:
        assert r.card_events == sum(e.label == r.name for e in at_card), r
        assert r.events == sum(e.label == r.name for e in found), r
        assert r.threshold >= r.card_threshold
        if r.reached:
            assert r.events <= target * heard.hours


def test_microphone_errors_are_one_line_and_exit_2(model: Path, tmp_path: Path) -> None:
    config = str(config_for(tmp_path, model))
    missing = cli("calibrate", "--config", config, "--source", "mic:no-such-microphone-xyz",
                  "--duration", "1m")
    assert missing.returncode == 2
    assert missing.stderr.startswith("audio-monitor: error: no input device matching "
                                     "'no-such-microphone-xyz'")
    assert missing.stderr.count("\n") == 1
    endless = cli("calibrate", "--config", config, "--source", "mic")
    assert endless.returncode == 2
    assert endless.stderr == ("audio-monitor: error: --duration: needed with a microphone "
                              "source (e.g. --duration 8h)\n")
    nowhere = cli("calibrate", "--config", config, "--source", "stdin", "--out",
                  str(tmp_path / "no" / "such" / "t.yaml"))
    assert nowhere.returncode == 2 and nowhere.stderr.startswith("audio-monitor: error: --out")
