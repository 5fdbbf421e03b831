"""The benchmark suite behind `python -m benchmarks [--quick] [--json PATH]`.

Every comparison is a ratio against a peer measured in the same run (same process
where possible), on real recordings from ../shared/data. Prints a table and writes
JSON. Nothing here asserts a time: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from benchmarks.bench_fleet import bench_fleet, render_rows
from benchmarks.bench_frontend import librosa_hop_us, numpy_hop_us, torchaudio_hop_us
from monitor.config import data_dir
from monitor.dsp.frontend import Frontend, FrontendParams, bench_hop_us, logmel_of

REPO = Path(__file__).resolve().parents[1]
DATA = data_dir()
CACHE = REPO / ".cache" / "bench"
RATE = 16000


def long_recording(minutes: float) -> Path:
    """Real recordings (coughs, falls, everyday sounds) joined into one long 16 kHz file."""
    target = CACHE / f"long-{minutes:g}min.flac"
    if target.is_file():
        return target
    files = sorted((DATA / "safe").rglob("*.flac")) + sorted((DATA / "cough").glob("*.flac"))
    if not files:
        raise SystemExit(f"benchmarks need real recordings in {DATA} (set AUDIO_MONITOR_DATA)")
    need = int(minutes * 60 * RATE)
    pieces, total = [], 0
    for i in range(len(files) * 10):
        audio, rate = sf.read(str(files[(i * 37) % len(files)]), dtype="float32")
        if rate != RATE:
            continue
        pieces.append(audio if audio.ndim == 1 else audio.mean(axis=1))
        total += pieces[-1].shape[0]
        if total >= need:
            break
    CACHE.mkdir(parents=True, exist_ok=True)
    sf.write(str(target), np.concatenate(pieces)[:need], RATE, subtype="PCM_16")
    return target


def percentiles(values: list[float] | np.ndarray) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)),
            "max": float(arr.max())}


# --- front end ---------------------------------------------------------------------------


def bench_frontend_hop(quick: bool) -> dict[str, Any]:
    params = FrontendParams()
    n = 500 if quick else 2000
    ours = min(bench_hop_us(params, n=n) for _ in range(3))
    npy = min(numpy_hop_us(params, n=n) for _ in range(3))
    lib_runs = [librosa_hop_us(params, n=n // 4) for _ in range(3)]
    lib = None if None in lib_runs else min(t for t in lib_runs if t is not None)
    torch_runs = [torchaudio_hop_us(params, n=n // 4) for _ in range(3)]
    torch_us = None if None in torch_runs else min(t for t in torch_runs if t is not None)
    frontend = Frontend(params)
    hop = np.random.default_rng(0).standard_normal(params.hop_length).astype(np.float32)
    out = np.zeros((frontend.max_frames(hop.shape[0]), params.n_mels), dtype=np.float32)
    for _ in range(200):
        frontend.process(hop, out)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(1000):
        frontend.process(hop, out)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    ours_only = [tracemalloc.Filter(True, str(REPO / "monitor" / "*"))]  # not the harness
    grown = sum(stat.size_diff for stat in after.filter_traces(ours_only).compare_to(
        before.filter_traces(ours_only), "filename"))
    return {"ours_us": ours, "numpy_us": npy, "librosa_us": lib,
            "numpy_over_ours": npy / ours,
            "librosa_over_ours": None if lib is None else lib / ours,
            "torchaudio_us": torch_us,
            "torchaudio_over_ours": None if torch_us is None else torch_us / ours,
            "bytes_retained_per_1000_hops": int(grown)}


def _librosa() -> Any:
    """librosa, or None where only the run-time packages are installed (a peer to compare
    against, reported as not installed)."""
    try:
        import librosa
    except ImportError:
        return None
    return librosa


def bench_frontend_offline(audio: np.ndarray) -> dict[str, Any]:
    params = FrontendParams()
    seconds = audio.shape[0] / RATE
    logmel_of(audio[:RATE], params)  # compile
    t0 = time.perf_counter()
    logmel_of(audio, params)
    ours = time.perf_counter() - t0
    librosa = _librosa()
    if librosa is None:
        return {"audio_s": seconds, "ours_x_realtime": seconds / ours,
                "librosa_x_realtime": None, "ours_over_librosa": None}
    t0 = time.perf_counter()
    mel = librosa.feature.melspectrogram(
        y=audio, sr=RATE, n_fft=params.n_fft, hop_length=params.hop_length,
        win_length=params.win_length, center=False, power=1.0, n_mels=params.n_mels,
        fmin=params.fmin_hz, fmax=params.fmax_hz, htk=True, norm=None)
    np.log(mel + params.log_offset)
    lib = time.perf_counter() - t0
    return {"audio_s": seconds, "ours_x_realtime": seconds / ours,
            "librosa_x_realtime": seconds / lib, "ours_over_librosa": lib / ours}


# --- detector ----------------------------------------------------------------------------


def bench_inference(quick: bool) -> dict[str, Any]:
    from monitor.detect.detector import Detector

    results: dict[str, Any] = {}
    for name in ("events", "yamnet"):
        path = REPO / "models" / f"{name}.onnx"
        if not path.is_file():
            continue
        detector = Detector(path, threads=1)
        rng = np.random.default_rng(0)
        for frame in rng.normal(-3.0, 1.5, (detector.window_frames, 64)).astype(np.float32):
            detector.push(frame)
        for _ in range(20):
            detector.score()
        times = []
        for _ in range(100 if quick else 500):
            t0 = time.perf_counter()
            detector.score()
            times.append((time.perf_counter() - t0) * 1000.0)
        results[name] = {f"{k}_ms": v for k, v in percentiles(times).items()}
        # u8 weights: this CPU's s8 kernels saturate (monitor.detect.detector.int8_saturates).
        results[name]["unsigned_int8"] = detector.unsigned_int8
    return results


# --- analyze throughput ------------------------------------------------------------------


def bench_analyze(path: Path) -> dict[str, Any]:
    """`analyze` (our chain) against the same chain written with librosa + the same model."""
    import onnxruntime as ort

    from monitor.apps.analyze import analyze_file
    from monitor.config import load_config
    from monitor.detect.detector import Detector, open_session

    model = REPO / "models" / ("events.onnx" if (REPO / "models" / "events.onnx").is_file()
                               else "yamnet.onnx")
    config = load_config(None, overrides={"model.path": str(model)})
    detector = Detector(model, threads=1)
    seconds = sf.info(str(path)).duration
    analyze_file(path, config=config, detector=detector)  # warm
    t0 = time.perf_counter()
    analyze_file(path, config=config, detector=detector)
    ours = time.perf_counter() - t0
    librosa = _librosa()
    if librosa is None:
        return {"audio_s": seconds, "model": model.name, "ours_x_realtime": seconds / ours,
                "librosa_x_realtime": None, "ours_over_librosa": None}

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session, _ = open_session(model, options)  # the detector's form of the model
    card = detector.card
    t0 = time.perf_counter()
    audio, _ = librosa.load(str(path), sr=RATE, mono=True)
    mel = librosa.feature.melspectrogram(
        y=audio, sr=RATE, n_fft=512, hop_length=160, win_length=400, center=False, power=1.0,
        n_mels=64, fmin=125.0, fmax=7500.0, htk=True, norm=None)
    logmel = np.log(mel + 0.001).T.astype(np.float32)
    for start in range(0, logmel.shape[0] - card.window_frames + 1, 10):
        session.run(None, {card.input_name: logmel[None, start:start + card.window_frames]})
    lib = time.perf_counter() - t0
    return {"audio_s": seconds, "model": model.name, "ours_x_realtime": seconds / ours,
            "librosa_x_realtime": seconds / lib, "ours_over_librosa": lib / ours}


# --- end to end latency ------------------------------------------------------------------


def _subscribe(endpoint: str, count: int, queue: Any) -> None:
    import zmq

    from monitor.protocol.messages import Scores, decode

    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt_string(zmq.SUBSCRIBE, "scores")
    sub.connect(endpoint)
    queue.put("ready")
    arrivals: list[tuple[float, float]] = []
    while len(arrivals) < count and sub.poll(5000):
        message = decode(sub.recv_multipart())
        arrived = time.perf_counter()
        if isinstance(message, Scores):
            arrivals.append((message.t_audio_s, arrived))
    queue.put(arrivals)


def bench_latency(path: Path, seconds: float) -> dict[str, Any]:
    """Last sample of a window entering the ring -> its `scores` message at a subscriber
    process. perf_counter is CLOCK_MONOTONIC, shared by both processes on Linux."""
    from monitor.capture.sources import Source
    from monitor.config import load_config
    from monitor.detect.detector import Detector
    from monitor.outputs.publisher import Publisher
    from monitor.service.daemon import Daemon

    audio, _ = sf.read(str(path), dtype="float32", frames=int(seconds * RATE))
    block = RATE // 100

    class PacedSource(Source):
        """Writes 10 ms blocks at real-time pace, noting when each entered the ring."""

        def __init__(self) -> None:
            super().__init__(sample_rate=RATE, channels=1, ring_seconds=4.0,
                             description="bench")
            self.written_at = np.zeros(audio.shape[0] // block + 1)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="bench-source")

        def start(self) -> None:
            self._thread.start()

        def stop(self) -> None:
            self._stop.set()
            self._thread.join(2)

        def _run(self) -> None:
            t0 = time.perf_counter()
            for i in range(audio.shape[0] // block):
                delay = t0 + (i + 1) * block / RATE - time.perf_counter()
                if delay > 0 and self._stop.wait(delay):
                    break
                self.ring.write(audio[i * block:(i + 1) * block])
                self.written_at[i] = time.perf_counter()
            self._exhausted = True

    model = REPO / "models" / ("events.onnx" if (REPO / "models" / "events.onnx").is_file()
                               else "yamnet.onnx")
    with tempfile.TemporaryDirectory() as folder:
        endpoint = f"ipc://{folder}/bench.sock"
        config = load_config(None, overrides={"model.path": str(model), "model.top_k": 3})
        detector = Detector(model, threads=1)
        source = PacedSource()
        publisher = Publisher(endpoint, sensor_id="bench", send_hwm=10000)
        daemon = Daemon(config, source=source, detector=detector, publisher=publisher)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        expected = int((seconds - 0.96) * 10)
        proc = ctx.Process(target=_subscribe, args=(endpoint, expected, queue))
        proc.start()
        queue.get(timeout=30)
        publisher.wait_for_subscriber(10)
        daemon.run(threading.Event())
        arrivals = queue.get(timeout=30)
        proc.join(10)
        publisher.close()
    latencies = []
    for t_audio, arrived in arrivals:
        last_sample = round(t_audio * RATE) - 1
        latencies.append((arrived - source.written_at[last_sample // block]) * 1000.0)
    return {"windows": len(latencies), **{f"{k}_ms": v for k, v in
                                          percentiles(latencies).items()},
            "note": "compute only; the window's look-ahead (it ends at its newest sample) is 0"}


# --- resources ---------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """CPU time of all of a process's threads, from the scheduler's nanosecond counters
    (the 10 ms ticks of /proc/PID/stat are too coarse for a few percent of a core)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # thread ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        kinds = dict(line.split(":", 1) for line in handle if line.startswith("Rss"))
    # Private memory plus mapped files; shared memory (a JACK server's buffers) is not ours.
    return sum(int(kinds[key].split()[0]) for key in ("RssAnon", "RssFile")
               if key in kinds) / 1024.0


