"""The event detector: one class owns the onnxruntime session and its model card.

The model card (``<model>.json`` beside the ONNX file) states the classes, the
input/output tensors, the window length in frames and the front end the model was
trained on. Loading checks the card against the model and the front end against
its hash, and names exactly what differs: a model fed features it was not trained
on fails loudly at start-up instead of scoring garbage for months.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
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
_PROBE_CHANNELS = 64
PROBE_FILE = Path(__file__).with_name("int8_probe.onnx")
"""`_saturation_probe`, serialised: read at start instead of importing `onnx` (about a
second) to build it; a test checks the two are the same bytes."""
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _first_line(err: BaseException) -> str:
    """onnxruntime's and onnx's errors span lines; their first names the problem."""
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def _saturation_probe() -> bytes:
    """A 1x1 QDQ convolution, x (1, 64, 1, 1) u8 -> s8 weights (all 127) -> u8 output (scale
    1e4): the pattern onnxruntime fuses into its u8 x s8 convolution kernel. With x all 255
    the exact sum is 64 x 255 x 127 = 2,072,640; each pair of products (64,770) overflows a
    16-bit lane."""
    from onnx import TensorProto, helper, numpy_helper

    c = _PROBE_CHANNELS
    inits = [numpy_helper.from_array(np.full((1, c, 1, 1), 127.0, np.float32), "w"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(1e4, np.float32), "out_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "zp_u8"),
             numpy_helper.from_array(np.array(0, np.int8), "zp_s8")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "one", "zp_u8"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "one", "zp_u8"], ["x_dq"]),
             helper.make_node("QuantizeLinear", ["w", "one", "zp_s8"], ["w_q"]),
             helper.make_node("DequantizeLinear", ["w_q", "one", "zp_s8"], ["w_dq"]),
             helper.make_node("Conv", ["x_dq", "w_dq"], ["y_f"]),
             helper.make_node("QuantizeLinear", ["y_f", "out_scale", "zp_u8"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "out_scale", "zp_u8"], ["y"])]
    graph = helper.make_graph(
        nodes, "saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def probe_int8(model: bytes | None = None) -> float:
    """Run the probe (`PROBE_FILE`, or `model`, the same graph in another form) through
    onnxruntime's default optimisation on this CPU: its output, 2,070,000 (207 x 1e4) where
    the fused kernels sum exactly."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model or PROBE_FILE.read_bytes(), options,
                                   providers=["CPUExecutionProvider"])
    x = np.full((1, _PROBE_CHANNELS, 1, 1), 255.0, np.float32)
    return float(session.run(None, {"x": x})[0].ravel()[0])


@functools.cache
def int8_saturates() -> bool:
    """True where onnxruntime's fused u8 x s8 kernels lose precision on this CPU: on x86
    without VNNI or AMX (AVX2, AVX-512 F/BW) they add pairs of u8 x s8 products in saturating
    16-bit lanes (`pmaddubsw`), and a quantised graph's outputs drift far from its integer
    result (the shipped event model found 4 of 21 validation glass breaks on an AVX2-only
    EPYC; model card, "CPUs"). Measured once per process by `probe_int8`, not read from CPU
    flags, so it holds for any CPU, emulator or onnxruntime build. False (with a warning)
    where the probe cannot run."""
    try:
        return probe_int8() != round(_PROBE_CHANNELS * 255 * 127 / 1e4) * 1e4
    except Exception as err:  # onnx or onnxruntime, untyped: the models still load as they are
        logger.warning("int8 kernel probe failed (%s); running quantised models as stored", err)
        return False


def _reads_zero_point(node: Any, zp: str) -> bool:
    """Whether `node` (an onnx NodeProto) is a QuantizeLinear/DequantizeLinear reading `zp`."""
    return node.op_type in _QDQ and len(node.input) > 2 and node.input[2] == zp


