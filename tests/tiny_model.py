"""A small but real ONNX detector built by the test suite (no download needed).

Two classes: "loud" = sigmoid(slope * (mean log-mel of the window - level)) and
"quiet" = 1 - loud. It runs through onnxruntime exactly like a trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from monitor.dsp.frontend import FrontendParams

CLASSES = ("loud", "quiet")


def build_tiny_model(folder: Path, *, window_frames: int = 24, level: float = -4.0,
                     slope: float = 3.0, params: FrontendParams | None = None,
                     name: str = "tiny", thresholds: dict[str, float] | None = None) -> Path:
    """Write `<folder>/<name>.onnx` and its model card; return the ONNX path."""
    params = params or FrontendParams()
    n_mels = params.n_mels
    nodes = [
        helper.make_node("ReduceMean", ["log_mel"], ["mean_scalar"], keepdims=0),
        helper.make_node("Reshape", ["mean_scalar", "shape1"], ["mean"]),
        helper.make_node("Sub", ["mean", "level"], ["centred"]),
        helper.make_node("Mul", ["centred", "slope"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["loud"]),
        helper.make_node("Sub", ["one", "loud"], ["quiet"]),
        helper.make_node("Concat", ["loud", "quiet"], ["pair"], axis=0),
        helper.make_node("Reshape", ["pair", "shape"], ["scores"]),
    ]
    inits = [
        helper.make_tensor("level", TensorProto.FLOAT, [1], [level]),
        helper.make_tensor("slope", TensorProto.FLOAT, [1], [slope]),
        helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
        helper.make_tensor("shape", TensorProto.INT64, [2], [1, 2]),
        helper.make_tensor("shape1", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("log_mel", TensorProto.FLOAT, [1, window_frames, n_mels])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 2])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    card = {
        "schema": 1, "name": name, "version": "test",
        "input": {"name": "log_mel", "shape": [1, window_frames, n_mels], "dtype": "float32"},
        "output": {"name": "scores", "shape": [1, 2], "dtype": "float32",
                   "kind": "probabilities"},
        "classes": list(CLASSES),
        "frontend": {**params.to_dict(), "hash": params.hash()},
        "window_frames": window_frames,
        "thresholds": thresholds if thresholds is not None else {"loud": 0.5},
    }
    path.with_suffix(".json").write_text(json.dumps(card, indent=1))
    return path


def loud_score(log_mel_window: np.ndarray, *, level: float = -4.0, slope: float = 3.0) -> float:
    """The same function in numpy (the test oracle)."""
    return float(1.0 / (1.0 + np.exp(-slope * (log_mel_window.mean() - level))))
