"""Command line: `audio-monitor run|devices|listen|analyze|demo|dashboard|alert|...`.

Only parsing lives here: each command's options become a call into the module that does
the work (imported when the command runs, so `alert` loads no ONNX and `run` no rich).
A user error (bad config, missing model, unknown device) is printed as one line and
exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monitor.config import MODELS_DIR, Config, data_dir, load_config
from monitor.errors import MonitorError

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        result: int = args.handler(args)
        return result
    except MonitorError as err:
        print(f"audio-monitor: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audio-monitor",
                                     description="Real-time streaming audio event monitor.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon: capture, detect, publish")
    _add_config(run)
    run.add_argument("--source", help="mic | mic:NAME-OR-INDEX | file:PATH | stdin")
    run.add_argument("--publish", metavar="ENDPOINT", help="ZeroMQ endpoint to bind")
    run.add_argument("--fast", action="store_true",
                     help="file source: read as fast as possible, not at real-time pace")
    run.add_argument("--rate", type=int, help="sample rate of the source (stdin PCM, mic)")
    run.add_argument("--wait-subscriber", type=float, default=0.0, metavar="SECONDS",
                     help="before starting the source, wait up to SECONDS for a subscriber "
                          "(batch runs that must not miss the first messages)")
    run.add_argument("--metrics", metavar="ADDR:PORT",
                     help="serve Prometheus metrics at http://ADDR:PORT/metrics (config "
                          "`metrics:`; off by default; ':9108' is loopback)")
    run.set_defaults(handler=_cmd_run)

    devices = sub.add_parser("devices", help="list audio input devices")
    devices.set_defaults(handler=_cmd_devices)

    listen = sub.add_parser("listen", help="print messages from a daemon, one JSON per line")
    listen.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5557")
    listen.add_argument("--topic", action="append", default=[],
                        help="topic prefix to subscribe to (repeatable; default: all)")
    listen.add_argument("--count", type=int, default=0, help="exit after N messages")
    listen.add_argument("--timeout", type=float, default=0.0,
                        help="exit with status 1 after S seconds without a message")
    listen.set_defaults(handler=_cmd_listen)

    analyze = sub.add_parser(
        "analyze", help="detect events in audio files (a folder: the audio files under it)")
    _add_config(analyze)
    analyze.add_argument("files", nargs="+", type=Path, metavar="FILE_OR_FOLDER")
    analyze.add_argument("--format", choices=("jsonl", "table"), default="jsonl")
    analyze.set_defaults(handler=_cmd_analyze)

    calibrate = sub.add_parser("calibrate", help="per-class thresholds from a room's normal "
                                                 "life: a recording or the live microphone")
    _add_config(calibrate)
    calibrate.add_argument("--source", help="mic | mic:NAME-OR-INDEX | file:PATH | PATH | stdin "
                                            "(default: the config's source)")
    calibrate.add_argument("--duration", help="how long to listen: 8h, 30m, 90s (default: a "
                                              "file or stdin to its end; needed for a mic)")
    calibrate.add_argument("--target-fa", default="1/h", metavar="RATE",
                           help="false alarms per hour allowed there: 1/h, 0.5/h, 2 "
                                "(default 1/h)")
    calibrate.add_argument("--out", type=Path, help="write the YAML snippet to this file "
                                                    "(default: print it)")
    calibrate.add_argument("--rate", type=int, help="sample rate of the source (stdin PCM, mic)")
    calibrate.set_defaults(handler=_cmd_calibrate)

    demo = sub.add_parser("demo", help="play real recordings through the whole pipeline")
    _add_config(demo)
    demo.add_argument("--fast", action="store_true", help="do not wait for real time")
    demo.add_argument("--file", type=Path, help="play this file instead of the demo clips")
    demo.set_defaults(handler=_cmd_demo)

    fetch = sub.add_parser("fetch-models", help="download and assemble the pretrained models")
    fetch.add_argument("--models-dir", type=Path, default=None)
    fetch.set_defaults(handler=_cmd_fetch_models)

    alert = sub.add_parser("alert", help="act on events exactly once: rules -> log, webhook, "
                                         "command, publish (see alert.yaml)")
    alert.add_argument("--config", type=Path, default=Path("alert.yaml"))
    alert.add_argument("--log-level", default="INFO")
    alert.set_defaults(handler=_cmd_alert)

    ack = sub.add_parser("ack", help="acknowledge an event: its escalations are cancelled")
    ack.add_argument("event_id")
    ack.add_argument("--config", type=Path, default=Path("alert.yaml"),
                     help="alert config naming ack_endpoint")
    ack.add_argument("--endpoint", help="ack endpoint (overrides the config)")
    ack.add_argument("--by", default="", help="who acknowledges (recorded)")
    ack.set_defaults(handler=_cmd_ack)

    alert_status = sub.add_parser(
        "alert-status", help="the running alert daemon's state, last error, per-destination "
                             "counters and bad messages, as JSON (through its ack_endpoint)")
    alert_status.add_argument("--config", type=Path, default=Path("alert.yaml"),
                              help="alert config naming ack_endpoint")
    alert_status.add_argument("--endpoint", help="ack endpoint (overrides the config)")
    alert_status.set_defaults(handler=_cmd_alert_status)

    proxy = sub.add_parser("proxy", help="one bus for a fleet: XSUB/XPUB proxy and catch-up "
                                         "router (see docs/alerting.md)")
    proxy.add_argument("--config", type=Path, default=Path("fleet.yaml"))
    proxy.add_argument("--log-level", default="INFO")
    proxy.set_defaults(handler=_cmd_proxy)

    keys = sub.add_parser("keys", help="create a CURVE key pair (NAME.key, NAME.key_secret)")
    keys.add_argument("name")
    keys.add_argument("--dir", type=Path, default=Path("keys"))
    keys.add_argument("--force", action="store_true", help="overwrite existing files")
    keys.set_defaults(handler=_cmd_keys)

    dashboard = sub.add_parser("dashboard", help="live terminal view of one or more daemons")
    dashboard.add_argument("endpoints", nargs="*", metavar="ENDPOINT",
                           help="daemon endpoint(s) (default tcp://127.0.0.1:5557)")
    dashboard.add_argument("--once", action="store_true",
                           help="collect for --once-wait seconds, print one snapshot, exit")
    dashboard.add_argument("--once-wait", type=float, default=2.0, metavar="SECONDS")
    dashboard.add_argument("--stale", type=float, default=15.0, metavar="SECONDS",
                           help="silent this long shows STALE (default 15: 3 heartbeats)")
    dashboard.add_argument("--offline", type=float, default=60.0, metavar="SECONDS",
                           help="silent this long shows OFFLINE (default 60)")
    dashboard.add_argument("--refresh", type=float, default=10.0, metavar="HZ")
    dashboard.set_defaults(handler=_cmd_dashboard)

    learn = sub.add_parser("learn", help="learn a machine's normal sound (a new baseline)")
    _add_config(learn)
    learn.add_argument("--machine", required=True, help="machine name, as under `machines:`")
    learn.add_argument("--source", action="append", default=[], dest="sources",
                       help="file:PATH (repeatable) or mic / mic:NAME-OR-INDEX")
    learn.add_argument("--minutes", type=float, default=None,
                       help="how much to record (mic) or read at most (files)")
    learn.add_argument("--keep", type=int, default=5, help="baselines kept per machine")
    learn.set_defaults(handler=_cmd_learn)

    evaluate_anomaly = sub.add_parser("evaluate-anomaly",
                                      help="ROC AUC / pAUC of the machine-fault scorers")
    _add_config(evaluate_anomaly)
    evaluate_anomaly.add_argument("--data", type=Path, default=data_dir())
    evaluate_anomaly.add_argument("--out", type=Path, default=Path("anomaly-eval.json"))
    evaluate_anomaly.add_argument("--candidates", nargs="*", default=None)
    evaluate_anomaly.set_defaults(handler=_cmd_evaluate_anomaly)

    train = sub.add_parser("train", help="train the event model's head from real recordings")
    train.add_argument("--data", type=Path, default=data_dir(), help="labelled recordings")
    train.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(handler=_cmd_train)

    evaluate = sub.add_parser("evaluate", help="held-out metrics and a report of the event model")
    evaluate.add_argument("--data", type=Path, default=data_dir())
    evaluate.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    evaluate.add_argument("--report", type=Path, default=Path("report"),
                          help="folder for the HTML/PNG report")
    evaluate.add_argument("--split", choices=("test", "val"), default="test",
                          help="test (default; written to the card) or val: the same figures "
                               "on the validation split, for choosing between models without "
                               "the test split (report folder only)")
    evaluate.set_defaults(handler=_cmd_evaluate)

    from monitor.service.systemd import add_install_service

    add_install_service(sub)
    return parser


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="config file (default: ./config.yaml if present)")


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    path = args.config
    if path is None and Path("config.yaml").is_file():
        path = Path("config.yaml")
    config = load_config(path, overrides=overrides)
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return config


def _cmd_run(args: argparse.Namespace) -> int:
    from monitor.service.compose import run_daemon

    overrides: dict[str, Any] = {}
    if args.source:
        overrides["source"] = args.source
    if args.publish:
        overrides["publish.endpoint"] = args.publish
    if args.fast:
        overrides["audio.realtime"] = False
    if args.rate is not None:  # 0 is refused by the schema, not taken as "default"
        overrides["audio.sample_rate"] = args.rate
    if args.metrics:
        overrides["metrics.enabled"] = True
        overrides["metrics.address"] = args.metrics
    return run_daemon(_load(args, overrides), reload=lambda: _load(args, overrides),
                      wait_subscriber_s=args.wait_subscriber)


def _cmd_devices(args: argparse.Namespace) -> int:
    from monitor.capture.mic import print_input_devices

    return print_input_devices()


def _cmd_listen(args: argparse.Namespace) -> int:
    from monitor.apps.listen import listen_command

    return listen_command(args.endpoint, topics=args.topic, count=args.count,
                          timeout_s=args.timeout)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from monitor.apps.analyze import analyze_command

    return analyze_command(args.files, config=_load(args), table=args.format == "table")


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from monitor.apps.calibrate_report import calibrate_command, parse_duration, parse_target
    from monitor.errors import ConfigError

    seconds = None if args.duration is None else parse_duration(args.duration)
    target = parse_target(args.target_fa)
    if args.out is not None and not args.out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: folder {args.out.parent} does not exist")
    overrides: dict[str, Any] = {"audio.realtime": False}  # a recording: as fast as it reads
    if args.source:
        spec = args.source
        if not spec.startswith(("mic", "file:", "stdin")) and Path(spec).exists():
            spec = f"file:{spec}"
        overrides["source"] = spec
    if args.rate:
        overrides["audio.sample_rate"] = args.rate
    stop = _stop_on_signal()
    return calibrate_command(_load(args, overrides), seconds=seconds, target=target,
                             out=args.out, stop=stop)


def _cmd_demo(args: argparse.Namespace) -> int:
    from monitor.apps.demo import run_demo

    config = _load(args)
    logging.getLogger("monitor").setLevel(logging.WARNING)  # the demo prints what matters
    return run_demo(config, audio=args.file, fast=args.fast)


def _cmd_fetch_models(args: argparse.Namespace) -> int:
    from monitor.detect.yamnet import fetch_models_command
    from monitor.training.compose import compose_events_model

    models_dir = args.models_dir or MODELS_DIR
    status = fetch_models_command(models_dir)
    if status == 0:
        path = compose_events_model(models_dir)
        print(f"{path}: ok (composed from yamnet.onnx and event-head.npz)")
    return status


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from monitor.apps.dashboard import dashboard_command

    return dashboard_command(args.endpoints, once=args.once, once_wait_s=args.once_wait,
                             stale_s=args.stale, offline_s=args.offline,
                             refresh_hz=args.refresh)


def _cmd_learn(args: argparse.Namespace) -> int:
    from monitor.detect.detector import read_card
    from monitor.detect.learn import learn_command

    config = _load(args)
    return learn_command(machine=args.machine, sources=args.sources or [config.source],
                         minutes=args.minutes, state_dir=config.state_dir,
                         frontend=read_card(config.model.path).frontend, keep=args.keep)


def _cmd_evaluate_anomaly(args: argparse.Namespace) -> int:
    from monitor.detect.detector import read_card
    from monitor.detect.learn import evaluate_anomaly_command

    config = _load(args)
    return evaluate_anomaly_command(data_dir=args.data,
                                    frontend=read_card(config.model.path).frontend,
                                    out_json=args.out, candidates=args.candidates)


def _cmd_train(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise MonitorError("training needs scikit-learn (never needed at run time); install it "
                           "with `.venv/bin/pip install -r requirements-train.txt`")
    from monitor.training.train import train_command

    _log_progress()
    return train_command(args.data, args.models_dir, seed=args.seed)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from monitor.training.evaluate import evaluate_command

    _log_progress()
    return evaluate_command(args.data, args.models_dir, args.report, split=args.split)


def _log_progress() -> None:
    """Progress of a long offline job (train, evaluate: minutes) on stderr, at INFO."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")


