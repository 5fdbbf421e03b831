"""Build ONNX graphs from the assembled YAMNet: the embedding extractor and `events.onnx`.

YAMNet's weights are not ours to redistribute, so `events.onnx` is never committed: it is
rebuilt here from `models/yamnet.onnx` plus our small committed head (`event-head.npz`),
deterministically, and checked against the sha256 in its card `events.json`.
The cut point is the 1024-d embedding YAMNet computes before its own classifier (global
average pool -> reshape -> quantise/dequantise), exactly what the head was trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from monitor.errors import ModelError
from monitor.yamnet import FIX, MODEL_FILE, N_MELS, WINDOW_FRAMES, verify_model

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

EMBEDDING_TENSOR = "/model/Reshape_output_0_qdq"
"""The [1, 1024] dequantised embedding feeding YAMNet's classifier Gemm."""
EMBEDDING_DIM = 1024
HEAD_FILE = "event-head.npz"
CARD_FILE = "events.json"
EVENTS_FILE = "events.onnx"
INPUT_NAME = "log_mel"
OUTPUT_NAME = "scores"
_PRODUCER = ("audio-monitor", "events-compose-1")
_BATCH = "batch"


def _load(yamnet_path: Path) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.load(str(yamnet_path))
    except Exception as err:  # protobuf / OSError
        raise ModelError(f"cannot load {yamnet_path}: {err}; {FIX}") from err


def _cut_at_embedding(model: onnx.ModelProto) -> None:
    """Drop every node after the embedding and every initialiser no remaining node reads."""
    g = model.graph
    producers = {out: i for i, node in enumerate(g.node) for out in node.output}
    if EMBEDDING_TENSOR not in producers:
        raise ModelError(f"YAMNet graph has no tensor {EMBEDDING_TENSOR!r}; {FIX}")
    keep: set[int] = set()
    todo = [EMBEDDING_TENSOR]
    while todo:
        name = todo.pop()
        idx = producers.get(name)
        if idx is None or idx in keep:
            continue
        keep.add(idx)
        todo.extend(i for i in g.node[idx].input if i)
    nodes = [node for i, node in enumerate(g.node) if i in keep]
    del g.node[:]
    g.node.extend(nodes)
    used = {i for node in nodes for i in node.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.output[:]
    del g.value_info[:]


def embedding_model_bytes(yamnet_path: Path, *, batched: bool = True) -> bytes:
    """YAMNet cut at the embedding: `log_mel` [B, 96, 64] -> `embedding` [B, 1024] (training)."""
    from onnx import TensorProto, helper, numpy_helper

    model = _load(yamnet_path)
    _cut_at_embedding(model)
    g = model.graph
    if batched:
        for t in g.initializer:
            if t.name == "log_mel_shape4":
                t.CopyFrom(numpy_helper.from_array(
                    np.array([-1, 1, WINDOW_FRAMES, N_MELS], np.int64), t.name))
            elif t.name == "/model/Constant_output_0":
                t.CopyFrom(numpy_helper.from_array(
                    np.array([-1, EMBEDDING_DIM], np.int64), t.name))
        del g.input[:]
        g.input.append(helper.make_tensor_value_info(
            INPUT_NAME, TensorProto.FLOAT, [_BATCH, WINDOW_FRAMES, N_MELS]))
    g.node.append(helper.make_node("Identity", [EMBEDDING_TENSOR], ["embedding"]))
    g.output.append(helper.make_tensor_value_info(
        "embedding", TensorProto.FLOAT, [_BATCH if batched else 1, EMBEDDING_DIM]))
    return model.SerializeToString(deterministic=True)


def head_arrays(head_path: Path) -> dict[str, np.ndarray]:
    """The committed head: `w1` (1024, H), `b1` (H,), `w2` (H, C), `b2` (C,), float32; input
    standardisation is already folded into `w1`/`b1`."""
    try:
        with np.load(head_path) as z:
            arrays = {k: np.ascontiguousarray(z[k], dtype=np.float32)
                      for k in ("w1", "b1", "w2", "b2")}
    except (OSError, KeyError, ValueError) as err:
        raise ModelError(f"cannot read the event head {head_path}: {err}; it is committed in "
                         "models/ or made by `audio-monitor train`") from err
    w1, b1, w2, b2 = arrays["w1"], arrays["b1"], arrays["w2"], arrays["b2"]
    if w1.shape[0] != EMBEDDING_DIM or b1.shape != (w1.shape[1],) or w2.shape[0] != w1.shape[1] \
            or b2.shape != (w2.shape[1],):
        raise ModelError(f"event head {head_path} has shapes w1 {w1.shape} b1 {b1.shape} "
                         f"w2 {w2.shape} b2 {b2.shape}; expected (1024,H) (H,) (H,C) (C,)")
    return arrays


def events_model_bytes(yamnet_path: Path, head: dict[str, np.ndarray]) -> bytes:
    """`log_mel` [1, 96, 64] -> YAMNet embedding -> Gemm, Relu, Gemm, Softmax -> `scores`
    [1, C]; serialised deterministically (same bytes for the same inputs and onnx version)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = _load(yamnet_path)
    _cut_at_embedding(model)
    g = model.graph
    n_classes = int(head["w2"].shape[1])
    for name in ("w1", "b1", "w2", "b2"):
        g.initializer.append(numpy_helper.from_array(head[name], f"head.{name}"))
    g.node.extend([
        helper.make_node("Gemm", [EMBEDDING_TENSOR, "head.w1", "head.b1"], ["head.hidden_pre"],
                         name="head_fc1"),
        helper.make_node("Relu", ["head.hidden_pre"], ["head.hidden"], name="head_relu"),
        helper.make_node("Gemm", ["head.hidden", "head.w2", "head.b2"], ["head.logits"],
                         name="head_fc2"),
        helper.make_node("Softmax", ["head.logits"], [OUTPUT_NAME], axis=-1, name="head_softmax"),
    ])
    g.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, n_classes]))
    g.name = "yamnet_embedding_event_head"
    model.producer_name, model.producer_version = _PRODUCER
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise ModelError(f"composed events graph is invalid: {err}") from err
    return model.SerializeToString(deterministic=True)


def compose_events_model(models_dir: Path, *, check: bool = True) -> Path:
    """Make `models_dir/events.onnx` from `yamnet.onnx` and `event-head.npz`; return its path.

    With `check` (the default, as `fetch-models` runs it) the bytes must hash to the sha256 in
    `events.json`, or ModelError; training passes False and writes the new hash into the card.
    Idempotent: a file that already hashes right is left alone.
    """
    yamnet_path = models_dir / MODEL_FILE
    verify_model(yamnet_path)
    target = models_dir / EVENTS_FILE
    expected = None
    if check:
        card_path = models_dir / CARD_FILE
        try:
            expected = json.loads(card_path.read_text(encoding="utf-8"))["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelError(f"cannot read sha256 from {card_path}: {err}") from err
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == expected:
            logger.info("%s is present and verified", target)
            return target
    data = events_model_bytes(yamnet_path, head_arrays(models_dir / HEAD_FILE))
    actual = hashlib.sha256(data).hexdigest()
    if expected is not None and actual != expected:
        raise ModelError(f"composed {EVENTS_FILE} has sha256 {actual}, its card expects "
                         f"{expected} (onnx version or head changed?); retrain with "
                         "`audio-monitor train` or use the pinned dependencies")
    tmp = target.with_name(target.name + ".part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as err:
        raise ModelError(f"cannot write {target}: {err}") from err
    logger.info("wrote %s (%d bytes, sha256 %s)", target, len(data), actual)
    return target
