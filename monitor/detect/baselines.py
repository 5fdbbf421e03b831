"""Learned machine baselines on disk: one folder per learning, the active one named by a file.

``<state_dir>/machines/<name>/<stamp>/model.npz`` + ``card.json``; the file
``<state_dir>/machines/<name>/current`` names the active stamp. Writes are atomic (a
temporary folder renamed, `current` replaced), so a daemon starting meanwhile reads the
old baseline or the new one, never half of one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitor.errors import ModelError

logger = logging.getLogger(__name__)

CARD_SCHEMA = 1
MODEL_FILE = "model.npz"
CARD_FILE = "card.json"
CURRENT_FILE = "current"


@dataclass(frozen=True)
class Baseline:
    """A learned baseline: the model arrays and its card."""

    mean: np.ndarray
    """(n_mels,) mean of the boxcar feature."""
    whiten: np.ndarray
    """(n_mels, n_mels) upper triangular U with U.T @ U = inverse covariance."""
    calib_raw: np.ndarray
    """Raw per-frame scores of the held-back normal audio (to redo the threshold at load)."""
    card: dict[str, Any]



def machine_dir(state_dir: Path, machine: str) -> Path:
    return Path(state_dir).expanduser() / "machines" / machine


def _stamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%S.%fZ")


def save_baseline(baseline: Baseline, state_dir: Path, *, keep: int = 5,
                  now: dt.datetime | None = None) -> Path:
    """Write the baseline under a new stamp, make it the active one, prune to `keep`."""
    if keep < 1:
        raise ModelError(f"keep={keep}: must be >= 1")
    root = machine_dir(state_dir, baseline.card["machine"])
    folder = root / _stamp(now)
    while folder.exists():
        folder = folder.with_name(folder.name + "_")
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True)
    np.savez(tmp / MODEL_FILE, mean=baseline.mean, whiten=baseline.whiten,
             calib_raw=baseline.calib_raw)
    (tmp / CARD_FILE).write_text(json.dumps(baseline.card, indent=1) + "\n", encoding="utf-8")
    tmp.rename(folder)
    activate_baseline(state_dir, baseline.card["machine"], folder.name)
    prune_baselines(state_dir, baseline.card["machine"], keep=keep)
    return folder


def activate_baseline(state_dir: Path, machine: str, stamp: str) -> None:
    """Point `current` at baseline `stamp` (atomic rename; a restart of the daemon picks it)."""
    root = machine_dir(state_dir, machine)
    if not (root / stamp / CARD_FILE).is_file():
        raise ModelError(f"machine {machine!r} has no baseline {stamp!r} under {root}")
    tmp = root / (CURRENT_FILE + ".tmp")
    tmp.write_text(stamp + "\n", encoding="utf-8")
    os.replace(tmp, root / CURRENT_FILE)


def list_baselines(state_dir: Path, machine: str) -> list[str]:
    """Complete baselines of a machine, oldest first."""
    root = machine_dir(state_dir, machine)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.endswith(".tmp") and (p / CARD_FILE).is_file())


def active_baseline(state_dir: Path, machine: str) -> str | None:
    path = machine_dir(state_dir, machine) / CURRENT_FILE
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def prune_baselines(state_dir: Path, machine: str, *, keep: int) -> list[str]:
    """Delete all but the newest `keep` baselines, never the active one; return those deleted."""
    stamps = list_baselines(state_dir, machine)
    active = active_baseline(state_dir, machine)
    doomed = [s for s in stamps[: max(0, len(stamps) - keep)] if s != active]
    for stamp in doomed:
        shutil.rmtree(machine_dir(state_dir, machine) / stamp)
        logger.info("machine %s: removed old baseline %s", machine, stamp)
    return doomed


def load_baseline(state_dir: Path, machine: str) -> Baseline:
    """The active baseline of `machine`; ModelError (one line) if there is none."""
    stamp = active_baseline(state_dir, machine)
    hint = f"run `audio-monitor learn --machine {machine}`"
    if stamp is None:
        raise ModelError(f"machine {machine!r} has no learned baseline under "
                         f"{machine_dir(state_dir, machine)}; {hint}")
    folder = machine_dir(state_dir, machine) / stamp
    try:
        card = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
        with np.load(folder / MODEL_FILE) as z:
            arrays = {k: np.array(z[k], dtype=np.float64) for k in ("mean", "whiten",
                                                                     "calib_raw")}
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"machine {machine!r}: baseline {folder} is unreadable "
                         f"({' '.join(str(err).split())}); {hint}") from err
    if card.get("schema") != CARD_SCHEMA or card.get("machine") != machine:
        raise ModelError(f"machine {machine!r}: {folder / CARD_FILE} is not a schema "
                         f"{CARD_SCHEMA} baseline of this machine; {hint}")
    return Baseline(card=card, **arrays)
