"""Machine-fault scorer on real CWRU bearing recordings: learning, scoring, persistence, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zmq

from monitor.config import MachineConfig
from monitor.detect import anomaly, baselines
from monitor.detect.learn import (
    evaluate_anomaly_command,
    learn_command,
    load_cwru,
    mix_at,
    roc_auc_pauc,
    segment_scores,
)
from monitor.dsp.frontend import FrontendParams, logmel_of
from monitor.errors import ConfigError, ModelError, SourceError
from monitor.protocol.messages import Anomaly, Event, Message, Status, decode

RATE = 16000
PARAMS = FrontendParams()
RUNNING_DBFS = -40.0  # level fed to `update` while the machine runs (CWRU normal is ~-49 dBFS)


@pytest.fixture(scope="module")
def cwru(shared_data: Path) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str, np.ndarray]]]:
    """(learn part of normal, held-back normal, faults): normal split by time, 60/40."""
    normal, faults = load_cwru(shared_data, rate=RATE)
    cut = int(normal.shape[0] * 0.6)
    return normal[:cut], normal[cut:], faults


def wav(path: Path, audio: np.ndarray) -> Path:
    sf.write(str(path), audio, RATE, subtype="FLOAT")
    return path


@pytest.fixture(scope="module")
def state_dir(cwru: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir holding a baseline of machine "pump" learned on real CWRU normal."""
    folder = tmp_path_factory.mktemp("state")
    learn_wav = wav(folder / "normal.wav", cwru[0])
    assert learn_command(machine="pump", sources=[f"file:{learn_wav}"], minutes=None,
                         state_dir=folder, frontend=PARAMS) == 0
    return folder


def scorer(state_dir: Path, **config: float) -> anomaly.MachineScorer:
    return anomaly.MachineScorer.load(state_dir, "pump", frontend=PARAMS,
                                      config=MachineConfig(**config))


def stream(sc: anomaly.MachineScorer, audio: np.ndarray, *, level: float = RUNNING_DBFS,
           start: int = 0) -> list[anomaly.MachineReading]:
    readings = []
    for i, frame in enumerate(logmel_of(audio, PARAMS)):
        reading = sc.update(frame, start + i * PARAMS.hop_length + PARAMS.win_length, level)
        if reading is not None:
            readings.append(reading)
    return readings


def test_card_records_what_was_learned(state_dir: Path, cwru: tuple) -> None:
    stamp = baselines.active_baseline(state_dir, "pump")
    assert stamp is not None
    card = json.loads((baselines.machine_dir(state_dir, "pump") / stamp / "card.json").read_text())
    assert card["machine"] == "pump" and card["sample_rate"] == RATE
    assert card["frontend"]["hash"] == PARAMS.hash()
    assert card["seconds"] == pytest.approx(cwru[0].shape[0] / RATE, abs=0.1)
    assert -55 < card["level"]["typical_dbfs"] < -40  # CWRU normal at 0.05 FS per g
    assert card["level"]["gate_dbfs"] == pytest.approx(card["level"]["typical_dbfs"] - 20)
    assert card["threshold"]["raw"] > 0 and card["metrics"]["held_back_seconds"] > 3