def unsigned_int8_weights(model: bytes) -> bytes:
    """The same ONNX graph with its s8 quantisation stored as u8: each INT8 zero point that
    only QuantizeLinear/DequantizeLinear pairs read (and each INT8 initializer a
    DequantizeLinear reads with it) moves up by 128. (q + 128) - (z + 128) = q - z and the
    clamp ranges shift alike, so every quantised-then-dequantised value is unchanged, and
    onnxruntime then fuses u8 x u8 kernels, which widen to 16 bits before multiplying and sum
    exactly on every x86 CPU: bit for bit the outputs of the s8 graph on a VNNI CPU. About
    twice the s8 kernels' time on a VNNI CPU, so only for CPUs where `int8_saturates`. A zero
    point is left as it is wherever anything else could see its int8 tensors (another
    operator, a graph input or output; value_info declarations are retyped), and a graph
    with subgraphs is returned unchanged (`model` itself, as where nothing moves). Raises what
    `onnx` raises on bytes that are not a model."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load_from_string(model)
    g = m.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in g.node for a in node.attribute):
        return model
    int8 = onnx.TensorProto.INT8
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    seen = {v.name for v in g.input} | {v.name for v in g.output}
    declared = {v.name: v for v in g.value_info}  # shape inference's types: retyped below

    def movable(zp: str) -> list[str] | None:
        """`zp` and the INT8 initializers that move with it, or None where anything but its
        own Q/DQ pairs could see them."""
        if zp in seen or any(not _reads_zero_point(n, zp) for n in readers[zp]):
            return None
        names = [zp]
        quantised = {n.output[0] for n in readers[zp] if n.op_type == "QuantizeLinear"}
        for node in readers[zp]:
            if node.op_type == "QuantizeLinear":
                out = node.output[0]
                if out in seen or any(not (n.op_type == "DequantizeLinear"
                                           and _reads_zero_point(n, zp) and n.input[0] == out)
                                      for n in readers.get(out, [])):
                    return None
                continue
            data = node.input[0]
            if data in quantised:
                continue
            t = inits.get(data)
            if t is None or t.data_type != int8 or data in seen or any(
                    n.op_type != "DequantizeLinear" or not _reads_zero_point(n, zp)
                    for n in readers[data]):
                return None
            names.append(data)
        return names

    moved = 0
    for zp, t in list(inits.items()):
        if t.data_type != int8 or zp not in readers:
            continue
        names = movable(zp)
        if names is None:
            continue
        moved += 1
        for name in dict.fromkeys(names):
            shifted = numpy_helper.to_array(inits[name]).astype(np.int16) + 128
            inits[name].CopyFrom(numpy_helper.from_array(shifted.astype(np.uint8), name))
        for tensor in [*names, *(n.output[0] for n in readers[zp]
                                 if n.op_type == "QuantizeLinear")]:
            if tensor in declared:
                declared[tensor].type.tensor_type.elem_type = onnx.TensorProto.UINT8
    return bytes(m.SerializeToString()) if moved else model


def signed_zero_points(model: bytes) -> int:
    """How many INT8 zero points QuantizeLinear/DequantizeLinear nodes of `model` read (main
    graph): the layers that run u8 x s8 kernels."""
    import onnx

    graph = onnx.load_from_string(model).graph
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    return len({zp for zp in int8 if any(_reads_zero_point(n, zp) for n in graph.node)})


U8_CACHE_DAYS = 30
"""A cached u8 form unused for this long is deleted when another is written."""
U8_FORM_VERSION = 1
"""Part of a cached u8 form's name: bump when `unsigned_int8_weights` changes what it makes."""


def u8_cache_dir() -> Path | None:
    """Where u8 forms of models are kept between runs (`open_session`): systemd's
    `CacheDirectory` ($CACHE_DIRECTORY), else $XDG_CACHE_HOME or ~/.cache, in an
    `audio-monitor/int8` folder; None when none of them names an absolute folder."""
    systemd = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if os.path.isabs(systemd):
        return Path(systemd) / "int8"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "audio-monitor" / "int8"
    home = os.path.expanduser("~") if os.environ.get("HOME") != "" else ""
    return Path(home) / ".cache" / "audio-monitor" / "int8" if os.path.isabs(home) else None


def _cached_u8(model: bytes, session: Any) -> tuple[Any, Path | None]:
    """(a session of the kept u8 form of `model`, or None; the path its forms' names start
    with, None without a cache folder). A form is named `u8-v{U8_FORM_VERSION}-{sha256 of
    model}-{sha256 of the form}.onnx` and used only if its bytes still hash to its name;
    nothing here raises (a cache that cannot be read only costs the rewrite)."""
    folder = u8_cache_dir()
    if folder is None:
        return None, None
    prefix = f"u8-v{U8_FORM_VERSION}-{hashlib.sha256(model).hexdigest()}-"
    try:
        kept = sorted(folder.glob(f"{prefix}*.onnx"))
        for path in kept:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != path.name[len(prefix):-len(".onnx")]:
                logger.debug("ignoring the cached u8 form %s: its bytes changed", path)
                continue
            try:
                fitted = session(data)
            except Exception as err:  # onnxruntime's own untyped errors
                logger.debug("ignoring the cached u8 form %s: %s", path, _first_line(err))
                continue
            with contextlib.suppress(OSError):
                os.utime(path)
            return fitted, folder / prefix
    except OSError as err:
        logger.debug("cannot read the u8 cache %s: %s", folder, err)
    return None, folder / prefix


