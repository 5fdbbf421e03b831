"""Every event ends: the real daemon process, one test per way a stream ends.

File end, stdin EOF, SIGTERM mid-event (real-time file and a live microphone on JACK)
and kill -9: each shows the last event published with its `end`. The tiny model's
"loud" class is the event, with a 100 ms minimum duration (as the shipped cough rule).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zmq
from test_daemon_e2e import RATE, collect, daemon, of, run_to_end, subscriber

from monitor.protocol.messages import Event, Message, Scores, Status, decode

MIN_DURATION_S = 0.1


def burst(shared_data: Path) -> np.ndarray:
    """The loudest 150 ms of a real glass-break recording."""
    path = sorted((shared_data / "glassbreak" / "glass_break").glob("*.flac"))[0]
    audio, rate = sf.read(str(path), dtype="float32")
    assert rate == RATE
    energy = np.convolve(audio.astype(np.float64) ** 2, np.ones(RATE // 20), mode="same")
    peak = int(np.argmax(energy))
    start = max(0, peak - RATE // 20)
    return np.ascontiguousarray(audio[start:start + 3 * RATE // 20])


@pytest.fixture
def edge_config(tiny_model: Path, tmp_path: Path) -> Path:
    """Its own sensor and journal (kill -9 leaves events open there), min duration 0.1 s."""
    path = tmp_path / "config.yaml"
    path.write_text(f"sensor_id: edge-room\nstate_dir: {tmp_path / 'state'}\n"
                    f"model:\n  path: {tiny_model}\n  stride_ms: 50\n  top_k: 2\n"
                    f"events:\n  default:\n    min_duration_ms: {MIN_DURATION_S * 1000:g}\n"
                    "publish:\n  status_interval_s: 0.5\n")
    return path


def ends_with_its_end(messages: list[Message], *, audio_s: float) -> Event:
    """The events are one start and its end, the end within the audio and lasting at
    least the minimum duration."""
    events = of(messages, Event)
    assert [(e.label, e.phase) for e in events] == [("loud", "start"), ("loud", "end")], events
    start, end = events
    assert start.event_id == end.event_id and end.end_reason is None
    assert end.offset_s is not None and end.offset_s <= audio_s + 1e-3
    assert end.offset_s - end.onset_s >= MIN_DURATION_S - 1e-3
    final = of(messages, Status)[-1]
    assert final.state == "stopped" and final.counters["events"] == 1
    seqs = [m.seq for m in messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a message was lost"
    return end


def test_file_end_judges_a_sound_in_its_last_150_ms(shared_data: Path, edge_config: Path,
                                                     tmp_path: Path) -> None:
    audio = np.concatenate([np.zeros(RATE, np.float32), burst(shared_data)])
    path = tmp_path / "tail.wav"
    sf.write(str(path), audio, RATE, subtype="FLOAT")
    messages, _ = run_to_end(edge_config, f"file:{path}", f"ipc://{tmp_path}/d.sock", "--fast")
    ends_with_its_end(messages, audio_s=audio.shape[0] / RATE)
    # Windows holding the last sample were scored: past the end of the audio.
    assert max(s.t_audio_s for s in of(messages, Scores)) > audio.shape[0] / RATE


def test_stdin_eof_judges_a_sound_in_its_last_150_ms(shared_data: Path, edge_config: Path,
                                                      tmp_path: Path) -> None:
    audio = np.concatenate([np.zeros(RATE, np.float32), burst(shared_data)])
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    messages, _ = run_to_end(edge_config, "stdin", f"ipc://{tmp_path}/d.sock", "--rate",
                             "16000", stdin_bytes=pcm)
    ends_with_its_end(messages, audio_s=audio.shape[0] / RATE)


def until_event_start(sub: zmq.Socket, process: subprocess.Popen[bytes],
                      timeout_s: float = 60.0) -> list[Message]:
    messages: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if sub.poll(100):
            message = decode(sub.recv_multipart())
            messages.append(message)
            if isinstance(message, Event) and message.phase == "start":
                return messages
    raise AssertionError(f"no event started; daemon rc={process.poll()}")


def loud_recording(shared_data: Path, folder: Path) -> tuple[Path, np.ndarray]:
    """1 s of silence, then 6 s of a real recording that the tiny model calls loud."""
    clip = burst(shared_data)
    audio = np.concatenate([np.zeros(RATE, np.float32), np.tile(clip, 40)])
    path = folder / "loud.wav"
    sf.write(str(path), audio, RATE, subtype="FLOAT")
    return path, audio


def test_sigterm_mid_event_publishes_its_end(shared_data: Path, edge_config: Path,
                                             tmp_path: Path) -> None:
    path, audio = loud_recording(shared_data, tmp_path)
    endpoint = f"ipc://{tmp_path}/d.sock"
    sub = subscriber(endpoint)
    process = daemon(edge_config, "--source", f"file:{path}", "--publish", endpoint,
                     "--wait-subscriber", "10")
    try:
        messages = until_event_start(sub, process)
        process.send_signal(signal.SIGTERM)
        messages += collect(sub, process, timeout_s=20)
        assert process.wait(timeout=10) == 0
    finally:
        sub.close()
        if process.poll() is None:
            process.kill()
    end = ends_with_its_end(messages, audio_s=audio.shape[0] / RATE)
    assert end.offset_s is not None and end.offset_s < audio.shape[0] / RATE - 1.0  # mid-way


def test_kill_9_mid_event_is_closed_once_at_restart(shared_data: Path, edge_config: Path,
                                                    tmp_path: Path) -> None:
    """The journal shows the event open; the next start publishes its `end` with reason
    "restart" before any new audio is judged, and the start after that does not again."""
    path, _ = loud_recording(shared_data, tmp_path)
    endpoint = f"ipc://{tmp_path}/d.sock"
    sub = subscriber(endpoint)
    process = daemon(edge_config, "--source", f"file:{path}", "--publish", endpoint,
                     "--wait-subscriber", "10")
    try:
        started = [m for m in until_event_start(sub, process) if isinstance(m, Event)]
        process.send_signal(signal.SIGKILL)  # a power cut: nothing closes
        process.wait(timeout=10)
    finally:
        sub.close()
        if process.poll() is None:
            process.kill()
    quiet = tmp_path / "quiet.wav"
    sf.write(str(quiet), np.zeros(RATE, np.float32), RATE, subtype="FLOAT")
    after, _ = run_to_end(edge_config, f"file:{quiet}", endpoint, "--fast")
    closed = of(after, Event)
    assert [(e.event_id, e.phase, e.reason) for e in closed] == \
        [(started[0].event_id, "end", "restart")]
    end = closed[0]
    assert (end.label, end.onset_s, end.onset_time, end.peak_score) == \
        (started[0].label, started[0].onset_s, started[0].onset_time, started[0].peak_score)
    assert end.offset_s is None and end.offset_time is None  # when it ended is unknown
    assert end.seq < min(m.seq for m in of(after, Scores)), "closed after new audio"
    assert end.seq > started[0].seq
    again, _ = run_to_end(edge_config, f"file:{quiet}", endpoint, "--fast")
    assert of(again, Event) == [], "closed twice"


def test_sigterm_mid_event_on_a_live_microphone_publishes_its_end(
        shared_data: Path, edge_config: Path, tmp_path: Path) -> None:
    """The daemon captures from PortAudio on a private JACK server, where a JACK client
    plays a real recording into its input; SIGTERM arrives while the event is on."""
    import os
    import sys

    from jack_server import jack_server
    from test_portaudio_jack import _Player

    _, audio = loud_recording(shared_data, tmp_path)
    config = tmp_path / "mic.yaml"
    config.write_text(edge_config.read_text()
                      + "audio:\n  sample_rate: 16000\n  channels: 2\n")
    endpoint = f"ipc://{tmp_path}/d.sock"
    with jack_server("am-edges", rate=RATE, period=160, log_dir=tmp_path) as server:
        player = _Player(server.name, audio)
        player.client.activate()
        sub = subscriber(endpoint)
        process = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "--config", str(config), "--source",
             "mic:system", "--publish", endpoint, "--wait-subscriber", "10"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(server.env, **{
                k: v for k, v in os.environ.items() if k not in server.env}))
        try:
            deadline = time.monotonic() + 30
            while len(player.portaudio_inputs()) < 2:  # the daemon's capture ports
                assert process.poll() is None and time.monotonic() < deadline, \
                    process.communicate()[1].decode(errors="replace")[-2000:]
                time.sleep(0.05)
            for dst in player.portaudio_inputs():  # PortAudio connected system:capture_N
                for src in player.client.get_all_connections(dst):
                    player.client.disconnect(src, dst)
                player.client.connect(player.port, dst)
            player.armed = True
            messages = until_event_start(sub, process)
            assert player.pos < audio.shape[0], "the recording ended before SIGTERM"
            process.send_signal(signal.SIGTERM)
            messages += collect(sub, process, timeout_s=20)
            assert process.wait(timeout=20) == 0
        finally:
            sub.close()
            if process.poll() is None:
                process.kill()
            player.client.deactivate()
            player.client.close()
    end = ends_with_its_end(messages, audio_s=float("inf"))
    assert "JACK" in of(messages, Status)[-1].source
    assert end.offset_s is not None


def test_a_file_run_never_loads_portaudio(shared_data: Path, edge_config: Path,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file source needs no sound system: `run` on a file must not import sounddevice
    (PortAudio's start can stall for seconds probing JACK on a machine without audio)."""
    path = tmp_path / "clip.wav"
    sf.write(str(path), burst(shared_data), RATE, subtype="FLOAT")
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # every import, on stderr
    _, stderr = run_to_end(edge_config, f"file:{path}", f"ipc://{tmp_path}/d.sock", "--fast")
    import re

    assert re.search(r"\|\s+monitor\.capture\.sources\s*$", stderr, re.M)  # the log is there
    assert not re.search(r"\|\s+sounddevice\s*$", stderr, re.M)
