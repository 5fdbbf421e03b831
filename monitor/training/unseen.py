"""False events on everyday sounds from sources the event model never trained on.

Debian packages ship thousands of real recordings under free licenses: spoken prompts and
words in many languages and voices, shouts and laughs, animal and object sound effects,
desktop alert, phone and alarm sounds, music on hold. None of them is in `../shared/data`, so
`audio-monitor analyze` run over them, clip by clip as a user runs it, says how often the
shipped model raises an event on sounds from outside its training sources. Clips whose file
name suggests one of the events (cough, glass, a fall, a crash, ...) are left out.

    scripts/unseen-sources.sh            # installs the packages, then runs this module
    python -m monitor.training.unseen --models-dir models --json out.json

Only the model's false events are measured here: every clip is a negative.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from monitor.training.dataset import EVENT_CLASSES

PACKAGES = ("asterisk-core-sounds-en-wav", "asterisk-core-sounds-es-wav",
            "asterisk-core-sounds-fr-wav", "asterisk-moh-opsound-wav", "ktuberling-data",
            "tuxpaint-stamps-default", "hedgewars-data", "heroes-sound-effects",
            "sound-theme-freedesktop", "yaru-theme-sound", "deepin-sound-theme", "oxygen-sounds")
"""Debian (bookworm) packages read; `scripts/unseen-sources.sh` installs them."""

EVENT_LIKE = re.compile(r"cough|sneez|glass|shatter|smash|crash|break|fall|thud|thump|drop|"
                        r"bump|impact|explo|bottle|plate|cup|dish|window|mirror|vase|ice_", re.I)
"""File names that may hold a cough, a fall or a glass break (or a sound a listener would take
for one): such sound effects are not counted as negatives."""
DESCRIPTIONS_KEPT = 1200
"""Tux Paint's spoken stamp descriptions (7,433 files, many languages): a fixed sample."""


@dataclass(frozen=True)
class UnseenClip:
    path: Path
    source: str
    """Short name of the package part it comes from (e.g. `asterisk-es`)."""
    group: str
    """speech, vocal, sfx, alerts or music."""


def _dpkg_files(package: str) -> list[Path]:
    """The files a package installed (empty when it is not installed, or there is no dpkg)."""
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True,
                             check=False)
    except OSError:
        return []
    return [Path(line) for line in out.stdout.splitlines() if line.startswith("/")] \
        if out.returncode == 0 else []


def unseen_clips(files_of: Callable[[str], Iterable[Path]] = _dpkg_files) -> list[UnseenClip]:
    """Every clip measured, in path order within each source; `files_of(package)` lists a
    package's files (dpkg by default). Sound effects and voices named like an event are left
    out; speech, alert sounds and music are kept whatever their name. A file reached through
    several names (a theme's symbolic links) counts once, under its first name in path order."""
    from monitor.apps.analyze import audio_suffixes

    suffixes = audio_suffixes()
    clips: list[UnseenClip] = []
    seen: set[str] = set()

    def add(source: str, group: str, paths: Iterable[Path], *, screen: bool,
            keep: int | None = None) -> None:
        chosen = []
        for p in sorted(paths):
            real = os.path.realpath(p)
            if p.suffix.lower() in suffixes and not (screen and EVENT_LIKE.search(p.name)) \
                    and real not in seen:
                seen.add(real)
                chosen.append(p)
        if keep is not None and len(chosen) > keep:
            chosen = sorted(random.Random(0).sample(chosen, keep))
        clips.extend(UnseenClip(p, source, group) for p in chosen)

    files = {package: sorted(set(files_of(package))) for package in PACKAGES}
    for lang in ("en", "es", "fr"):
        add(f"asterisk-{lang}", "speech", files[f"asterisk-core-sounds-{lang}-wav"],
            screen=False)
    add("ktuberling", "speech", files["ktuberling-data"], screen=False)
    tux = files["tuxpaint-stamps-default"]
    add("tuxpaint-descriptions", "speech", [p for p in tux if "_desc" in p.name],
        screen=False, keep=DESCRIPTIONS_KEPT)
    hedgewars = files["hedgewars-data"]
    add("hedgewars-voices", "vocal", [p for p in hedgewars if "voices" in p.parts], screen=True)
    add("tuxpaint-effects", "sfx", [p for p in tux if "_desc" not in p.name], screen=True)
    add("hedgewars-effects", "sfx", [p for p in hedgewars if p.parent.name == "Sounds"],
        screen=True)
    add("heroes", "sfx", files["heroes-sound-effects"], screen=True)
    for theme in ("sound-theme-freedesktop", "yaru-theme-sound", "deepin-sound-theme",
                  "oxygen-sounds"):
        add(theme, "alerts", files[theme], screen=False)
    add("asterisk-moh", "music", files["asterisk-moh-opsound-wav"], screen=False)
    return clips