def _measure(pid: int, seconds: float, windows: int = 6) -> dict[str, Any]:
    """CPU % of one core over `windows` equal slices of `seconds` (median and range: the
    machine is shared, one slice can catch a neighbour's burst), then RSS."""
    shares = []
    for _ in range(windows):
        cpu0, wall0 = _cpu_seconds(pid), time.perf_counter()
        time.sleep(seconds / windows)
        shares.append(100.0 * (_cpu_seconds(pid) - cpu0) / (time.perf_counter() - wall0))
    return _summary(shares, _rss_mb(pid))


def _pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration measured in several runs: median and range over all their slices,
    the largest RSS."""
    return {**_summary([share for run in runs for share in run["cpu_slices"]],
                       max(run["rss_mb"] for run in runs)), "runs": len(runs)}


def _summary(shares: list[float], rss_mb: float) -> dict[str, Any]:
    return {"cpu_percent_of_one_core": float(np.median(shares)),
            "cpu_percent_min": min(shares), "cpu_percent_max": max(shares),
            "rss_mb": rss_mb, "cpu_slices": shares}


BENCH_MACHINE = "bench-machine"


def daemon_config(folder: Path, normal: Path) -> Path:
    """config.yaml with one anomaly scorer (the resource target's set-up), its baseline
    learned from `normal`. Its level gate is off so it scores every frame, even the JACK
    dummy device's silence."""
    import yaml

    config = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    config["model"]["path"] = str(REPO / "models" / "events.onnx")
    config["state_dir"] = str(folder / "state")
    config["machines"] = {BENCH_MACHINE: {"min_level_dbfs": -120}}
    path = folder / "bench-config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "monitor", "learn", "--config", str(path),
                    "--machine", BENCH_MACHINE, "--source", f"file:{normal}",
                    "--minutes", "1"], check=True, capture_output=True)
    return path


