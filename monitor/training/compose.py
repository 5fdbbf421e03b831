"""Build ONNX graphs from the assembled YAMNet: the embedding extractor and `events.onnx`.

YAMNet's weights are not ours to redistribute, so `events.onnx` is never committed: it is
rebuilt here from `models/yamnet.onnx` plus our small committed head (`event-head.npz`),
deterministically, and checked against the sha256 in its card `events.json`.
The head reads the 1024-d embedding YAMNet computes before its own classifier (global
average pool -> reshape -> quantise/dequantise), exactly what the head was trained on; the
open-set gate reads YAMNet's own AudioSet scores (its classifier, kept beside the head).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from monitor.detect.yamnet import (
    FIX,
    MODEL_FILE,
    N_MELS,
    WINDOW_FRAMES,
    checked_bytes,
    verify_model,
    write_atomically,
)
from monitor.errors import ModelError

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

EMBEDDING_TENSOR = "/model/Reshape_output_0_qdq"
"""The [1, 1024] dequantised embedding feeding YAMNet's classifier Gemm."""
AUDIOSET_TENSOR = "scores"
"""YAMNet's own [1, 521] AudioSet class scores (sigmoid), the graph's original output."""
EMBEDDING_DIM = 1024
AUDIOSET_DIM = 521
VETO_RAMP = 0.1
"""A class's score fades to 0 as an AudioSet score rises from its veto bound to bound + this."""


def veto_gate(audioset: np.ndarray, veto: np.ndarray) -> np.ndarray:
    """(n, C) open-set gate in numpy, as the composed graph computes it: 1 while every AudioSet
    score of a window (n, 521) stays within class c's bounds `veto[c]` (the most its training
    events showed), falling to 0 as YAMNet hears something those events never held."""
    excess = np.empty((audioset.shape[0], veto.shape[0]), np.float32)
    for i in range(0, audioset.shape[0], 4096):  # bounded memory: (4096, C, 521) at a time
        excess[i:i + 4096] = np.max(audioset[i:i + 4096, None, :] - veto[None, :, :], axis=2)
    return np.maximum(1.0 - np.maximum(excess, 0.0) / VETO_RAMP, 0.0)
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


def _cut_at_embedding(model: onnx.ModelProto, *, audioset: bool = False) -> None:
    """Drop every node that neither the embedding nor (with `audioset`) YAMNet's AudioSet
    scores need, and every initialiser no remaining node reads."""
    g = model.graph
    producers = {out: i for i, node in enumerate(g.node) for out in node.output}
    wanted = [EMBEDDING_TENSOR, AUDIOSET_TENSOR] if audioset else [EMBEDDING_TENSOR]
    for name in wanted:
        if name not in producers:
            raise ModelError(f"YAMNet graph has no tensor {name!r}; {FIX}")
    keep: set[int] = set()
    todo = list(wanted)
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
    """YAMNet cut at the embedding, for training: `log_mel` [B, 96, 64] -> `embedding`
    [B, 1024] and `audioset` [B, 521] (YAMNet's own AudioSet scores)."""
    from onnx import TensorProto, helper, numpy_helper

    model = _load(yamnet_path)
    _cut_at_embedding(model, audioset=True)
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
    batch = _BATCH if batched else 1
    g.node.append(helper.make_node("Identity", [EMBEDDING_TENSOR], ["embedding"]))
    g.node.append(helper.make_node("Identity", [AUDIOSET_TENSOR], ["audioset"]))
    g.output.append(helper.make_tensor_value_info(
        "embedding", TensorProto.FLOAT, [batch, EMBEDDING_DIM]))
    g.output.append(helper.make_tensor_value_info(
        "audioset", TensorProto.FLOAT, [batch, AUDIOSET_DIM]))
    return model.SerializeToString(deterministic=True)


def head_arrays(head_path: Path) -> dict[str, np.ndarray]:
    """The committed head, float32: `w1` (D, K), `b1` (K,), and optionally a second layer
    `w2` (K, C), `b2` (C,) after a Relu. Input standardisation is folded into `w1`/`b1`.
    D is 1024 (the embedding) or 1024 + 521 (the embedding, then YAMNet's AudioSet scores)."""
    try:
        with np.load(head_path) as z:
            arrays = {k: np.ascontiguousarray(z[k], dtype=np.float32)
                      for k in ("w1", "b1", "w2", "b2", "veto") if k in z.files}
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the event head {head_path}: {err}; it is committed in "
                         "models/ or made by `audio-monitor train`") from err
    shapes = {k: v.shape for k, v in arrays.items()}
    w1, b1 = arrays.get("w1"), arrays.get("b1")
    ok = w1 is not None and b1 is not None and w1.ndim == 2 \
        and w1.shape[0] in (EMBEDDING_DIM, EMBEDDING_DIM + AUDIOSET_DIM) \
        and b1.shape == (w1.shape[1],)
    if ok and w1 is not None and ("w2" in arrays or "b2" in arrays):
        w2, b2 = arrays.get("w2"), arrays.get("b2")
        ok = w2 is not None and b2 is not None and w2.ndim == 2 \
            and w2.shape[0] == w1.shape[1] and b2.shape == (w2.shape[1],)
    veto = arrays.get("veto")
    if ok and veto is not None and w1 is not None:
        n_classes = arrays["w2"].shape[1] if "w2" in arrays else w1.shape[1]
        ok = veto.shape == (n_classes, AUDIOSET_DIM)
    if not ok:
        raise ModelError(f"event head {head_path} has arrays {shapes}; expected w1 (1024, K) "
                         "or (1545, K), b1 (K,), optionally w2 (K, C), b2 (C,), and optionally "
                         "veto (C, 521)")
    return arrays


