"""End to end: the real daemon process, a real recording, a real ZeroMQ SUB socket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zmq
from scipy.signal import resample_poly

from monitor.protocol.messages import Event, Level, Message, Scores, Status, decode

RATE = 16000


def fall_clip(shared_data: Path) -> np.ndarray:
    path = sorted((shared_data / "safe" / "fall").glob("*.flac"))[0]
    audio, rate = sf.read(str(path), dtype="float32")
    assert rate == RATE
    return audio


@pytest.fixture(scope="module")
def recording(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 s of silence, a real fall recording, 1 s of silence; 16 kHz mono WAV."""
    silence = np.zeros(RATE, dtype=np.float32)
    audio = np.concatenate([silence, fall_clip(shared_data), silence])
    path = tmp_path_factory.mktemp("audio") / "fall.wav"
    sf.write(str(path), audio, RATE, subtype="FLOAT")
    return path


def daemon(config: Path, *args: str, stdin: int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "monitor", "run", "--config", str(config), *args],
        stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))


def subscriber(endpoint: str) -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RECONNECT_IVL, 10)
    sub.setsockopt_string(zmq.SUBSCRIBE, "")
    sub.connect(endpoint)
    return sub


def collect(sub: zmq.Socket, process: subprocess.Popen[bytes], *,
            timeout_s: float = 60.0) -> list[Message]:
    """Messages until the daemon's final `stopped` status."""
    messages: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sub.poll(100):
            message = decode(sub.recv_multipart())
            messages.append(message)
            if isinstance(message, Status) and message.state == "stopped":
                return messages
        elif process.poll() is not None and not sub.poll(500):
            break
    _, stderr = process.communicate(timeout=10)
    raise AssertionError(f"no final status; daemon rc={process.returncode}: "
                         f"{stderr[-2000:].decode(errors='replace')}")


def of(messages: list[Message], kind: type) -> list:
    return [m for m in messages if isinstance(m, kind)]


def run_to_end(config: Path, source: str, endpoint: str, *extra: str,
               stdin_bytes: bytes | None = None) -> tuple[list[Message], str]:
    sub = subscriber(endpoint)
    process = daemon(config, "--source", source, "--publish", endpoint,
                     "--wait-subscriber", "10", *extra,
                     stdin=subprocess.PIPE if stdin_bytes is not None else None)
    feeder = None
    if stdin_bytes is not None:
        feeder = threading.Thread(target=feed_stdin, args=(process, stdin_bytes), daemon=True)
        feeder.start()
    try:
        messages = collect(sub, process)
        if feeder is not None:
            feeder.join(5)
            process.stdin = None  # closed by the feeder
        _, stderr = process.communicate(timeout=20)
    finally:
        sub.close()
        if process.poll() is None:
            process.kill()
    text = stderr.decode(errors="replace")
    assert process.returncode == 0, text
    return messages, text


def feed_stdin(process: subprocess.Popen[bytes], data: bytes) -> None:
    assert process.stdin is not None
    process.stdin.write(data)
    process.stdin.close()