def _start_until_ready(command: list[str], env: dict[str, str], folder: str
                       ) -> tuple[subprocess.Popen[bytes], float | None]:
    """Start the daemon as systemd would (NOTIFY_SOCKET) and time it to READY=1: the model
    is loaded, the kernels are ready and the source is started. None: no READY in 120 s."""
    import socket

    address = f"{folder}/notify-{time.monotonic_ns()}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(1.0)
        started = time.perf_counter()
        proc = subprocess.Popen(command, env={**env, "NOTIFY_SOCKET": address},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while time.perf_counter() - started < 120.0 and proc.poll() is None:
            try:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    return proc, time.perf_counter() - started
            except TimeoutError:
                continue
    return proc, None


def bench_resources(path: Path, config: Path, seconds: float) -> dict[str, Any]:
    """Start-up to READY=1 and, on a file at real-time pace, CPU % of one core and RSS of
    the real daemon (event model + one anomaly scorer): kernels compiled ahead of time (the
    set-up's build) against just in time (AUDIO_MONITOR_JIT=1) from a cold and a warm Numba
    cache."""
    from monitor.dsp.jit import JIT_ENV, is_fresh

    results: dict[str, Any] = {"ahead_of_time_built": is_fresh()}
    with tempfile.TemporaryDirectory() as folder:
        runs = (("aot", {JIT_ENV: "0"}),
                ("jit_cold", {JIT_ENV: "1", "NUMBA_CACHE_DIR": f"{folder}/numba-cold"}),
                ("jit_warm", {JIT_ENV: "1", "NUMBA_CACHE_DIR": str(REPO / ".cache" / "numba")}))
        for label, extra in runs:
            proc, ready_s = _start_until_ready(
                [sys.executable, "-m", "monitor", "run", "--source", f"file:{path}",
                 "--publish", f"ipc://{folder}/{label}.sock", "--config", str(config)],
                {**os.environ, **extra}, folder)
            results[f"startup_{label}_s"] = ready_s
            if label != "jit_cold" and ready_s is not None:
                results[label] = _measure(proc.pid, seconds)
            proc.terminate()
            proc.wait(10)
    return results


def bench_threads(path: Path, config: Path, seconds: float) -> dict[str, Any]:
    """CPU % of one core of the real daemon on a file at real-time pace for model.threads
    1, 2 and 4; for 2 and 4 also with onnxruntime's spin-waiting left on (its default), so
    the cost of spinning is visible. Rounds in opposite orders, `seconds` in all each."""
    import yaml

    from monitor.detect.detector import ORT_SPINNING_ENV

    runs = [("1", 1, "0"), ("2", 2, "0"), ("2_spinning", 2, "1"), ("4", 4, "0"),
            ("4_spinning", 4, "1")]
    measured: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in runs}
    with tempfile.TemporaryDirectory() as folder:
        for label, threads, spinning in runs + runs[::-1]:
            data = yaml.safe_load(config.read_text(encoding="utf-8"))
            data["model"]["threads"] = threads
            variant = Path(folder) / f"threads-{label}.yaml"
            variant.write_text(yaml.safe_dump(data), encoding="utf-8")
            proc, ready_s = _start_until_ready(
                [sys.executable, "-m", "monitor", "run", "--source", f"file:{path}",
                 "--publish", f"ipc://{folder}/{label}.sock", "--config", str(variant)],
                {**os.environ, ORT_SPINNING_ENV: spinning}, folder)
            if ready_s is not None:
                measured[label].append(_measure(proc.pid, seconds / 2))
            proc.terminate()
            proc.wait(10)
    return {label: _pooled(m) for label, m in measured.items() if m}


