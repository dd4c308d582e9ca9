"""Accept loops that survive running out of descriptors or memory: back off, log once, resume.

asyncio's ``create_server`` answers ``accept()`` failing with EMFILE/ENFILE/ENOBUFS/ENOMEM
by calling the loop's exception handler (a traceback) once per backlog slot and retrying
a second later: thousands of tracebacks a second, exactly when the host is in trouble.
``AcceptLoop`` serves listening sockets instead: on such an error it stops accepting for a
short, growing pause (clients wait in the kernel's backlog), logs one line per interval
that says what happened and what to do, counts ``relay_accept_errors_total``, and says
so once when it accepts again. Each accepted connection gets a protocol from the factory
(``loop.connect_accepted_socket``); a TLS handshake that fails or stalls past its deadline
is one INFO line and ``relay_tls_handshake_failures_total``, never a traceback.

Used by the SMTP listeners, the IMAP/POP3 proxy, the metrics endpoint and the control
socket. ``bind_tcp``/``bind_unix`` make the listening sockets as ``create_server`` would.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path

from relay.metrics import Metrics
from relay.ratelog import RateLimitedLog

log = logging.getLogger("relay.accept")

# accept() errors that mean "the host is short of something", and how they are labelled.
RESOURCE_ERRORS = {errno.EMFILE: "descriptors", errno.ENFILE: "system_descriptors",
                   errno.ENOBUFS: "memory", errno.ENOMEM: "memory"}
_WHAT = {"descriptors": "out of file descriptors",
         "system_descriptors": "the system is out of file descriptors",
         "memory": "out of memory (socket buffers)", "error": "accept() failed"}
_HINT = {"descriptors": "each session needs one descriptor (proxy sessions two): raise "
                        "LimitNOFILE (systemd) or ulimit -n, or lower max_connections",
         "system_descriptors": "raise fs.file-max, or find the process holding them",
         "memory": "the host is under memory pressure: check other processes and limits",
         "error": "see the error; accepting resumes by itself"}
# accept() errors about one connection that died in the backlog: just take the next one.
_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN}
BATCH = 100                         # connections taken per wake-up of the listening socket

Factory = Callable[[], asyncio.BaseProtocol]


def bind_tcp(host: str | None, port: int, *, backlog: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (all when empty), as
    ``loop.create_server`` binds them; OSError when one cannot be bound."""
    socks: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def bind_unix(path: Path, *, backlog: int = 100) -> socket.socket:
    """A listening Unix socket at ``path`` (which must not exist); OSError otherwise."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class AcceptLoop:
    """Accepts connections on ``socks`` for one named server; see the module docstring."""

    def __init__(self, name: str, socks: Iterable[socket.socket], factory: Factory, *,
                 tls: ssl.SSLContext | None = None, handshake_timeout: float | None = None,
                 metrics: Metrics | None = None, log_interval: float = 60.0,
                 backoff: tuple[float, float] = (0.05, 1.0)) -> None:
        self.name = name
        self.sockets = list(socks)
        self._factory = factory
        self._tls = tls
        self._handshake_timeout = handshake_timeout
        self._metrics = metrics
        self._backoff = backoff
        self._ratelog = RateLimitedLog(log, interval=log_interval)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failing: dict[int, tuple[float, int, float]] = {}   # fd: (pause, count, since)
        self._resumes: dict[int, asyncio.TimerHandle] = {}
        self._setups: set[asyncio.Task[None]] = set()
        if metrics is not None:
            for reason in (*dict.fromkeys(RESOURCE_ERRORS.values()), "error"):
                metrics.accept_errors.labels(name, reason)
            if tls is not None:
                for reason in ("timeout", "failed"):
                    metrics.tls_handshake_failures.labels(name, reason)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._readable, sock)

    def close(self) -> None:
        """Stop accepting and close the listening sockets. Sessions carry on; clients
        still in their TLS handshake are dropped (they had not started a session).

        A plain connection accepted in the same loop iteration is left to finish setting
        up: it is already the client's session, and cancelling its set-up would drop it
        unanswered (a task cancelled before it runs never hands the socket over), or on
        uvloop close the connection under a protocol that was already told it was made."""
        for handle in self._resumes.values():
            handle.cancel()
        self._resumes.clear()
        for sock in self.sockets:
            if sock.fileno() >= 0 and self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        if self._tls is not None:
            for task in self._setups:
                task.cancel()

    async def wait_closed(self) -> None:
        """Wait for the connections being set up (or dropped) to be done with."""
        if self._setups:
            await asyncio.gather(*self._setups, return_exceptions=True)

    # -- accepting (a reader callback, as asyncio's own servers do) ----------------------
    def _readable(self, sock: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        fd = sock.fileno()
        for _ in range(BATCH):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    continue
                self._pause(sock, fd, exc)
                return
            if fd in self._failing:
                _, failed, since = self._failing.pop(fd)
                log.warning("%s: accepting connections again after %.1f s (%d accept() "
                            "calls failed)", self.name, loop.time() - since, failed)
            conn.setblocking(False)
            task = loop.create_task(self._set_up(loop, conn, addr))
            self._setups.add(task)
            task.add_done_callback(self._setups.discard)

    def _pause(self, sock: socket.socket, fd: int, exc: OSError) -> None:
        """accept() failed for want of resources: stop reading the socket for a growing
        pause (the kernel keeps the clients in its backlog), then try again."""
        loop = self._loop
        assert loop is not None
        reason = RESOURCE_ERRORS.get(exc.errno or 0, "error")
        pause, failed, since = self._failing.get(fd, (0.0, 0, loop.time()))
        pause = min(max(pause * 2, self._backoff[0]), self._backoff[1])
        self._failing[fd] = (pause, failed + 1, since)
        if self._metrics is not None:
            self._metrics.accept_errors.labels(self.name, reason).inc()
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self._ratelog.log(logging.ERROR, reason,
                          "%s: cannot accept connections: %s (%s: %s); pausing %.2f s and "
                          "retrying, clients wait in the backlog\n  hint: %s", self.name,
                          _WHAT[reason], code, exc.strerror or exc, pause, _HINT[reason])
        loop.remove_reader(fd)
        self._resumes[fd] = loop.call_later(pause, self._resume, sock, fd)

    def _resume(self, sock: socket.socket, fd: int) -> None:
        self._resumes.pop(fd, None)
        if sock.fileno() < 0 or self._loop is None:
            return                                        # closed meanwhile
        self._loop.add_reader(fd, self._readable, sock)
        self._readable(sock)

    async def _set_up(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                      addr: object) -> None:
        try:
            if self._tls is None:
                await loop.connect_accepted_socket(self._factory, conn)
            else:
                await loop.connect_accepted_socket(
                    self._factory, conn, ssl=self._tls,
                    ssl_handshake_timeout=self._handshake_timeout)
        except (OSError, TimeoutError) as exc:           # ssl.SSLError is an OSError
            conn.close()
            if self._tls is not None:
                self.handshake_failed(_peer(addr), exc)
        except Exception as exc:                          # the connection, not the server
            conn.close()
            self._ratelog.log(logging.ERROR, "setup", "%s: could not set up a connection "
                              "from %s: %r", self.name, _peer(addr), exc)

    def handshake_failed(self, client: str, exc: BaseException) -> None:
        """Count and log (one INFO line) a client's failed or stalled TLS handshake."""
        stalled = isinstance(exc, TimeoutError) or "taking longer" in str(exc)
        note_tls_failure(self.name, client, exc, stalled=stalled, metrics=self._metrics,
                         timeout=self._handshake_timeout)


def note_tls_failure(name: str, client: str, exc: BaseException, *, stalled: bool,
                     metrics: Metrics | None, timeout: float | None) -> None:
    """The one INFO line (and the metric) for a client's failed TLS handshake; also used
    for STARTTLS, whose handshake happens inside a session."""
    if metrics is not None:
        metrics.tls_handshake_failures.labels(name, "timeout" if stalled else "failed").inc()
    if stalled:
        log.info("%s: TLS handshake with %s did not finish within %.0f s; connection closed",
                 name, client, timeout or 0)
    else:
        detail = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        log.info("%s: TLS handshake with %s failed (%s); connection closed", name, client,
                 detail)


def _peer(addr: object) -> str:
    if isinstance(addr, tuple) and addr:
        return str(addr[0])
    return str(addr) or "unix socket"