def test_loading_a_scorer_keeps_scipy_out_of_the_daemon(state_dir: Path) -> None:
    """The scorer's threshold is smoothed at load; scipy.signal there cost the daemon
    ~60 MB and half a second of start-up."""
    code = ("import sys\nfrom pathlib import Path\nfrom monitor.detect import anomaly\n"
            "from monitor.config import MachineConfig\nfrom monitor.dsp.frontend import "
            "FrontendParams\nanomaly.MachineScorer.load(Path(sys.argv[1]), 'pump', "
            "frontend=FrontendParams(), config=MachineConfig())\n"
            "print(sorted(m for m in sys.modules if m.startswith(('scipy.signal', "
            "'scipy.stats', 'scipy.linalg'))))")
    result = subprocess.run([sys.executable, "-c", code, str(state_dir)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_streaming_scores_equal_offline(state_dir: Path, cwru: tuple) -> None:
    sc = scorer(state_dir)
    baseline = baselines.load_baseline(state_dir, "pump")
    mel = logmel_of(cwru[1][: 3 * RATE], PARAMS)
    context = anomaly.context_frames(PARAMS)
    offline = anomaly.ema(anomaly.gaussian_scores(anomaly.boxcar_features(mel, context),
                                                  baseline.mean, baseline.whiten),
                          anomaly.ema_alpha(PARAMS, 1000.0))
    live = []
    for i, frame in enumerate(mel):
        sc.update(frame, i * PARAMS.hop_length + PARAMS.win_length, RUNNING_DBFS)
        if i >= context - 1:
            live.append(sc.raw_score)
    np.testing.assert_allclose(live, offline, rtol=1e-9)


def test_held_back_normal_stays_below_and_real_faults_go_above(state_dir: Path,
                                                               cwru: tuple) -> None:
    sc = scorer(state_dir)
    normal = stream(sc, cwru[1])
    assert abs(len(normal) - cwru[1].shape[0] / RATE * 4) <= 2  # publish_hz = 4
    assert all(r.running and r.threshold == 0.5 for r in normal)
    settled = [r.score for r in normal[4:]]  # after the first second
    assert np.mean(np.array(settled) >= 0.5) <= 0.05, settled
    assert not [r for r in normal if r.transition is not None]
    for name, _, audio in cwru[2]:  # every real fault recording
        sc.reset()
        fault = [r.score for r in stream(sc, audio)[4:]]
        assert np.mean(np.array(fault) >= 0.5) >= 0.9, name


def test_real_fault_auc(state_dir: Path, cwru: tuple) -> None:
    """Segment-level ROC AUC and pAUC of the deployed scorer, held-back normal vs real faults."""
    baseline = baselines.load_baseline(state_dir, "pump")
    context = anomaly.context_frames(PARAMS)

    def seg(audio: np.ndarray) -> np.ndarray:
        feats = anomaly.boxcar_features(logmel_of(audio, PARAMS), context)
        return segment_scores(anomaly.gaussian_scores(feats, baseline.mean, baseline.whiten))

    neg = seg(cwru[1])
    for fault_type in ("ball", "inner_race", "outer_race"):
        pos = np.concatenate([seg(a) for _, t, a in cwru[2] if t == fault_type])
        auc, pauc = roc_auc_pauc(neg, pos)
        assert auc >= 0.99 and pauc >= 0.95, (fault_type, auc, pauc)
    # Mixed 30 dB below the normal sound, the fault is still found (AUC on mixed, not real).
    pos = np.concatenate([seg(mix_at(cwru[1], a, -30.0)) for _, _, a in cwru[2]])
    assert roc_auc_pauc(neg, pos)[0] >= 0.95


def test_fault_event_only_for_the_faulty_part(state_dir: Path, cwru: tuple) -> None:
    sc = scorer(state_dir, min_duration_ms=2000.0, refractory_ms=30000.0)
    normal, fault = cwru[1], cwru[2][1][2]
    readings = stream(sc, np.concatenate([normal, fault]))
    transitions = [r.transition for r in readings if r.transition is not None]
    assert [(t.label, t.phase) for t in transitions] == [("machine_fault", "start")]
    start = transitions[0]
    assert normal.shape[0] - 0.5 * RATE <= start.onset <= normal.shape[0] + 2.0 * RATE
    assert 0.5 < start.peak_score < 1.0 and start.threshold == 0.5
    (end,) = sc.flush(normal.shape[0] + fault.shape[0])
    assert end.phase == "end" and end.event_number == start.event_number


def test_threshold_scale_maps_to_normalised_threshold(state_dir: Path) -> None:
    sc = scorer(state_dir, threshold_scale=3.0)
    assert sc.threshold == pytest.approx(0.75)
    assert sc.events.rule.release == pytest.approx(2.4 / 3.4)


def test_level_gate_machine_off_gives_no_score_and_no_alarm(state_dir: Path,
                                                            cwru: tuple) -> None:
    sc = scorer(state_dir, min_duration_ms=0.0)
    fault = cwru[2][0][2]
    off = stream(sc, fault, level=sc.gate_dbfs - 1.0)
    assert off and all(not r.running and r.score == 0.0 and r.transition is None for r in off)
    on = stream(sc, fault, start=fault.shape[0])
    assert on[-1].running and on[-1].score > 0.5
    assert any(r.transition is not None for r in on)
    configured = scorer(state_dir, min_level_dbfs=-30.0)
    assert configured.gate_dbfs == -30.0


def test_update_is_allocation_free(state_dir: Path, cwru: tuple) -> None:
    sc = scorer(state_dir, publish_hz=0.1)
    mel = logmel_of(cwru[1][: 2 * RATE], PARAMS)
    ends = [i * PARAMS.hop_length + PARAMS.win_length for i in range(3000)]
    for i in range(50):
        sc.update(mel[i], ends[i], RUNNING_DBFS)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for i in range(50, 3000):  # 29.5 s of audio: 295 event-logic steps, 2 readings
            sc.update(mel[i % mel.shape[0]], ends[i], RUNNING_DBFS)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current - base < 200, (base, current, peak)
    assert peak - base < 2048, (base, current, peak)


def test_learning_silence_is_refused(tmp_path: Path) -> None:
    path = wav(tmp_path / "silence.wav", np.zeros(30 * RATE, dtype=np.float32))
    with pytest.raises(ModelError, match=r"learning audio is silent .* record it while"):
        learn_command(machine="pump", sources=[f"file:{path}"], minutes=None,
                      state_dir=tmp_path, frontend=PARAMS)
    assert baselines.list_baselines(tmp_path, "pump") == []


def test_learning_too_little_audio_says_how_much(tmp_path: Path, cwru: tuple) -> None:
    path = wav(tmp_path / "short.wav", cwru[0][: 6 * RATE])
    with pytest.raises(ModelError, match=r"6\.0 s of running-machine audio; need at least 10 s"):
        learn_command(machine="pump", sources=[f"file:{path}"], minutes=None,
                      state_dir=tmp_path, frontend=PARAMS)
    # --minutes caps what is read: 0.1 min of 12 s is too little as well.
    path = wav(tmp_path / "long.wav", cwru[0])
    with pytest.raises(ModelError, match="need at least 10 s"):
        learn_command(machine="pump", sources=[f"file:{path}"], minutes=0.1,
                      state_dir=tmp_path, frontend=PARAMS)


def test_bad_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot read audio file .*nope.wav"):
        learn_command(machine="pump", sources=[f"file:{tmp_path}/nope.wav"], minutes=None,
                      state_dir=tmp_path, frontend=PARAMS)
    with pytest.raises(ConfigError, match="source 'tape:x' is not one of"):
        learn_command(machine="pump", sources=["tape:x"], minutes=None, state_dir=tmp_path,
                      frontend=PARAMS)
    with pytest.raises(ConfigError, match="microphone needs --minutes"):
        learn_command(machine="pump", sources=["mic"], minutes=None, state_dir=tmp_path,
                      frontend=PARAMS)


def test_no_baseline_says_how_to_learn(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"has no learned baseline .*; run `audio-monitor "
                                         r"learn --machine fan`"):
        anomaly.MachineScorer.load(tmp_path, "fan", frontend=PARAMS, config=MachineConfig())


def test_baseline_of_another_front_end_is_refused(state_dir: Path) -> None:
    other = FrontendParams(n_mels=40)
    with pytest.raises(ModelError, match=f"front end {PARAMS.hash()} differs from the live one "
                                         f"{other.hash()}"):
        anomaly.MachineScorer.load(state_dir, "pump", frontend=other, config=MachineConfig())
    other_rate = FrontendParams(sample_rate=22050)
    with pytest.raises(ModelError, match="learned at 16000 Hz, the front end runs at 22050 Hz"):
        anomaly.MachineScorer.load(state_dir, "pump", frontend=other_rate,
                                   config=MachineConfig())


def test_relearn_keeps_last_n_and_never_the_active_one(tmp_path: Path, cwru: tuple) -> None:
    path = wav(tmp_path / "normal.wav", cwru[0])
    for _ in range(4):
        learn_command(machine="pump", sources=[f"file:{path}"], minutes=None,
                      state_dir=tmp_path, frontend=PARAMS, keep=2)
    stamps = baselines.list_baselines(tmp_path, "pump")
    assert len(stamps) == 2
    assert baselines.active_baseline(tmp_path, "pump") == stamps[-1]
    # Roll back to the older one, then prune to 1: the active (older) one stays.
    baselines.activate_baseline(tmp_path, "pump", stamps[0])
    assert baselines.prune_baselines(tmp_path, "pump", keep=1) == []
    assert baselines.list_baselines(tmp_path, "pump") == stamps
    learn_command(machine="pump", sources=[f"file:{path}"], minutes=None, state_dir=tmp_path,
                  frontend=PARAMS, keep=1)
    remaining = baselines.list_baselines(tmp_path, "pump")
    assert len(remaining) == 1 and remaining[0] not in stamps
    assert anomaly.MachineScorer.load(tmp_path, "pump", frontend=PARAMS,
                                      config=MachineConfig()).card["machine"] == "pump"


def test_roc_auc_and_pauc_definition() -> None:
    assert roc_auc_pauc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == (1.0, 1.0)
    assert roc_auc_pauc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == (0.0, 0.0)
    auc, pauc = roc_auc_pauc(np.ones(10), np.ones(10))
    assert auc == pytest.approx(0.5) and pauc == pytest.approx(0.05)  # diagonal: p/2 / p
    # 10 negatives, one ranked above every positive: FPR 0.1 at TPR 0, then TPR 1 -> pAUC 0.
    neg = np.array([5.0] + [0.0] * 9)
    auc, pauc = roc_auc_pauc(neg, np.array([1.0, 2.0]))
    assert auc == pytest.approx(0.9) and pauc == pytest.approx(0.0)


def test_evaluate_anomaly_writes_table_and_json(shared_data: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    assert evaluate_anomaly_command(data_dir=shared_data, frontend=PARAMS, out_json=out,
                                    candidates=["gauss-boxcar", "gauss-frame"],
                                    mixed_db=(-30.0,)) == 0
    result = json.loads(out.read_text())
    real = {k: v for k, v in result["candidates"]["gauss-boxcar"]["per_type"].items()
            if k.startswith("real/")}
    assert set(real) == {"real/ball", "real/inner_race", "real/outer_race"}
    assert all(v["auc"] >= 0.99 for v in real.values())
    assert result["deployed"]["normal_alarm_fraction"] <= 0.05
    text = capsys.readouterr().out
    assert "gauss-boxcar" in text and "gauss-frame" in text and "real ball" in text


# --- end to end through the real daemon -------------------------------------------------------

def test_daemon_publishes_machine_fault_only_for_faulty_part(
        state_dir: Path, cwru: tuple, tiny_model: Path, tmp_path: Path) -> None:
    normal, fault = cwru[1], cwru[2][1][2]
    audio = wav(tmp_path / "machine.wav", np.concatenate([normal, fault]))
    config = tmp_path / "config.yaml"
    config.write_text(f"sensor_id: test-plant\nmodel:\n  path: {tiny_model}\n"
                      f"state_dir: {state_dir}\n"
                      "machines:\n  pump:\n    min_duration_ms: 2000\n    publish_hz: 4\n")
    endpoint = f"ipc://{tmp_path}/d.sock"
    sub: zmq.Socket = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt_string(zmq.SUBSCRIBE, "")
    sub.connect(endpoint)
    process = subprocess.Popen(
        [sys.executable, "-m", "monitor", "run", "--config", str(config), "--source",
         f"file:{audio}", "--publish", endpoint, "--wait-subscriber", "10", "--fast"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
    messages: list[Message] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if sub.poll(100):
                message = decode(sub.recv_multipart())
                messages.append(message)
                if isinstance(message, Status) and message.state == "stopped":
                    break
        _, stderr = process.communicate(timeout=20)
    finally:
        sub.close()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr.decode(errors="replace")
    boundary = normal.shape[0] / RATE
    faults = [m for m in messages if isinstance(m, Event) and m.label == "machine_fault"]
    assert [e.phase for e in faults][:1] == ["start"], faults
    assert {e.machine for e in faults} == {"pump"}
    assert boundary - 0.5 <= faults[0].onset_s <= boundary + 3.0, faults[0]
    health = [m for m in messages if isinstance(m, Anomaly)]
    assert health and all(m.machine == "pump" and m.running for m in health)
    before = [m.score for m in health if m.t_audio_s < boundary]
    after = [m.score for m in health if m.t_audio_s > boundary + 2.0]
    assert np.mean(np.array(before[4:]) >= 0.5) <= 0.05
    assert np.mean(np.array(after) >= 0.5) >= 0.9
