"""The example configuration files the README points to load and validate as shipped."""

from __future__ import annotations

from pathlib import Path

from monitor.alert import load_alert_config
from monitor.proxy import load_proxy_config

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
