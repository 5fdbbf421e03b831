"""`audio-monitor calibrate`: its options, the run, and what it prints and writes.

How the thresholds are chosen is in `monitor.apps.calibrate`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
import time
from pathlib import Path

from monitor.apps.calibrate import ClassResult, Heard, calibrate, validation_peaks
from monitor.capture.sources import parse_source
from monitor.config import Config
from monitor.detect.detector import Detector
from monitor.errors import ConfigError
from monitor.service.daemon import build_source

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh])\s*$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*h)?\s*$")


def parse_duration(text: str) -> float:
    """Seconds from '8h', '30m', '90s', '1.5h'; ConfigError naming `--duration` if not."""
    match = _DURATION.match(text)
    seconds = float(match.group(1)) * _UNITS[match.group(2)] if match else 0.0
    if not seconds > 0 or not math.isfinite(seconds):
        raise ConfigError(f"--duration {text!r}: expected a positive number with a unit s, m "
                          "or h (e.g. 8h, 30m, 90s)")
    return seconds


def parse_target(text: str) -> float:
    """False alarms per hour from '1/h', '0.5/h' or '2'; ConfigError naming `--target-fa`."""
    match = _RATE.match(text)
    if match is None or not math.isfinite(float(match.group(1))):
        raise ConfigError(f"--target-fa {text!r}: expected false alarms per hour >= 0, as "
                          "1/h, 0.5/h or 2")
    return float(match.group(1))


def calibrate_command(config: Config, *, seconds: float | None, target: float,
                      out: Path | None, stop: threading.Event) -> int:
    """Listen to `config.source` (`seconds`, or to its end), print the summary and write the
    YAML snippet to `out` (or print it). 0; 1 if nothing was heard or `out` is unwritable."""
    if parse_source(config.source)[0] == "mic" and seconds is None:
        raise ConfigError("--duration: needed with a microphone source (e.g. --duration 8h)")
    detector = Detector(config.model.path, threads=config.model.threads)
    source = build_source(config)
    heard, results = calibrate(config, detector, source, seconds=seconds, target=target,
                               stop=stop)
    if not heard.samples:
        print(f"audio-monitor: calibrate heard no audio from {config.source}; nothing to "
              "calibrate", file=sys.stderr)
        return 1
    print(summary(results, heard, target=target, asked_s=seconds, source=config.source,
                  peaks_known=validation_peaks(config.model.path) is not None), flush=True)
    snippet = yaml_snippet(results, heard, target=target, source=config.source)
    status = 0
    if out is None:
        print(snippet, end="")
    else:
        try:
            out.write_text(snippet, encoding="utf-8")
            print(f"thresholds written to {out}")
        except OSError as err:
            print(snippet, end="")
            print(f"audio-monitor: cannot write {out}: {err.strerror}", file=sys.stderr)
            status = 1
    if heard.stopped_by == "device":  # PortAudio's teardown would hang on the dead stream
        sys.stdout.flush()
        logging.shutdown()
        os._exit(status)
    return status


# --- report -------------------------------------------------------------------------------

def _rate(events: int, hours: float) -> float:
    return events / hours if hours > 0 else math.inf


def _thr(value: float) -> str:
    """A threshold as written to the config: no more digits than it has."""
    return f"{value:.6g}"


def summary(results: list[ClassResult], heard: Heard, *, target: float, asked_s: float | None,
            source: str, peaks_known: bool) -> str:
    """The table printed to stdout (one line a class) and the lines around it."""
    seconds = heard.samples / heard.sample_rate
    clock = f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{seconds % 60:04.1f}"
    lines = [f"calibrate: heard {heard.hours:.3f} h ({clock}) of {source}"]
    if asked_s is not None and heard.stopped_by != "duration":
        why = {"signal": "stopped by a signal", "end of source": "the source ended",
               "device": "the device failed"}[heard.stopped_by]
        lines[0] += f", of {asked_s / 3600:.3f} h asked: {why}"
    if heard.source_error is not None:
        lines.append(f"source: {heard.source_error}")
    lines.append(f"target: at most {target:g} false alarms per hour (everything heard counts "
                 "as a false alarm)")
    header = (f"{'class':<14}{'card thr':>9}{'FA/h':>9}{'chosen':>9}{'FA/h':>9}"
              f"{'recall card':>13}{'recall chosen':>15}")
    lines += [header, "-" * len(header)]
    for r in results:
        recall_card = "?" if r.recall_card is None else f"{r.recall_card:.3f}"
        recall = "?" if r.recall is None else f"{r.recall:.3f}"
        note = "" if r.reached else "  target not reached even at 0.999"
        lines.append(f"{r.name:<14}{_thr(r.card_threshold):>9}"
                     f"{_rate(r.card_events, heard.hours):>9.2f}{_thr(r.threshold):>9}"
                     f"{_rate(r.events, heard.hours):>9.2f}{recall_card:>13}{recall:>15}{note}")
    if not peaks_known:
        lines.append("recall cost: unknown for this model (its card has no "
                     "training.validation_positive_peaks)")
    else:
        counts = ", ".join(f"{r.name} {r.positives}" for r in results)
        lines.append(f"recall: share of the model's validation positives still found "
                     f"({counts} clips)")
    if target > 0 and heard.hours * target < 1.0:
        lines.append(f"note: at {target:g}/h one false alarm is allowed every "
                     f"{1 / target:.3g} h; {heard.hours:.3f} h heard proves little: listen "
                     "longer")
    return "\n".join(lines)


def yaml_snippet(results: list[ClassResult], heard: Heard, *, target: float,
                 source: str) -> str:
    """Thresholds to paste into config.yaml (`events.classes.<name>.threshold`)."""
    today = time.strftime("%Y-%m-%d", time.gmtime())
    lines = [f"# audio-monitor calibrate {today}: {heard.hours:.3f} h of {source}, "
             f"target {target:g} false alarms/h",
             "events:", "  classes:"]
    for r in results:
        recall = "" if r.recall is None else \
            f"; recall {r.recall:.3f} (card {r.recall_card:.3f}) of {r.positives} positives"
        reached = "" if r.reached else "; TARGET NOT REACHED"
        lines += [f"    {r.name}:",
                  f"      threshold: {_thr(r.threshold)}  # {_rate(r.events, heard.hours):.2f} "
                  f"FA/h here (card {_thr(r.card_threshold)}: "
                  f"{_rate(r.card_events, heard.hours):.2f} FA/h){recall}{reached}"]
    return "\n".join(lines) + "\n"
