"""Tells systemd about readiness, reloads, stopping and status over $NOTIFY_SOCKET (sd_notify).

A ``Type=notify`` unit starts relay with ``NOTIFY_SOCKET`` set to a Unix datagram socket
(a path, or ``@name`` in the abstract namespace). Each notification is one datagram of
``KEY=VALUE`` lines. Without the variable every call is a cheap no-op that returns False,
so the app calls these unconditionally. Sends never block: the socket is non-blocking
and a full receive queue drops the notification with a log line, as sd_notify(3) would
fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("relay.sdnotify")


def _address(value: str) -> str | bytes | None:
    """The socket address of a NOTIFY_SOCKET value; None for unsupported forms."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()          # abstract namespace
    if value.startswith("/"):
        return value
    return None                                     # e.g. "vsock:..." (systemd in a VM)


def _clean(text: str) -> str:
    """A status text on one line: newlines would start a new KEY=VALUE assignment."""
    return " ".join(text.split())


class SystemdNotifier:
    """Sends sd_notify messages to the service manager, when there is one."""

    def __init__(self, notify_socket: str | None = None) -> None:
        self._target = _address(notify_socket) if notify_socket else None
        if notify_socket and self._target is None:
            log.warning("NOTIFY_SOCKET=%r is not a Unix socket path; readiness will not "
                        "be reported to the service manager", notify_socket)
        self._sock: socket.socket | None = None
        self._watchdog_usec = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """A notifier for ``$NOTIFY_SOCKET`` (and ``$WATCHDOG_USEC`` if meant for us)."""
        env = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET") or None)
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            notifier._watchdog_usec = int(usec)
        return notifier

    @property
    def enabled(self) -> bool:
        """True when a service manager listens (``NOTIFY_SOCKET`` was set and usable)."""
        return self._target is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True if it was sent."""
        if self._target is None or not fields:
            return False
        payload = "\n".join(f"{k}={_clean(str(v))}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, self._target)
        except OSError as exc:
            log.warning("could not notify the service manager (%s): %s; "
                        "hint: check NOTIFY_SOCKET and that the unit is Type=notify",
                        ", ".join(fields), exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """Startup or a reload finished: listeners are bound and the spool is recovered."""
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def reloading(self, status: str = "Reloading configuration") -> bool:
        """A reload began; systemd shows the unit "reloading" until the next ``ready()``."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec, STATUS=status)

    def stopping(self, status: str = "Draining") -> bool:
        """Shutdown began (SIGTERM): no longer accepting, finishing sessions."""
        return self.notify(STOPPING=1, STATUS=status)

    def status(self, text: str) -> bool:
        """A free-form one-line status shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time for the current start/stop (e.g. a long drain)."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    @property
    def watchdog_interval(self) -> float | None:
        """How often to call ``watchdog()`` (half of ``WatchdogSec=``), or None if unset."""
        if self._target is None or not self._watchdog_usec:
            return None
        return self._watchdog_usec / 2_000_000

    def watchdog(self) -> bool:
        """Keep-alive ping for ``WatchdogSec=``; send it from the event loop, never a thread."""
        return self.notify(WATCHDOG=1)

    async def watchdog_loop(self) -> None:
        """Ping ``WatchdogSec=`` forever from the event loop (returns at once if unset).

        The app runs it as a task: a blocked loop stops the pings and systemd restarts
        relay. Cancel the task when stopping.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
