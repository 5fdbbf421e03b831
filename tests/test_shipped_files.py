"""The example configuration files the README points to load and validate as shipped."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from monitor.apps.alert.config import load_alert_config
from monitor.apps.proxy import load_proxy_config

REPO = Path(__file__).resolve().parents[1]


def test_alert_yaml_loads() -> None:
    config = load_alert_config(REPO / "alert.yaml")
    assert config.rules


def test_fleet_yaml_loads() -> None:
    config = load_proxy_config(REPO / "fleet.yaml")
    assert [link.sensor_id for link in config.sensors] == ["room-101"]
    assert config.publish.startswith("tcp://127.0.0.1")


def test_alert_unit_reads_an_alert_config() -> None:
    """The alert daemon refuses config.yaml's keys (exit 2, not restarted): its unit must
    name an alert config."""
    unit = (REPO / "systemd" / "audio-monitor-alert.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith("alert --config /etc/audio-monitor/alert.yaml")


def _module_table() -> list[str]:
    """Every module the README's module table names, relative to `monitor/`."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| module | job |"):]
    table = table[: table.index("\n\n")]
    named: list[str] = []
    for row in table.splitlines()[2:]:
        cell = row.split("|")[1]
        named += re.findall(r"`([^`]+)`", cell)
    return named


def test_readme_module_table_matches_the_tree() -> None:
    """The table names every module of `monitor/` outside training/ (and training/ itself),
    and nothing that is not there."""
    named = _module_table()
    package = REPO / "monitor"
    tree = sorted(str(path.relative_to(package)) for path in package.rglob("*.py")
                  if path.relative_to(package).parts[0] != "training"
                  and path.name != "__init__.py")
    files = sorted(name for name in named if name.endswith(".py"))
    assert files == tree
    folders = {name.rstrip("/") for name in named if name.endswith("/")}
    assert folders == {str(path.parent.relative_to(package))
                       for path in package.rglob("__init__.py") if path.parent != package}


def test_readme_use_shows_every_command() -> None:
    """The README's Use block has a line for every command `audio-monitor --help` lists."""
    from monitor.cli import _parser

    text = (REPO / "README.md").read_text(encoding="utf-8")
    use = text[text.index("## Use"):text.index("## How it works")]
    shown = set(re.findall(r"\$A ([a-z-]+)", use))
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) - shown == set()