def events_model_bytes(yamnet_path: Path, head: dict[str, np.ndarray]) -> bytes:
    """`log_mel` [1, 96, 64] -> YAMNet embedding [, concatenated with YAMNet's AudioSet
    scores] -> Gemm [-> Relu -> Gemm] -> Softmax -> `scores` [1, C]; serialised
    deterministically (same bytes for the same inputs and onnx)."""
    from onnx import TensorProto, helper, numpy_helper

    model = _load(yamnet_path)
    with_audioset = head["w1"].shape[0] == EMBEDDING_DIM + AUDIOSET_DIM
    _cut_at_embedding(model, audioset=with_audioset or "veto" in head)
    g = model.graph
    # YAMNet's own output is named `scores`, as ours is: rename its tensor inside the graph.
    for node in g.node:
        node.output[:] = ["yamnet.audioset" if o == AUDIOSET_TENSOR else o for o in node.output]
        node.input[:] = ["yamnet.audioset" if i == AUDIOSET_TENSOR else i for i in node.input]
    layers = ["1", "2"] if "w2" in head else ["1"]
    embedding, audioset = EMBEDDING_TENSOR, "yamnet.audioset"
    if "veto" in head:
        # Training reads features rounded to float16 (its cache): round here too, so the
        # thresholds chosen near 1 and the gate's 0.1 ramp see the values they were set on.
        for name in ("embedding", "audioset"):
            source = embedding if name == "embedding" else audioset
            g.node.extend([
                helper.make_node("Cast", [source], [f"head.{name}_f16"],
                                 to=TensorProto.FLOAT16, name=f"head_{name}_to_f16"),
                helper.make_node("Cast", [f"head.{name}_f16"], [f"head.{name}"],
                                 to=TensorProto.FLOAT, name=f"head_{name}_to_f32"),
            ])
        embedding, audioset = "head.embedding", "head.audioset"
    last = embedding
    if with_audioset:
        g.node.append(helper.make_node("Concat", [embedding, audioset],
                                       ["head.input"], axis=1, name="head_concat"))
        last = "head.input"
    for i, layer in enumerate(layers):
        w, b = f"head.w{layer}", f"head.b{layer}"
        g.initializer.append(numpy_helper.from_array(head[f"w{layer}"], w))
        g.initializer.append(numpy_helper.from_array(head[f"b{layer}"], b))
        g.node.append(helper.make_node("Gemm", [last, w, b], [f"head.fc{layer}"],
                                       name=f"head_fc{layer}"))
        last = f"head.fc{layer}"
        if i < len(layers) - 1:
            g.node.append(helper.make_node("Relu", [last], [f"head.relu{layer}"],
                                           name=f"head_relu{layer}"))
            last = f"head.relu{layer}"
    n_classes = int(head[f"w{layers[-1]}"].shape[1])
    if "veto" not in head:
        g.node.append(helper.make_node("Softmax", [last], [OUTPUT_NAME], axis=-1,
                                       name="head_softmax"))
    else:
        # gate = relu(1 - relu(max_j(audioset_j - veto_cj)) / VETO_RAMP), scores = probs * gate
        g.initializer.append(numpy_helper.from_array(head["veto"], "head.veto"))
        g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "head.axis1"))
        g.initializer.append(numpy_helper.from_array(np.array(1.0 / VETO_RAMP, np.float32),
                                                     "head.inv_ramp"))
        g.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "head.one"))
        g.node.extend([
            helper.make_node("Softmax", [last], ["head.probs"], axis=-1, name="head_softmax"),
            helper.make_node("Sub", [audioset, "head.veto"], ["head.excess_all"],
                             name="head_veto_sub"),
            helper.make_node("ReduceMax", ["head.excess_all", "head.axis1"], ["head.excess"],
                             keepdims=0, name="head_veto_max"),
            helper.make_node("Relu", ["head.excess"], ["head.excess_pos"], name="head_veto_relu"),
            helper.make_node("Mul", ["head.excess_pos", "head.inv_ramp"], ["head.ramp"],
                             name="head_veto_scale"),
            helper.make_node("Sub", ["head.one", "head.ramp"], ["head.gate_raw"],
                             name="head_veto_one_minus"),
            helper.make_node("Relu", ["head.gate_raw"], ["head.gate"], name="head_veto_gate"),
            helper.make_node("Mul", ["head.probs", "head.gate"], [OUTPUT_NAME],
                             name="head_veto_apply"),
        ])
    g.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, n_classes]))
    g.name = "yamnet_embedding_event_head"
    return checked_bytes(model, producer=_PRODUCER, what="composed events graph")


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
        missing = [name for name in (CARD_FILE, HEAD_FILE) if not (models_dir / name).is_file()]
        if missing:
            raise ModelError(f"{models_dir} lacks {' and '.join(missing)}: events.onnx is "
                             "composed from the shipped head and card; copy them from the "
                             "repository's models/ (or train one: `audio-monitor train`)")
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
    write_atomically(target, data)
    logger.info("wrote %s (%d bytes, sha256 %s)", target, len(data), actual)
    return target
