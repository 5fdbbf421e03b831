"""`audio-monitor install-service`: write the systemd units with this installation's paths.

The units in `systemd/` name `/opt/audio-monitor`; this rewrites `ExecStart=`,
`WorkingDirectory=` and `Documentation=` to where this copy lives, writes them to
`--dest` (default /etc/systemd/system) and prints the `systemctl` lines to run. It
never calls systemctl itself, so it is safe to run on a build host or in a test.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from monitor.errors import ConfigError

__all__ = ["UNITS", "add_install_service", "install_units", "render_unit"]

REPO = Path(__file__).resolve().parents[2]
UNIT_DIR = REPO / "systemd"
UNITS = ("audio-monitor.service", "audio-monitor@.service", "audio-monitor-alert.service")
TEMPLATE_ROOT = "/opt/audio-monitor"
TEMPLATE_EXEC = f"{TEMPLATE_ROOT}/.venv/bin/audio-monitor"


def _default_executable() -> Path:
    """The `audio-monitor` script beside this interpreter (the venv's bin/)."""
    return Path(sys.executable).parent / "audio-monitor"


def render_unit(text: str, *, executable: Path, root: Path) -> str:
    """A unit's text with the template paths replaced by `executable` and `root`."""
    return (text.replace(TEMPLATE_EXEC, str(executable))
            .replace(TEMPLATE_ROOT, str(root)))


def install_units(dest: Path, *, executable: Path, root: Path = REPO,
                  units: tuple[str, ...] = UNITS) -> list[Path]:
    """Write the rendered units into `dest`; returns the written paths."""
    if not executable.is_file():
        raise ConfigError(f"install-service: {executable} is not a file; pass --executable "
                          "with the path of the installed `audio-monitor` script")
    if not dest.is_dir():
        raise ConfigError(f"install-service: --dest {dest} is not a directory")
    written = []
    for name in units:
        text = (UNIT_DIR / name).read_text(encoding="utf-8")
        target = dest / name
        try:
            target.write_text(render_unit(text, executable=executable.resolve(),
                                          root=root.resolve()), encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"install-service: cannot write {target}: {err.strerror} "
                              "(run as root, or pass --dest)") from err
        written.append(target)
    return written


def _cmd_install_service(args: argparse.Namespace) -> int:
    executable = args.executable or _default_executable()
    written = install_units(args.dest, executable=executable)
    for path in written:
        print(f"wrote {path}")
    if args.config_example and not Path("/etc/audio-monitor/config.yaml").exists():
        print("next: mkdir -p /etc/audio-monitor && "
              f"cp {REPO / 'config.yaml'} /etc/audio-monitor/config.yaml")
    print("then: set `model.path` to an absolute path and `state_dir: /var/lib/audio-monitor` "
          "in /etc/audio-monitor/config.yaml, and run:")
    print("  systemctl daemon-reload && systemctl enable --now audio-monitor.service")
    if shutil.which("systemd-analyze"):
        print(f"check: systemd-analyze verify {' '.join(str(p) for p in written)}")
    return 0


def add_install_service(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the `install-service` subcommand on the CLI's subparsers."""
    parser = sub.add_parser("install-service",
                            help="write the systemd units for this installation")
    parser.add_argument("--dest", type=Path, default=Path("/etc/systemd/system"),
                        help="folder to write the units to (default: /etc/systemd/system)")
    parser.add_argument("--executable", type=Path, default=None,
                        help="the audio-monitor script the units run (default: this venv's)")
    parser.add_argument("--no-config-example", dest="config_example", action="store_false",
                        help="do not print the config copy step")
    parser.set_defaults(handler=_cmd_install_service)