def _stop_on_signal(log_level: str | None = None) -> threading.Event:
    """An event set by SIGINT or SIGTERM; with `log_level`, logging to stderr at that level."""
    if log_level is not None:
        logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _cmd_alert(args: argparse.Namespace) -> int:
    from monitor.apps.alert.config import load_alert_config
    from monitor.apps.alert.daemon import AlertDaemon
    from monitor.service.sdnotify import Notifier

    config = load_alert_config(args.config)
    stop = _stop_on_signal(args.log_level)
    AlertDaemon(config, notifier=Notifier.from_env()).run(stop)
    return 0


def _cmd_alert_status(args: argparse.Namespace) -> int:
    """Print the status as JSON; exit 0 when `running`, 1 when `degraded`."""
    from monitor.apps.alert.ack import ask_status
    from monitor.apps.alert.config import load_alert_config

    endpoint = args.endpoint or load_alert_config(args.config).ack_endpoint
    if endpoint is None:
        raise MonitorError(f"alert-status: {args.config} sets no ack_endpoint; set one (the "
                           "status is asked there) or pass --endpoint")
    status = ask_status(endpoint)
    print(json.dumps(status, indent=2))
    return 0 if status.get("state") == "running" else 1


def _cmd_ack(args: argparse.Namespace) -> int:
    from monitor.apps.alert.ack import send_ack
    from monitor.apps.alert.config import load_alert_config

    endpoint = args.endpoint or load_alert_config(args.config).ack_endpoint
    if endpoint is None:
        raise MonitorError(f"ack: {args.config} sets no ack_endpoint; pass --endpoint")
    print(json.dumps(send_ack(endpoint, args.event_id, by=args.by)))
    return 0


def _cmd_proxy(args: argparse.Namespace) -> int:
    from monitor.apps.proxy import load_proxy_config, proxy_command

    config = load_proxy_config(args.config)
    return proxy_command(config, stop=_stop_on_signal(args.log_level))


def _cmd_keys(args: argparse.Namespace) -> int:
    from monitor.protocol.keys import write_keypair

    public, secret = write_keypair(args.dir, args.name, overwrite=args.force)
    print(f"{public}\n{secret}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
