"""CURVE keys and the rule that nothing leaves loopback unencrypted.

`audio-monitor keys NAME` writes ``NAME.key`` (public) and ``NAME.key_secret`` (both
halves) in ZeroMQ's certificate format, mode 0600, so `zmq.auth.load_certificate` and
the allow-list folders of `zmq.auth` read them. A server socket (`curve_server=True`,
set before bind) accepts only clients whose public key file lies in its allow-list
folder; `ThreadAuthenticator` enforces it, one per ZeroMQ context.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from monitor.errors import ConfigError

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def write_keypair(directory: Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create a CURVE key pair; returns (public file, secret file), both mode 0600."""
    public, secret = zmq.curve_keypair()
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    for path, with_secret in ((public_path, False), (secret_path, True)):
        lines = [f"#   ****  audio-monitor CURVE certificate, {stamp}  ****",
                 "#   ZeroMQ CURVE " + ("**Secret** Certificate" if with_secret
                                        else "Public Certificate"),
                 "metadata", "curve", f'    public-key = "{public.decode("ascii")}"']
        if with_secret:
            lines.append(f'    secret-key = "{secret.decode("ascii")}"')
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError as err:
            raise ConfigError(f"keys: {path} exists; pick another name or pass --force") from err
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(path, 0o600)
    return public_path, secret_path


def load_secret(path: Path, *, where: str) -> tuple[bytes, bytes]:
    """(public, secret) from a `.key_secret` file."""
    public, secret = _load(path, where=where)
    if not secret:
        raise ConfigError(f"{where}: {path} holds no secret key; use the NAME.key_secret file "
                          "written by `audio-monitor keys NAME`")
    return public, secret


def load_public(path: Path, *, where: str) -> bytes:
    return _load(path, where=where)[0]


def _load(path: Path, *, where: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: cannot read CURVE key file {path}: {err}; create one with "
                          "`audio-monitor keys NAME`") from err
    return public, secret


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    return host in LOOPBACK_HOSTS


def require_safe(endpoint: str, *, curve: bool, allow_insecure: bool, where: str) -> None:
    """Refuse to bind a non-loopback endpoint in clear text unless the user said so."""
    if curve or is_loopback(endpoint):
        return
    if not allow_insecure:
        raise ConfigError(f"{where}: {endpoint!r} is not loopback and CURVE is off; set "
                          "publish.curve (keys from `audio-monitor keys`) or "
                          "publish.allow_insecure: true")
    logger.warning("%s: %s is reachable from the network without encryption", where, endpoint)


class CurveServer:
    """Makes server sockets CURVE servers with an allow-list; owns the authenticator."""

    def __init__(self, context: zmq.Context[Any], *, secret_key: Path,
                 allowed_clients: Path | None, where: str) -> None:
        self.public, self.secret = load_secret(secret_key, where=f"{where}.secret_key")
        if allowed_clients is not None and not allowed_clients.is_dir():
            raise ConfigError(f"{where}.allowed_clients: {allowed_clients} is not a folder of "
                              "client public keys (NAME.key files)")
        # Imported here: zmq.auth.thread loads asyncio and ssl (~9 MB), which a daemon
        # without CURVE never needs.
        from zmq.auth.thread import ThreadAuthenticator

        self.auth = ThreadAuthenticator(context)
        self.auth.start()
        location = str(allowed_clients) if allowed_clients is not None \
            else zmq.auth.CURVE_ALLOW_ANY
        self.auth.configure_curve(domain="*", location=location)

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Call before bind."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def stop(self) -> None:
        self.auth.stop()


def apply_client(socket: zmq.Socket[Any], *, secret_key: Path, server_key: Path,
                 where: str) -> None:
    """Make `socket` a CURVE client of the server whose public key is in `server_key`."""
    public, secret = load_secret(secret_key, where=f"{where}.secret_key")
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = load_public(server_key, where=f"{where}.server_key")
