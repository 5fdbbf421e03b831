"""systemd's sd_notify protocol in pure Python: one datagram per notification.

systemd (Type=notify) passes a unix datagram socket in ``NOTIFY_SOCKET`` (a path, or
``@name`` for the abstract namespace) and, with ``WatchdogSec=``, the watchdog period
in ``WATCHDOG_USEC`` (for the process in ``WATCHDOG_PID``, if set). Without
``NOTIFY_SOCKET`` every call is a no-op, so the daemon runs the same by hand.
A failed send is logged once and never raised: telling systemd is best effort.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)

__all__ = ["Notifier"]


class Notifier:
    """Sends `KEY=value` lines to the service manager; no-op when `address` is None."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address or None
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        """Watchdog period in microseconds (None: no watchdog)."""
        self._socket: socket.socket | None = None
        self._warned = False
        self.sent = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for `NOTIFY_SOCKET`/`WATCHDOG_USEC`; the watchdog is ignored when
        `WATCHDOG_PID` names another process (it was meant for a parent)."""
        env = os.environ if environ is None else environ
        usec: int | None = None
        pid = env.get("WATCHDOG_PID", "")
        if not pid or pid == str(os.getpid()):
            try:
                usec = int(env.get("WATCHDOG_USEC", "0"))
            except ValueError:
                logger.warning("WATCHDOG_USEC=%r is not an integer; watchdog off",
                               env.get("WATCHDOG_USEC"))
        return cls(env.get("NOTIFY_SOCKET"), watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def ping_interval_s(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the period, as sd_watchdog_enabled advises)."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def notify(self, **fields: object) -> bool:
        """Send `KEY=value` lines (e.g. ``notify(READY=1, STATUS="ok")``); True if sent."""
        if self.address is None:
            return False
        text = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto(text.encode(), target)
        except OSError as err:
            if not self._warned:
                self._warned = True
                logger.warning("cannot notify the service manager at %s: %s", self.address, err)
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def reloading(self) -> bool:
        return self.notify(RELOADING=1)

    def stopping(self, status: str) -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _one_line(value: object) -> str:
    return " ".join(str(value).split())
