"""The processing chain: rule precedence, and results independent of block size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from tiny_model import build_tiny_model

from monitor.config import load_config
from monitor.detect.anomaly import MachineReading
from monitor.detect.detector import Detector
from monitor.detect.events import Transition
from monitor.dsp.levels import LevelMeter
from monitor.errors import ConfigError, ModelError
from monitor.pipeline.processor import Processor
from monitor.pipeline.rules import resolve_rules
from monitor.pipeline.timing import derive_timing


class Recorder:
    def __init__(self) -> None:
        self.transitions: list[Transition] = []
        self.scores: list[tuple[int, np.ndarray]] = []
        self.levels: list[tuple[int, float, float]] = []
        self.machines: list[MachineReading] = []

    def on_transition(self, transition: Transition) -> None:
        self.transitions.append(transition)

    def on_scores(self, end: int, scores: np.ndarray, inference_ms: float) -> None:
        self.scores.append((end, scores.copy()))

    def on_level(self, end: int, meter: LevelMeter, mel_frame: np.ndarray) -> None:
        self.levels.append((end, meter.rms_dbfs, meter.peak_dbfs))

    def on_machine(self, reading: MachineReading) -> None:
        self.machines.append(reading)

    @property
    def received(self) -> int:
        return len(self.transitions) + len(self.scores) + len(self.levels) + len(self.machines)


def model_with_rules(folder: Path, rules: dict[str, dict[str, float]]) -> Path:
    path = build_tiny_model(folder, thresholds={"loud": 0.6})
    card = json.loads(path.with_suffix(".json").read_text())
    card["rules"] = rules
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


def test_rule_precedence_config_then_card_then_default(tmp_path: Path) -> None:
    model = model_with_rules(tmp_path, {"loud": {"confirm_n": 2, "confirm_m": 3,
                                                 "refractory_ms": 500}})
    detector = Detector(model)
    config = load_config(None, overrides={"events.classes": {"loud": {"confirm_n": 3}},
                                          "events.default.min_duration_ms": 200})
    rules = resolve_rules(config, detector, derive_timing(config, detector))
    loud = rules["loud"]
    assert loud.threshold == 0.6  # card threshold
    assert (loud.confirm_n, loud.confirm_m) == (3, 3)  # config beats card, card beats default
    assert loud.refractory == 8000  # card: 500 ms at 16 kHz
    assert loud.min_duration == 3200  # default
    assert loud.release == pytest.approx(0.48)  # 0.8 x threshold
    assert set(rules) == {"loud"}  # "quiet" has no threshold anywhere: no events


def test_unknown_class_in_config_suggests_the_right_one(tiny_model: Path) -> None:
    detector = Detector(tiny_model)
    config = load_config(None, overrides={"events.classes": {"Loud": {}}})
    with pytest.raises(ConfigError, match="events.classes.Loud: .* did you mean 'loud'"):
        resolve_rules(config, detector, derive_timing(config, detector))


def test_card_rules_with_unknown_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"rules.loud has unknown keys \['treshold'\]"):
        Detector(model_with_rules(tmp_path, {"loud": {"treshold": 0.2}}))


def run(processor: Processor, audio: np.ndarray, sizes: list[int]) -> None:
    start, i = 0, 0
    while start < audio.shape[0]:
        size = sizes[i % len(sizes)]
        processor.process(audio[start:start + size])
        start += size
        i += 1
    processor.finish()


def test_results_do_not_depend_on_block_size(shared_data: Path, tiny_model: Path) -> None:
    """Stereo 48 kHz from a real recording: downmix, resample, front end, model, events."""
    clip, rate = sf.read(str(sorted((shared_data / "safe" / "fall").glob("*.flac"))[3]),
                         dtype="float32")
    mono = np.concatenate([np.zeros(rate, np.float32), clip, np.zeros(rate, np.float32)])
    from scipy.signal import resample_poly

    at_48k = resample_poly(mono, 3, 1).astype(np.float32)
    stereo = np.stack([at_48k, 0.25 * at_48k], axis=1).reshape(-1)
    config = load_config(None, overrides={"model.stride_ms": 50})
    outcomes = []
    for sizes in ([2 * 4096], [2 * 7, 2 * 1000, 2 * 13], [2 * 480]):
        recorder = Recorder()
        processor = Processor.from_config(
            config, Detector(tiny_model), in_rate=48000, channels=2, max_block=4096, sink=recorder)
        run(processor, stereo, sizes)
        outcomes.append(recorder)
    first = outcomes[0]
    assert first.transitions and len(first.scores) > 10 and len(first.levels) > 10
    for other in outcomes[1:]:
        assert other.transitions == first.transitions
        assert [end for end, _ in other.scores] == [end for end, _ in first.scores]
        for (_, a), (_, b) in zip(other.scores, first.scores, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(other.levels, first.levels, atol=1e-3)


def test_no_result_comes_before_the_predicted_frame(shared_data: Path, tiny_model: Path,
                                                    tmp_path: Path) -> None:
    """`frames_until_output` is what the daemon sleeps on: one input frame less brings no
    result (so sleeping never delays one), and nearly every predicted frame brings one (only a
    machine's evaluations without a reading to publish do not). 48 kHz stereo through the
    resampler, with levels, scored windows and a machine scorer learned on a real recording,
    each on its own phase."""
    from scipy.signal import resample_poly

    from monitor.detect.learn import learn_command, load_cwru
    from monitor.dsp.frontend import FrontendParams

    machine = load_cwru(shared_data, rate=16000)[0][:16000 * 20]  # a real machine recording
    normal = tmp_path / "normal.wav"
    sf.write(str(normal), machine, 16000, subtype="FLOAT")
    assert learn_command(machine="fan", sources=[f"file:{normal}"], minutes=None,
                         state_dir=tmp_path, frontend=FrontendParams()) == 0
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"state_dir: {tmp_path}\nmodel:\n  stride_ms: 50\n"
                           "machines:\n  fan: {min_level_dbfs: -120}\n")
    recorder = Recorder()
    processor = Processor.from_config(
        load_config(config_file), Detector(tiny_model), in_rate=48000, channels=2, max_block=4096,
        sink=recorder)
    seconds = 4
    stereo = np.repeat(resample_poly(machine[:16000 * seconds], 3, 1).astype(np.float32), 2)
    done = hits = misses = 0
    while True:
        wait = processor.frames_until_output()
        assert wait >= 1
        if 2 * (done + wait) > stereo.shape[0]:
            break
        before = recorder.received
        processor.process(stereo[2 * done:2 * (done + wait - 1)])
        assert recorder.received == before, f"a result came before frame {done + wait}"
        processor.process(stereo[2 * (done + wait - 1):2 * (done + wait)])
        if recorder.received > before:
            hits += 1
        else:
            misses += 1
        done += wait
    assert len(recorder.scores) > 60 and len(recorder.levels) > 30
    assert len(recorder.machines) > 10
    assert hits > 90 and misses <= 10 * seconds  # the machine evaluates 10 times a second


def test_hot_path_retains_no_memory(tiny_model: Path) -> None:
    """One 10 ms block at a time through the whole chain: nothing accumulates per hop."""
    import tracemalloc

    from monitor.pipeline.results import NullSink

    config = load_config(None, overrides={"model.stride_ms": 100})
    processor = Processor.from_config(
        config, Detector(tiny_model), in_rate=48000, channels=2, max_block=4096, sink=NullSink())
    rng = np.random.default_rng(0)
    block = (0.1 * rng.standard_normal(2 * 480)).astype(np.float32)
    for _ in range(3000):  # onnxruntime's Python binding fills its caches over ~1000 runs
        processor.process(block)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(3000):  # 30 s of audio: 3000 hops, 300 scored windows
        processor.process(block)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert processor.windows >= 500
    # One retained object per hop would be >= 48 kB; allow the binding's occasional 32 B.
    assert grown < 4096, f"{grown} bytes retained over 3000 hops"


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "events.onnx"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="models/events.onnx absent: run "
                                                  "`audio-monitor fetch-models`")
@pytest.mark.parametrize("stride_ms", [100.0, 250.0])
def test_training_replays_windows_as_the_live_chain_scores_them(stride_ms: float) -> None:
    """Training chooses rules on windows placed by its own `StreamTiming`; the daemon runs
    them on windows placed by `Timing`. They must cover and step the same samples, or a
    rule tuned there would confirm differently here."""
    from monitor.training.rules import StreamTiming

    detector = Detector(SHIPPED)
    config = load_config(None, overrides={"model.stride_ms": stride_ms})
    timing = derive_timing(config, detector)
    stream = StreamTiming.of(detector.card.frontend, stride_frames=timing.stride_frames)
    assert (stream.window, stream.stride, stream.sample_rate) == \
        (timing.detector_window, timing.stride, timing.sample_rate)
    recorder = Recorder()
    processor = Processor.from_config(
        config, detector, in_rate=timing.sample_rate, channels=1, max_block=4096, sink=recorder)
    processor.process(np.zeros(3 * timing.sample_rate, np.float32))
    ends = np.array([end for end, _ in recorder.scores])
    assert len(ends) > 3 and set(np.diff(ends)) == {stream.stride}