def _keep_u8(stem: Path, data: bytes) -> None:
    """Write a u8 form atomically as `stem` + its sha256 + `.onnx` (`_cached_u8`) and delete
    forms (and leftovers of writes) unused for U8_CACHE_DAYS; best effort: a read-only or
    full disk only costs the next start the rewrite."""
    folder = stem.parent
    path = stem.with_name(f"{stem.name}{hashlib.sha256(data).hexdigest()}.onnx")
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".u8-", suffix=".part")
        tmp = Path(name)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        tmp.replace(path)
        tmp = None
        cutoff = time.time() - U8_CACHE_DAYS * 86400
        for old in [*folder.glob("u8-*.onnx"), *folder.glob(".u8-*.part")]:
            with contextlib.suppress(OSError):
                if old.lstat().st_mtime < cutoff:
                    old.unlink()
    except OSError as err:
        logger.debug("cannot keep the u8 form in %s: %s", folder, err)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def open_session(model: Path | bytes, options: ort.SessionOptions, *,
                 name: object = None) -> tuple[ort.InferenceSession, bool]:
    """An onnxruntime session for `model` (a file, or a graph's bytes; `name` for the log) as
    this CPU should run it, and whether its int8 weights run as u8 (`int8_saturates`). Where
    the u8 form fails to load, the model runs as stored, and where some s8 zero points could
    not move (`signed_zero_points`), they stay: each with a warning, since those layers
    saturate. Raises what onnxruntime and onnx raise for a bad model.

    A u8 form that loads is kept in `u8_cache_dir`, named by the sha256 of the model's bytes
    (a file's own bytes: external data it names is not part of the name) and its own, so
    later starts skip importing `onnx` and rewriting the graph (about a second); a kept form
    whose bytes no longer hash to its name is made again."""
    name = model if name is None and isinstance(model, Path) else name

    def session(data: bytes | str) -> ort.InferenceSession:
        return ort.InferenceSession(data, sess_options=options,
                                    providers=["CPUExecutionProvider"])

    if not int8_saturates():
        return session(str(model) if isinstance(model, Path) else model), False
    fitted, stem = _cached_u8(model.read_bytes() if isinstance(model, Path) else model,
                              session)
    if fitted is not None:
        return fitted, True
    import onnx

    # A file's bytes with any external data it names.
    stored = onnx.load(str(model)).SerializeToString() if isinstance(model, Path) else model
    unsigned = unsigned_int8_weights(stored)
    if unsigned is stored:
        fitted = None
    else:
        try:
            fitted = session(unsigned)
        except Exception as err:  # onnxruntime's own untyped errors
            logger.warning("%s: its int8 weights as u8 do not load (%s); running it as "
                           "stored, where this CPU's u8 x s8 kernels saturate", name,
                           _first_line(err))
            return session(stored), False
    left = signed_zero_points(unsigned)
    if left:
        logger.warning("%s: %d int8 zero points cannot be stored as u8 (another operator, a "
                       "graph input or output or a subgraph sees them); those layers run on "
                       "this CPU's saturating u8 x s8 kernels", name, left)
    if fitted is None:
        return session(stored), False
    if stem is not None and not left:
        _keep_u8(stem, unsigned)
    return fitted, True


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
        try:
            self._session, unsigned = open_session(model_path, options)
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ModelError(f"model file {model_path} cannot be loaded: "
                             f"{_first_line(err)}") from err
        self.unsigned_int8 = unsigned
        """True when this CPU's fused u8 x s8 kernels saturate and the model's s8 weights run
        as u8 (`unsigned_int8_weights`): the same outputs, slower kernels."""
        if self.unsigned_int8:  # every command builds a detector: not above DEBUG
            logger.debug("%s: this CPU's u8 x s8 kernels saturate; running its int8 weights "
                         "as u8 (same outputs, slower kernels)", model_path)
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
