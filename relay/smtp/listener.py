"""An SMTP listener in relay's own event loop: binding, TLS, sessions, reload, drain.

``SmtpListener`` serves one ``[[listener]]`` with ``relay.acceptloop`` (no threads; it
backs off instead of flooding the log when the process runs out of descriptors).
Each session keeps the config it started with; ``reconfigure`` makes new sessions use a
new config, users and TLS certificate. Shutdown is ``stop_accepting()`` then
``wait_closed(timeout)``: open sessions may finish, then the rest are told ``421 4.3.2``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from relay.acceptloop import AcceptLoop, bind_tcp
from relay.config.schema import ListenerConfig
from relay.connlimits import ConnectionCounter, Counter
from relay.errors import RelayError
from relay.maillog import MailLog
from relay.metrics import Metrics
from relay.smtp.handler import Context
from relay.smtp.replies import REASONS
from relay.smtp.server import RelaySMTP
from relay.throttle import FailureThrottle, client_key
from relay.tls import server_context
from relay.users import UserDB
from relay.verdict import AcceptFn, Checks

log = logging.getLogger("relay.smtp")


def listen_backlog(cfg: ListenerConfig) -> int:
    return max(100, min(cfg.max_connections, 4096))


def bind_listener_sockets(cfg: ListenerConfig) -> list[socket.socket]:
    """Bind ``cfg.listen`` as ``start()`` would (every address of a name), for listener
    processes to serve; RelayError with a hint when it cannot."""
    try:
        return bind_tcp(cfg.listen.host, cfg.listen.port, backlog=listen_backlog(cfg))
    except OSError as exc:
        raise RelayError(
            f"listener {cfg.name}: cannot listen on {cfg.listen} ({exc.strerror or exc})",
            hint="another process may hold the port (ss -ltnp), or ports below 1024 "
                 "need root or CAP_NET_BIND_SERVICE") from None


def client_network(cfg: ListenerConfig) -> functools.partial[str]:
    """How the listener's limits and login throttle count a client's network."""
    return functools.partial(client_key, ipv4_prefix=cfg.client_ipv4_prefix,
                             ipv6_prefix=cfg.client_ipv6_prefix)


class SmtpListener:
    """Serves one SMTP listener; see the module docstring for the life cycle."""

    def __init__(self, cfg: ListenerConfig, *, hostname: str, accept: AcceptFn,
                 maillog: MailLog, checks: Checks | None = None, users: UserDB | None = None,
                 metrics: Metrics | None = None, auth_base_delay: float = 1.0,
                 auth_max_delay: float = 8.0, accounts: FailureThrottle | None = None,
                 connections: Counter | None = None,
                 on_failure: Callable[[str, str, str, str], None] | None = None) -> None:
        """``accounts``: the per-account login throttle every listener of the process
        shares (a distributed guess at one account is refused on all of them).
        ``connections``: the admission counter when another process keeps the count;
        ``on_failure``: told of each failed login (a process that is one of several
        reports them, and the main process tells every one of a lockout)."""
        if cfg.protocol != "smtp":
            raise ValueError(f"listener {cfg.name!r} is {cfg.protocol}, not smtp")
        self._throttle = FailureThrottle(limit=cfg.auth_fail_limit, window=cfg.auth_fail_window,
                                         base_delay=auth_base_delay, max_delay=auth_max_delay,
                                         key=client_network(cfg), accounts=accounts,
                                         metrics=metrics, quiet=on_failure is not None,
                                         on_failure=on_failure)
        self._connections: Counter = connections or ConnectionCounter()
        self._sessions: set[RelaySMTP] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._servers: list[AcceptLoop] = []
        self._ctx = self._context(cfg, hostname=hostname, accept=accept, maillog=maillog,
                                  checks=checks, users=users, metrics=metrics)
        if metrics is not None:
            metrics.smtp_sessions.labels(cfg.name).set(0)
            metrics.auth_failures.labels(cfg.name, "smtp")
            metrics.declare_hostile(cfg.name, "smtp")
            for reason in REASONS:
                metrics.messages_refused.labels(cfg.name, reason)

    def _context(self, cfg: ListenerConfig, *, hostname: str, accept: AcceptFn,
                 maillog: MailLog, checks: Checks | None, users: UserDB | None,
                 metrics: Metrics | None) -> Context:
        tls = server_context(cfg) if cfg.tls != "none" else None
        return Context(cfg=cfg, hostname=hostname, accept=accept, maillog=maillog,
                       tls_context=tls, users=users, checks=checks, metrics=metrics,
                       throttle=self._throttle, connections=self._connections)

    @property
    def config(self) -> ListenerConfig:
        return self._ctx.cfg

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) pairs; useful with port 0."""
        return [(str(s.getsockname()[0]), int(s.getsockname()[1]))
                for server in self._servers for s in server.sockets]

    def _factory(self) -> RelaySMTP:
        session = _TrackedSMTP(self._ctx)
        session.on_open, session.on_close = self._track, self._forget
        return session

    def _track(self, session: RelaySMTP) -> None:
        # On connection_made, not in the factory: an implicit-TLS client whose handshake
        # fails never gets there (nor to connection_lost), and must not be waited for.
        self._sessions.add(session)
        self._idle.clear()

    def _forget(self, session: RelaySMTP) -> None:
        self._sessions.discard(session)
        if not self._sessions:
            self._idle.set()

    def _sni(self, sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        # Implicit TLS: hand each handshake the current config's context (cert reloads).
        current = self._ctx.tls_context
        if current is not None:
            sslobj.context = current

    async def start(self, socks: list[socket.socket] | None = None) -> None:
        """Bind and serve; or serve ``socks``, listening sockets another process bound."""
        cfg = self._ctx.cfg
        server_ssl: ssl.SSLContext | None = None
        if cfg.tls == "implicit":
            server_ssl = server_context(cfg)
            server_ssl.sni_callback = self._sni
        if socks is None:
            socks = bind_listener_sockets(cfg)
        server = AcceptLoop(cfg.name, socks, self._factory, tls=server_ssl,
                            handshake_timeout=cfg.tls_handshake_timeout,
                            metrics=self._ctx.metrics)
        server.start()
        self._servers.append(server)
        log.info("listener %s: SMTP on %s (tls=%s, auth=%s)", cfg.name,
                 ", ".join(f"{h}:{p}" for h, p in self.addresses), cfg.tls, cfg.auth)
        if cfg.dangerously_allow_open_relay:
            log.warning("listener %s IS AN OPEN RELAY (dangerously_allow_open_relay = true): "
                        "anyone may send mail through it to any domain", cfg.name)

    def reconfigure(self, cfg: ListenerConfig, *, users: UserDB | None,
                    checks: Checks | None = None, accept: AcceptFn | None = None,
                    hostname: str | None = None) -> None:
        """Use a new config for new sessions; open sessions finish on the old one.

        The bind address and TLS mode cannot change in place (ValueError): the app
        replaces the listener for that. Raises ConfigError (old config kept) if the new
        certificate cannot be loaded.
        """
        old = self._ctx
        if cfg.listen != old.cfg.listen or cfg.tls != old.cfg.tls or cfg.name != old.cfg.name:
            raise ValueError("listen, tls or name changed: replace the listener instead")
        self._ctx = self._context(cfg, hostname=hostname or old.hostname,
                                  accept=accept or old.accept, maillog=old.maillog,
                                  checks=checks, users=users, metrics=old.metrics)
        self._throttle.configure(limit=cfg.auth_fail_limit, window=cfg.auth_fail_window,
                                 key=client_network(cfg))

    def lock_network(self, addr: str, seconds: float) -> None:
        """Refuse logins from ``addr``'s network for ``seconds`` (decided elsewhere)."""
        self._throttle.lock(addr, seconds)

    async def stop_accepting(self) -> None:
        """Stop taking new connections (open sessions carry on)."""
        for server in self._servers:
            server.close()

    async def wait_closed(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for sessions to end, then close the rest with 421."""
        try:
            if not self._idle.is_set():
                await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            for session in list(self._sessions):
                session.shutdown()
            try:
                await asyncio.wait_for(self._idle.wait(), 5.0)
            except TimeoutError:
                log.warning("listener %s: %d sessions did not close", self._ctx.cfg.name,
                            len(self._sessions))
        if self._ctx.background:
            await asyncio.gather(*self._ctx.background, return_exceptions=True)
        for server in self._servers:
            server.close()
            await server.wait_closed()


class _TrackedSMTP(RelaySMTP):
    """A session that tells its listener when it starts and when it is gone."""

    on_open: Any = None
    on_close: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.on_open is not None:
            self.on_open(self)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            if self.on_close is not None:
                self.on_close(self)
                self.on_close = None