_worker: dict[str, object] = {}


def _init(model_path: str | None) -> None:
    from monitor.config import load_config
    from monitor.detect.detector import Detector

    config = load_config(None, overrides={"model.path": model_path} if model_path else None)
    _worker["config"] = config
    _worker["detector"] = Detector(config.model.path, threads=1)


def check_model(model_path: Path | None) -> None:
    """Load the model once as the workers will; raises MonitorError (a missing or damaged
    model, a bad card) before any worker starts."""
    _init(str(model_path) if model_path else None)
    _worker.clear()


def _judge(clip: UnseenClip) -> tuple[list[str], float, str | None]:
    from monitor.apps.analyze import analyze
    from monitor.errors import MonitorError

    try:
        result = analyze(clip.path, config=_worker["config"],  # type: ignore[arg-type]
                         detector=_worker["detector"])  # type: ignore[arg-type]
    except MonitorError as err:  # a file that cannot be opened: counted, not fatal
        return [], 0.0, str(err)
    return [e.label for e in result.events], result.seconds, result.error


def judge(clips: list[UnseenClip], *, model_path: Path | None = None,
          processes: int = 2) -> list[tuple[list[str], float, str | None]]:
    """(event labels raised, seconds of audio, read error or None) per clip, through
    `analyze` as the CLI runs it; a clip that cannot be read is an error, not the end."""
    from multiprocessing import Pool

    arg = str(model_path) if model_path else None
    with Pool(processes, initializer=_init, initargs=(arg,)) as pool:
        return pool.map(_judge, clips, chunksize=16)


def summarise(clips: list[UnseenClip],
              results: list[tuple[list[str], float, str | None]]) -> dict[str, dict]:
    """Per source and per group: clips, hours, clips raising each event class, events per
    hour of audio, read errors (a clip cut short by one still counts with what was read)."""
    out: dict[str, dict] = {}
    for clip, (labels, seconds, error) in zip(clips, results, strict=True):
        for key in (f"{clip.group}/{clip.source}", clip.group, "all"):
            row = out.setdefault(key, {"clips": 0, "hours": 0.0, "errors": 0,
                                       "clips_raising": Counter(), "events": Counter()})
            row["clips"] += 1
            row["hours"] += seconds / 3600
            row["errors"] += error is not None
            row["clips_raising"].update(set(labels))
            row["events"].update(labels)
    for row in out.values():
        row["clips_raising"] = {c: row["clips_raising"][c] for c in EVENT_CLASSES}
        row["events_per_hour"] = {c: round(row["events"][c] / row["hours"], 1)
                                  if row["hours"] else 0.0 for c in EVENT_CLASSES}
        row["events"] = {c: row["events"][c] for c in EVENT_CLASSES}
        row["hours"] = round(row["hours"], 3)
    return out


def table(summary: dict[str, dict]) -> str:
    """The summary as a Markdown table: groups in bold, each followed by its sources."""
    lines = ["| sounds | clips | read errors | hours | clips raising cough / fall / glass break | "
             "events per hour |", "|---|---|---|---|---|---|"]
    for key in sorted(summary, key=lambda k: (k == "all", k.split("/")[0], "/" in k, k)):
        row = summary[key]
        counts = row["clips_raising"]
        raised = " / ".join(f"{counts[c]} ({100 * counts[c] / row['clips']:.1f} %)"
                            for c in EVENT_CLASSES)
        rate = " / ".join(f"{row['events_per_hour'][c]:.1f}" for c in EVENT_CLASSES)
        name = f"**{key}**" if "/" not in key else key
        lines.append(f"| {name} | {row['clips']} | {row['errors']} | {row['hours']:.2f} | "
                     f"{raised} | {rate} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="folder with events.onnx and its card (default: the shipped model)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args(argv)
    from monitor.errors import MonitorError

    if args.json is not None and not args.json.parent.is_dir():
        print(f"--json {args.json}: no folder {args.json.parent}", file=sys.stderr)
        return 2
    model = args.models_dir / "events.onnx" if args.models_dir else None
    try:
        check_model(model)
    except MonitorError as err:
        print(f"model: {err}", file=sys.stderr)
        return 2
    files = {package: _dpkg_files(package) for package in PACKAGES}
    missing = [package for package, listed in files.items() if not listed]
    if missing:
        print(f"not installed: {' '.join(missing)} (scripts/unseen-sources.sh installs them)",
              file=sys.stderr)
        return 2
    clips = unseen_clips(files.__getitem__)
    summary = summarise(clips, judge(clips, model_path=model))
    print(table(summary))
    if args.json:
        try:
            args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        except OSError as err:
            print(f"--json {args.json}: {err.strerror}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
