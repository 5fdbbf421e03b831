"""The event detector: one class owns the onnxruntime session and its model card.

The model card (``<model>.json`` beside the ONNX file) states the classes, the
input/output tensors, the window length in frames and the front end the model was
trained on. Loading checks the card against the model and the front end against
its hash, and names exactly what differs: a model fed features it was not trained
on fails loudly at start-up instead of scoring garbage for months.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from monitor.dsp.frontend import FrontendParams, silence_frame
from monitor.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

CARD_SCHEMA = 1
ORT_SPINNING_ENV = "AUDIO_MONITOR_ORT_SPINNING"
"""Set to 1 to keep onnxruntime's spin-waiting pool threads (benchmarks compare)."""
INT8_EXACT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
"""x86 features with which onnxruntime's fused u8 x s8 kernels sum exactly."""


def int8_saturates(cpuinfo: str | None = None) -> bool:
    """True on an x86 CPU without VNNI or AMX (`cpuinfo`, default Linux /proc/cpuinfo: the
    first processor's flags). There onnxruntime's fused int8 kernels multiply u8 x s8 pairs
    with a saturating 16-bit add (AVX2/SSE `pmaddubsw`), so a quantised graph's outputs drift
    far from its exact integer result: the shipped event model found 4 of 21 validation glass
    breaks on an AVX2-only EPYC, 20 of 21 unfused (model card, "CPUs"). False where the flags
    cannot be read or are not x86's (ARM's int8 dot products are exact)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    first = cpuinfo.strip().split("\n\n", 1)[0]
    flags = next((line.split(":", 1)[1].split() for line in first.splitlines()
                  if line.split(":", 1)[0].strip() == "flags"), None)
    if flags is None or "sse2" not in flags:
        return False
    return not any(f in flags for f in INT8_EXACT_FLAGS)


def exact_int8_options(options: ort.SessionOptions, *, saturates: bool | None = None) -> bool:
    """Where fused int8 kernels saturate (`int8_saturates`), set `options` to leave a quantised
    graph's QuantizeLinear/DequantizeLinear pairs unfused: the convolutions then run in float
    on the exactly dequantised values, several times slower (8 ms instead of 2 ms a window on
    one AVX2 core) but with the outputs the model was trained and measured on. Returns whether
    it did."""
    if not (int8_saturates() if saturates is None else saturates):
        return False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return True


@dataclass(frozen=True)
class ModelCard:
    """What the daemon needs to know about a model; read from its JSON card."""

    path: Path
    name: str
    classes: tuple[str, ...]
    input_name: str
    output_name: str
    window_frames: int
    frontend: FrontendParams
    thresholds: dict[str, float]
    sha256: str | None
    fetch: str | None
    """Command that (re)creates the model file, for the missing-file message."""
    rules: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    """Per-class event-logic defaults tuned with the model (confirm_n, confirm_m,
    min_duration_ms, refractory_ms, release); the config overrides them."""
    onset_lead_ms: float | None = None
    """How long before the end of the first window that scores a hit its sound typically
    began (measured in evaluation); null: half a window."""


def read_card(model_path: Path) -> ModelCard:
    """Read and validate ``model_path.with_suffix('.json')``."""
    card_path = model_path.with_suffix(".json")
    try:
        raw = json.loads(card_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ModelError(f"model card {card_path} not found; every model needs its card "
                         "beside it (same name, .json)") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"model card {card_path} is unreadable: {err}") from err
    if not isinstance(raw, dict):
        raise ModelError(f"model card {card_path} must be a JSON object")
    if raw.get("schema") != CARD_SCHEMA:
        raise ModelError(f"model card {card_path}: schema {raw.get('schema')!r} is not "
                         f"supported; expected {CARD_SCHEMA}")
    try:
        frontend_raw = dict(raw["frontend"])
        stated_hash = frontend_raw.pop("hash", None)
        try:
            frontend = FrontendParams.from_dict(frontend_raw, where="frontend")
            frontend.validate()
        except ConfigError as err:
            raise ModelError(f"model card {card_path}: {err}") from err
        if stated_hash != frontend.hash():
            raise ModelError(
                f"model card {card_path}: front-end hash {stated_hash!r} does not match its "
                f"parameters (this build computes {frontend.hash()!r}); the model was made "
                "for a different front end: retrain or re-export it with this version")
        classes = tuple(str(c) for c in raw["classes"])
        input_spec, output_spec = raw["input"], raw["output"]
        card = ModelCard(
            path=model_path, name=str(raw["name"]), classes=classes,
            input_name=str(input_spec["name"]), output_name=str(output_spec["name"]),
            window_frames=int(raw["window_frames"]), frontend=frontend,
            thresholds={str(k): float(v) for k, v in raw.get("thresholds", {}).items()},
            sha256=raw.get("sha256"), fetch=raw.get("fetch"),
            onset_lead_ms=None if raw.get("onset_lead_ms") is None
            else float(raw["onset_lead_ms"]),
            rules={str(name): {str(k): float(v) for k, v in fields.items()}
                   for name, fields in raw.get("rules", {}).items()})
        expected_in = [1, card.window_frames, frontend.n_mels]
        if list(input_spec["shape"]) != expected_in:
            raise ModelError(f"model card {card_path}: input shape {input_spec['shape']} "
                             f"does not match window_frames x n_mels {expected_in}")
        if list(output_spec["shape"]) != [1, len(classes)]:
            raise ModelError(f"model card {card_path}: output shape {output_spec['shape']} "
                             f"does not match its {len(classes)} classes")
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"model card {card_path}: missing or malformed field {err}") from err
    unknown = sorted((set(card.thresholds) | set(card.rules)) - set(classes))
    if unknown:
        raise ModelError(f"model card {card_path}: thresholds or rules for unknown classes "
                         f"{unknown}")
    allowed = {"release", "confirm_n", "confirm_m", "min_duration_ms", "refractory_ms"}
    for name, fields in card.rules.items():
        extra = sorted(set(fields) - allowed)
        if extra:
            raise ModelError(f"model card {card_path}: rules.{name} has unknown keys {extra}; "
                             f"allowed: {sorted(allowed)}")
    return card


class Detector:
    """Scores a sliding window of log-mel frames with an ONNX model.

    Frames are pushed one at a time into a doubled buffer, so the newest window is
    always one contiguous view and scoring copies nothing. The history starts filled with
    `silence` (the front end's frame of digital silence), so a window can be scored from
    the first frame of a stream on: as if the stream were preceded by silence.
    """

    def __init__(self, model_path: Path, *, threads: int = 1) -> None:
        self.card = card = read_card(model_path)
        if not model_path.is_file():
            fix = f"run `{card.fetch}`" if card.fetch else "check model.path in the config"
            raise ModelError(f"model file {model_path} not found; {fix}")
        if card.sha256 is not None:
            digest = _sha256(model_path)
            if digest != card.sha256:
                fix = f"run `{card.fetch}`" if card.fetch else "use the file its card describes"
                raise ModelError(f"model file {model_path} has sha256 {digest[:16]}..., its card "
                                 f"expects {card.sha256[:16]}...; {fix}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads > 1 and os.environ.get(ORT_SPINNING_ENV) != "1":
            # onnxruntime's pool threads spin-wait between runs by default: ~30 % of a core
            # at 10 windows a second for 2 threads (benchmarks). Ours wait ~100 ms: sleep.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.exact_int8 = exact_int8_options(options)
        """True when this CPU's fused int8 kernels saturate and the graph runs unfused."""
        if self.exact_int8:
            logger.warning("%s: this CPU has no VNNI, so onnxruntime's fused int8 kernels "
                           "saturate; running the model unfused (exact, slower)", model_path)
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped errors
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise ModelError(f"model file {model_path} cannot be loaded: {first_line}") from err
        self._check_io()
        self.classes = card.classes
        self.window_frames = card.window_frames
        n_mels = card.frontend.n_mels
        self.silence = silence_frame(card.frontend)
        """(n_mels,) log-mel frame of digital silence, read-only: history before the first
        frame, and the padding after the last one (see `Processor.finish`)."""
        self._frames = np.zeros((2 * self.window_frames, n_mels), dtype=np.float32)
        self._position = 0
        self.frames_seen = 0
        self.reset()
        self.scores = np.zeros(len(self.classes), dtype=np.float32)
        """Scores of the latest window (updated in place by `score`)."""

    def _check_io(self) -> None:
        card = self.card
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if card.input_name not in inputs:
            raise ModelError(f"model {card.path}: card names input {card.input_name!r}, the "
                             f"model has {sorted(inputs)}")
        if card.output_name not in outputs:
            raise ModelError(f"model {card.path}: card names output {card.output_name!r}, the "
                             f"model has {sorted(outputs)}")
        expected = {card.input_name: [1, card.window_frames, card.frontend.n_mels],
                    card.output_name: [1, len(card.classes)]}
        for name, arg in ((card.input_name, inputs[card.input_name]),
                          (card.output_name, outputs[card.output_name])):
            if not _shape_matches(arg.shape, expected[name]):
                raise ModelError(f"model {card.path}: tensor {name!r} has shape {arg.shape}, "
                                 f"its card and front end need {expected[name]}")
            if arg.type != "tensor(float)":
                raise ModelError(f"model {card.path}: tensor {name!r} has type {arg.type}, "
                                 "expected tensor(float)")

    def reset(self) -> None:
        """Forget pushed frames (a new stream): the history is silence again."""
        self._frames[:] = self.silence
        self._position = 0
        self.frames_seen = 0

    def push(self, frame: np.ndarray) -> None:
        """Append one log-mel frame (n_mels,) to the window."""
        w = self.window_frames
        self._frames[self._position] = frame
        self._frames[self._position + w] = frame
        self._position = (self._position + 1) % w
        self.frames_seen += 1

    @property
    def latest_frame(self) -> np.ndarray:
        """The most recently pushed frame (a view)."""
        return self._frames[(self._position - 1) % self.window_frames]

    @property
    def window_full(self) -> bool:
        """True once the window holds only pushed frames (no silence from before the stream)."""
        return self.frames_seen >= self.window_frames

    def score(self) -> np.ndarray:
        """Score the newest window; returns `self.scores` (valid until the next call)."""
        start = self._position
        window = self._frames[start:start + self.window_frames][np.newaxis]
        (result,) = self._session.run([self.card.output_name], {self.card.input_name: window})
        np.nan_to_num(np.asarray(result).reshape(-1), copy=False, nan=0.0, posinf=1.0,
                      neginf=0.0)
        np.clip(result.reshape(-1), 0.0, 1.0, out=self.scores)
        return self.scores


def _shape_matches(actual: list[Any], expected: list[int]) -> bool:
    if len(actual) != len(expected):
        return False
    return all(not isinstance(a, int) or a == e for a, e in zip(actual, expected, strict=True))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