def test_real_time_file_through_the_daemon(recording: Path, config_file: Path,
                                           tmp_path: Path) -> None:
    messages, _ = run_to_end(config_file, f"file:{recording}", f"ipc://{tmp_path}/d.sock")
    seqs = [m.seq for m in messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a message was lost"
    assert {m.sensor_id for m in messages} == {"test-room"}

    duration = sf.info(str(recording)).duration
    levels = of(messages, Level)
    assert abs(len(levels) - duration * 10) <= 2
    quiet = [lv.rms_dbfs for lv in levels if lv.t_audio_s < 0.9]
    loud = [lv.peak_dbfs for lv in levels if 1.0 < lv.t_audio_s < duration - 1.0]
    assert max(quiet) == -120.0 and max(loud) > -40.0
    assert all(len(lv.mel) == 32 for lv in levels)

    scores = of(messages, Scores)
    assert scores and all(len(s.top) == 2 for s in scores)
    assert {(label, threshold) for label, _, threshold in scores[0].top} == {("loud", 0.5),
                                                                          ("quiet", None)}

    events = of(messages, Event)
    assert [(e.label, e.phase) for e in events] == [("loud", "start"), ("loud", "end")]
    start, end = events
    assert start.event_id == end.event_id
    assert 0.7 <= start.onset_s <= 1.3, start
    assert end.offset_s is not None and duration - 1.6 <= end.offset_s <= duration
    # Paced at real time: wall time advances with audio time.
    assert end.offset_time - start.onset_time == pytest.approx(end.offset_s - start.onset_s,
                                                               abs=1e-3)
    assert end.ts - start.ts > 1.0

    final = of(messages, Status)[-1]
    assert final.state == "stopped"
    assert final.counters["samples"] == round(duration * RATE)
    assert final.counters["overrun_samples"] == 0
    assert final.counters["events"] == 1
    assert final.counters["windows"] > 0 and final.inference_ms_p50 >= 0


def test_analyze_and_fast_run_find_the_same_events(shared_data: Path, config_file: Path,
                                                   tmp_path: Path) -> None:
    """Stereo 44.1 kHz: downmix and resampling, chunked differently in the two paths."""
    rng = np.random.default_rng(3)
    clips = [fall_clip(shared_data), np.zeros(RATE, np.float32), fall_clip(shared_data)[::-1]]
    mono = np.concatenate([np.zeros(RATE // 2, np.float32), *clips]).astype(np.float64)
    at_44k = resample_poly(mono, 441, 160)
    stereo = np.stack([at_44k, at_44k * 0.5 + rng.normal(0, 1e-4, at_44k.shape)], axis=1)
    path = tmp_path / "stereo.flac"
    sf.write(str(path), stereo, 44100, subtype="PCM_24")

    analyzed = subprocess.run(
        [sys.executable, "-m", "monitor", "analyze", "--config", str(config_file), str(path)],
        capture_output=True, text=True, timeout=120, check=True)
    offline = [json.loads(line) for line in analyzed.stdout.splitlines()]
    assert len(offline) >= 2
    assert {e["class"] for e in offline} == {"loud"}

    messages, _ = run_to_end(config_file, f"file:{path}", f"ipc://{tmp_path}/d.sock", "--fast")
    live = [{"file": str(path), "class": e.label, "start_s": e.onset_s, "end_s": e.offset_s,
             "score": e.peak_score} for e in of(messages, Event) if e.phase == "end"]
    assert live == offline


def test_stdin_pcm_source(shared_data: Path, config_file: Path, tmp_path: Path) -> None:
    audio = np.concatenate([np.zeros(RATE, np.float32), fall_clip(shared_data)])
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    messages, _ = run_to_end(config_file, "stdin", f"ipc://{tmp_path}/d.sock", "--rate",
                             "16000", stdin_bytes=pcm)
    assert [e.phase for e in of(messages, Event)] == ["start", "end"]
    assert of(messages, Status)[-1].counters["samples"] == audio.shape[0]


def test_bad_samples_are_cleaned_and_counted(shared_data: Path, config_file: Path,
                                             tmp_path: Path) -> None:
    audio = np.concatenate([fall_clip(shared_data), np.zeros(RATE, np.float32)]) + 0.2
    audio[1000:1100] = np.nan
    audio[5000:5010] = np.inf
    audio[9000:9400] = 1.0  # clipped
    audio[20000:20400] = 1e30  # finite, but its square is not in float32
    path = tmp_path / "bad.wav"
    sf.write(str(path), audio, RATE, subtype="FLOAT")
    messages, _ = run_to_end(config_file, f"file:{path}", f"ipc://{tmp_path}/d.sock", "--fast")
    final = of(messages, Status)[-1]
    assert final.counters["nonfinite_samples"] == 110
    assert final.counters["clipped_samples"] >= 800
    # No level went missing: each is finite (clamped, counted) and seq has no gap.
    assert final.counters["levels_clamped"] >= 2
    assert final.counters["publish_unencodable"] == final.counters["publish_dropped"] == 0
    levels = of(messages, Level)
    assert len(levels) == audio.shape[0] // (RATE // 10)
    assert max(lv.peak_dbfs for lv in levels) == 120.0
    seqs = [m.seq for m in messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert all(np.isfinite(s.top[0][1]) for s in of(messages, Scores))
    assert any(abs(st.dc_offset - 0.2) < 0.05 for st in of(messages, Status))


def test_file_corrupt_midway_keeps_what_was_found(shared_data: Path, config_file: Path,
                                                  tmp_path: Path) -> None:
    audio = np.concatenate([np.zeros(RATE, np.float32), fall_clip(shared_data),
                            np.zeros(5 * RATE, np.float32)])
    good = tmp_path / "good.flac"
    sf.write(str(good), audio, RATE, subtype="PCM_16")
    data = good.read_bytes()
    broken = tmp_path / "broken.flac"
    cut = len(data) * 3 // 4
    broken.write_bytes(data[:cut] + bytes(range(256)) * 40 + data[cut + 10240:])
    analyzed = subprocess.run(
        [sys.executable, "-m", "monitor", "analyze", "--config", str(config_file), str(broken)],
        capture_output=True, text=True, timeout=120)
    assert analyzed.returncode == 0, analyzed.stderr
    assert [json.loads(x)["class"] for x in analyzed.stdout.splitlines()] == ["loud"]
    messages, _ = run_to_end(config_file, f"file:{broken}", f"ipc://{tmp_path}/d.sock", "--fast")
    assert [e.phase for e in of(messages, Event)] == ["start", "end"]


def test_sigterm_stops_gracefully(recording: Path, config_file: Path, tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/d.sock"
    sub = subscriber(endpoint)
    process = daemon(config_file, "--source", f"file:{recording}", "--publish", endpoint,
                     "--wait-subscriber", "10")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until audio flows
            if sub.poll(100) and isinstance(decode(sub.recv_multipart()), Level):
                break
        process.send_signal(signal.SIGTERM)
        messages = collect(sub, process, timeout_s=10)
        assert process.wait(timeout=10) == 0
    finally:
        sub.close()
        if process.poll() is None:
            process.kill()
    final = of(messages, Status)[-1]
    assert final.state == "stopped"
    assert final.t_audio_s < sf.info(str(recording)).duration


@pytest.mark.parametrize(("args", "expected"), [
    (["--source", "tape:x"], "source 'tape:x' is not one of"),
    (["--source", "file:/nonexistent.wav"], "/nonexistent.wav"),
    (["--publish", "udp://x"], "$.publish.endpoint: 'udp://x': expected a ZeroMQ endpoint"),
    (["--source", "stdin", "--rate", "0"], "$.audio.sample_rate: 0: expected `int` >= 4000"),
])
def test_user_errors_are_one_line_exit_2(config_file: Path, args: list[str],
                                         expected: str) -> None:
    result = subprocess.run([sys.executable, "-m", "monitor", "run", "--config",
                             str(config_file), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_absent_microphone_is_waited_for_not_an_exit(config_file: Path,
                                                      tmp_path: Path) -> None:
    """A USB microphone that enumerates late: `run` used to exit 2, and the unit's
    RestartPreventExitStatus=2 then left the service stopped for good."""
    endpoint = f"ipc://{tmp_path}/absent.sock"
    sub = subscriber(endpoint)
    process = daemon(config_file, "--source", "mic:no-such-device-xyz", "--publish", endpoint)
    try:
        statuses: list[Status] = []
        # PortAudio enumerates devices at each attempt; on a loaded machine that has taken
        # 18 s (ALSA probing), so the deadline is generous.
        deadline = time.monotonic() + 120
        while len(statuses) < 2 and time.monotonic() < deadline:  # two attempts (backoff)
            if sub.poll(100):
                message = decode(sub.recv_multipart())
                if isinstance(message, Status):
                    statuses.append(message)
        assert process.poll() is None, process.communicate(timeout=10)[1][-2000:]
        assert [s.state for s in statuses] == ["degraded", "degraded"]
        assert statuses[0].last_error is not None
        assert statuses[0].last_error.startswith(
            "waiting for the input device (mic:no-such-device-xyz): no input device matching "
            "'no-such-device-xyz'")
        assert statuses[1].counters["device_waits"] == statuses[0].counters["device_waits"] + 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        stderr = process.communicate(timeout=10)[1].decode()
    finally:
        sub.close()
        if process.poll() is None:
            process.kill()
    assert "retrying with backoff up to 30 s" in stderr and "Traceback" not in stderr


def test_missing_model_says_how_to_fix(tmp_path: Path, tiny_model: Path) -> None:
    card = json.loads(tiny_model.with_suffix(".json").read_text())
    card["fetch"] = "audio-monitor fetch-models"
    (tmp_path / "gone.json").write_text(json.dumps(card))
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  path: gone.onnx\n")
    result = subprocess.run([sys.executable, "-m", "monitor", "analyze", "--config", str(config),
                             "x.wav"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"audio-monitor: error: model file {tmp_path}/gone.onnx not "
                                     "found; run `audio-monitor fetch-models`")