def bench_live_mic(config: Path, seconds: float) -> dict[str, Any]:
    """CPU and RSS of the daemon (event model + one anomaly scorer) capturing a real
    PortAudio stream (JACK dummy driver, 10 ms periods): the live deployment shape, without
    a file decoder in the capture path. The deployment (C capture callback, kernels ahead of
    time), and each with one thing changed: the Python callback, kernels just in time. Two
    rounds in opposite orders, `seconds` in all per configuration, so no configuration
    always runs first (or last) on this shared machine."""
    import shutil

    from monitor.capture.native_capture import PYTHON_CAPTURE_ENV, load
    from monitor.dsp.jit import JIT_ENV

    if shutil.which("jackd") is None or shutil.which("jack_lsp") is None:
        return {"skipped": "jackd not installed (Debian jackd2)"}
    name = f"am-bench-{os.getpid()}"
    env = {**os.environ, "JACK_NO_AUDIO_RESERVATION": "1", "JACK_DEFAULT_SERVER": name,
           "JACK_NO_START_SERVER": "1", "NUMBA_CACHE_DIR": str(REPO / ".cache" / "numba")}
    server = subprocess.Popen(["jackd", "--no-realtime", "-n", name, "-d", "dummy", "-r",
                               str(RATE), "-p", "160"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    results: dict[str, Any] = {"c_callback_built": load() is not None}
    try:
        for _ in range(100):
            try:
                if subprocess.run(["jack_lsp"], env=env, capture_output=True,
                                  timeout=5).returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.1)
        else:  # e.g. a JACK metadata database left unjoinable by a killed client
            return results | {"skipped": f"jackd -n {name} did not become ready in 10 s"}
        with tempfile.TemporaryDirectory() as folder:
            runs: list[tuple[str, dict[str, str]]] = [
                ("aot", {}), ("python_callback", {PYTHON_CAPTURE_ENV: "1"}),
                ("jit_warm", {JIT_ENV: "1"})]
            measured: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in runs}
            for label, changed in runs + runs[::-1]:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "monitor", "run", "--source", "mic:system",
                     "--rate", str(RATE), "--publish", f"ipc://{folder}/{label}.sock",
                     "--config", str(config)],
                    env={**env, JIT_ENV: "0", PYTHON_CAPTURE_ENV: "0", **changed},
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(5.0)
                if proc.poll() is not None:
                    results[label] = {"skipped": f"daemon exited with {proc.returncode}"}
                    continue
                try:
                    measured[label].append(_measure(proc.pid, seconds / 2))
                except OSError as err:  # the daemon went away while measured
                    results[label] = {"skipped": f"daemon ended while measured: {err}"}
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:  # PortAudio can block after JACK trouble
                    proc.kill()
                    proc.wait(10)
            results.update({label: _pooled(runs_of) for label, runs_of in measured.items()
                            if runs_of and label not in results})
        return results
    finally:
        server.terminate()
        server.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="short version for CI")
    parser.add_argument("--json", type=Path, default=REPO / ".cache" / "bench" / "results.json")
    args = parser.parse_args()
    os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
    minutes = 1.0 if args.quick else 10.0
    path = long_recording(minutes)
    audio, _ = sf.read(str(path), dtype="float32")
    with tempfile.TemporaryDirectory(prefix="audio-monitor-bench-") as state:
        config = daemon_config(Path(state), long_recording(1.0))
        results: dict[str, Any] = {
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "python": platform.python_version()},
            "frontend_hop": bench_frontend_hop(args.quick),
            "frontend_offline": bench_frontend_offline(audio),
            "inference_1_thread": bench_inference(args.quick),
            "analyze": bench_analyze(path),
            "end_to_end_latency": bench_latency(path, 10.0 if args.quick else 60.0),
            "resources_realtime": bench_resources(path, config, 6.0 if args.quick else 60.0),
            "resources_live_mic": bench_live_mic(config, 6.0 if args.quick else 60.0),
            "model_threads": bench_threads(path, config, 6.0 if args.quick else 40.0),
            "fleet": bench_fleet(args.quick),
        }
    print(render(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"\nwritten {args.json}")
    return 0


def _rss(r: dict[str, Any]) -> str:
    return f"RSS {r['rss_mb']:.0f} MB" if "rss_mb" in r else "-"


def _cpu(r: dict[str, Any]) -> str:
    if "cpu_percent_of_one_core" not in r:
        return "-"
    return (f"CPU {r['cpu_percent_of_one_core']:.1f}% of a core "
            f"({r['cpu_percent_min']:.1f}-{r['cpu_percent_max']:.1f})")


def render(r: dict[str, Any]) -> str:
    fh, fo, an = r["frontend_hop"], r["frontend_offline"], r["analyze"]
    lat, res, mic = r["end_to_end_latency"], r["resources_realtime"], r["resources_live_mic"]
    thr = r.get("model_threads", {})
    rows = [
        ("front end, one 10 ms hop", f"{fh['ours_us']:.1f} us",
         f"numpy rfft {fh['numpy_over_ours']:.1f}x slower, librosa "
         + ("not installed" if fh["librosa_over_ours"] is None
            else f"{fh['librosa_over_ours']:.0f}x slower")
         + "; torchaudio "
         + ("not installed" if fh["torchaudio_over_ours"] is None
            else f"{fh['torchaudio_over_ours']:.0f}x slower")
         + f"; {fh['bytes_retained_per_1000_hops']} B retained per 1000 hops"),
        (f"front end offline ({fo['audio_s'] / 60:.0f} min)",
         f"{fo['ours_x_realtime']:.0f}x real time",
         "librosa not installed" if fo["librosa_x_realtime"] is None else
         f"librosa {fo['librosa_x_realtime']:.0f}x ({fo['ours_over_librosa']:.1f}x slower)"),
        *[(f"inference {name}, 1 thread" + (", u8 weights" if v["unsigned_int8"] else ""),
           f"p50 {v['p50_ms']:.2f} ms", f"p99 {v['p99_ms']:.2f} ms")
          for name, v in r["inference_1_thread"].items()],
        (f"analyze ({an['model']})", f"{an['ours_x_realtime']:.0f}x real time",
         "librosa pipeline: librosa not installed" if an["librosa_x_realtime"] is None else
         f"librosa pipeline {an['librosa_x_realtime']:.0f}x ({an['ours_over_librosa']:.1f}x "
         "slower)"),
        ("end to end: ring -> subscriber", f"p50 {lat['p50_ms']:.2f} ms",
         f"p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms ({lat['windows']} windows)"),
        *[(f"live mic (PortAudio/JACK), model + 1 scorer, {label}", _cpu(mic.get(key, {})),
           _rss(mic.get(key, {})) if "skipped" not in mic else mic["skipped"])
          for key, label in (("aot", "C callback, AOT kernels"),
                             ("python_callback", "Python callback"),
                             ("jit_warm", "JIT kernels"))],
        *[(f"file at real-time pace, model + 1 scorer, {label}", _cpu(res.get(key, {})),
           _rss(res.get(key, {}))) for key, label in (("aot", "AOT kernels"),
                                                      ("jit_warm", "JIT kernels"))],
        *[(f"file at real-time pace, model.threads {label.replace('_', ' ')}",
           _cpu(thr[label]), _rss(thr[label])) for label in thr],
        ("start-up to READY=1", f"AOT {res.get('startup_aot_s') or 0:.2f} s",
         f"JIT cold cache {res.get('startup_jit_cold_s') or 0:.2f} s, warm "
         f"{res.get('startup_jit_warm_s') or 0:.2f} s"
         + ("" if res.get("ahead_of_time_built") else " (AOT kernels NOT built)")),
        *render_rows(r.get("fleet", {})),
    ]
    width = max(len(a) for a, _, _ in rows)
    lines = [f"machine: {r['machine']}"]
    lines += [f"{a:<{width}}  {b:>20}  {c}" for a, b, c in rows]
    return "\n".join(lines)

