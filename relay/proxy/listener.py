"""An IMAP or POP3 proxy listener: binding, TLS toward clients, limits, reconfigure, drain.

When a reload changes the way to the upstream (its proxy or tunnel, credentials, host),
sessions that logged in the old way end at their next safe point, so the platform
reconnects the new way (``on_upstream_change = "reconnect"``), or are left alone
(``"keep"``); sessions still before login simply log in the new way.
Connections are accepted by ``relay.acceptloop`` (which backs off when the process is out
of descriptors) and admitted per client network (``relay.connlimits``); a client network
refused after failed logins is told so before its greeting.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable

from relay.acceptloop import AcceptLoop, bind_tcp
from relay.config.schema import ListenerConfig, UpstreamConfig
from relay.connlimits import METRIC_REASON, ConnectionCounter, Limits, descriptors_for
from relay.errors import ConfigError
from relay.metrics import Metrics
from relay.proxy.accounts import Authenticator
from relay.proxy.pump import Channel
from relay.proxy.session import ProxySession, SessionContext
from relay.proxy.upstream import TokenFor
from relay.proxy.upstream_path import UpstreamPath
from relay.throttle import FailureThrottle, client_key
from relay.tls import client_context, server_context
from relay.transports.base import Transport

log = logging.getLogger("relay.proxy")


class ProxyListener:
    """Accepts IMAP or POP3 clients and proxies each to ``upstream``."""

    def __init__(self, cfg: ListenerConfig, *, upstream: UpstreamConfig,
                 authenticator: Authenticator,
                 transport_for: Callable[[UpstreamConfig], Transport],
                 token_for: TokenFor | None = None, metrics: Metrics | None = None,
                 fail_delay: float = 1.0, fail_delay_max: float = 8.0,
                 kernel_splice: bool = True, path: UpstreamPath | None = None,
                 accounts: FailureThrottle | None = None) -> None:
        """``accounts``: the per-account login throttle every listener of the process
        shares (a distributed guess at one account is refused on all of them)."""
        self._kernel_splice = kernel_splice
        self._accounts = accounts
        self._server: AcceptLoop | None = None
        self._tasks: dict[asyncio.Task[None], ProxySession] = {}   # every session's task
        self._sessions: dict[ProxySession, str] = {}   # admitted ones, with their slot
        self._fail_delay = (fail_delay, fail_delay_max)
        self._counter = ConnectionCounter()
        self._ctx = self._context(cfg, upstream, authenticator, transport_for, token_for,
                                  metrics, None, path)

    def _context(self, cfg: ListenerConfig, upstream: UpstreamConfig,
                 authenticator: Authenticator,
                 transport_for: Callable[[UpstreamConfig], Transport],
                 token_for: TokenFor | None, metrics: Metrics | None,
                 old: SessionContext | None, path: UpstreamPath | None) -> SessionContext:
        if cfg.protocol not in ("imap", "pop3") or upstream.protocol != cfg.protocol:
            raise ConfigError(f"listener {cfg.name} ({cfg.protocol}) cannot proxy to upstream "
                              f"{upstream.name} ({upstream.protocol})", key="listener.upstream",
                              line=cfg.line or None,
                              hint="an IMAP listener needs an IMAP upstream, POP3 a POP3 one")
        server_tls = None
        if cfg.tls != "none":
            server_tls = server_context(cfg, old.server_tls if old else None)
        network = functools.partial(client_key, ipv4_prefix=cfg.client_ipv4_prefix,
                                    ipv6_prefix=cfg.client_ipv6_prefix)
        if old is not None:                       # keep what clients already earned
            failures = old.failures
            failures.configure(limit=cfg.auth_fail_limit, window=cfg.auth_fail_window,
                               key=network)
        else:
            failures = FailureThrottle(limit=cfg.auth_fail_limit, window=cfg.auth_fail_window,
                                       base_delay=self._fail_delay[0],
                                       max_delay=self._fail_delay[1], key=network,
                                       accounts=self._accounts, metrics=metrics)
        return SessionContext(
            listener=cfg, upstream=upstream, authenticator=authenticator,
            transport_for=transport_for, token_for=token_for, metrics=metrics,
            failures=failures, server_tls=server_tls, kernel_splice=self._kernel_splice,
            upstream_tls=client_context(upstream) if upstream.tls != "none" else None,
            path=path)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self._ctx.listener
        implicit = cfg.tls == "implicit"
        try:
            socks = bind_tcp(cfg.listen.host, cfg.listen.port, backlog=1024)
        except OSError as exc:
            raise ConfigError(f"listener {cfg.name}: cannot listen on {cfg.listen}: "
                              f"{exc.strerror or exc}", key="listener.listen",
                              line=cfg.line or None,
                              hint="another process may use the port, or binding below "
                                   "1024 needs CAP_NET_BIND_SERVICE") from exc
        self._server = AcceptLoop(cfg.name, socks, self._accept,
                                  tls=self._ctx.server_tls if implicit else None,
                                  handshake_timeout=cfg.tls_handshake_timeout,
                                  metrics=self._ctx.metrics)
        self._server.start()
        soft = descriptors_for(2 * cfg.max_connections + 64)
        if cfg.max_connections and soft < 2 * cfg.max_connections + 64:
            log.warning("listener %s: max_connections = %d needs about %d file descriptors "
                        "(two per session) but the limit is %d\n  hint: raise LimitNOFILE "
                        "(systemd) or ulimit -n, or lower max_connections", cfg.name,
                        cfg.max_connections, 2 * cfg.max_connections + 64, soft)
        if self._ctx.metrics is not None:
            self._ctx.metrics.proxy_sessions.labels(cfg.name).set(0)
            self._ctx.metrics.proxy_sessions_total.labels(cfg.name)
            self._ctx.metrics.declare_hostile(cfg.name, cfg.protocol)
        log.info("proxy listener %s (%s, tls=%s) on %s → upstream %s", cfg.name, cfg.protocol,
                 cfg.tls, self.address, self._ctx.upstream.name)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): useful when the config asked for port 0."""
        assert self._server is not None and self._server.sockets
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_closed(self, timeout: float) -> None:
        """Let open sessions finish for up to ``timeout`` seconds, then drop the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
            for session in list(self._sessions):
                session.abort()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def reconfigure(self, cfg: ListenerConfig, *, upstream: UpstreamConfig,
                          authenticator: Authenticator,
                          transport_for: Callable[[UpstreamConfig], Transport],
                          token_for: TokenFor | None = None,
                          metrics: Metrics | None = None,
                          path: UpstreamPath | None = None) -> None:
        """Apply a new config to new sessions (open ones keep theirs, unless the way to
        the upstream changed: see ``_way_changed``).

        A changed ``listen`` address or TLS mode rebinds; certificates are reloaded. On
        any error the old settings stay and the error is raised.
        """
        old = self._ctx
        new = self._context(cfg, upstream, authenticator, transport_for, token_for,
                            metrics if metrics is not None else old.metrics, old, path)
        rebind = (cfg.listen != old.listener.listen or cfg.tls != old.listener.tls)
        if rebind and self._server is not None:
            previous = self._server
            self._ctx = new
            try:
                await self.start()
            except ConfigError:
                self._ctx, self._server = old, previous
                raise
            previous.close()
        else:
            # _context reloaded the certificate into the SSLContext the server already holds
            self._ctx = new
        self._way_changed(new)

    def _way_changed(self, new: SessionContext) -> None:
        """Sessions that logged in another way than ``new.path``: end them at a safe point
        ("reconnect") or leave them ("keep"); ones not logged in yet take the new way."""
        reconnect = new.listener.on_upstream_change == "reconnect"
        ending = kept = 0
        why = ""
        for session in list(self._sessions):
            old = session.ctx
            if old.path is None or new.path is None or old.path == new.path:
                continue
            if session.spliced is None:
                session.ctx = new                 # not logged in yet: it logs in the new way
                continue
            why = old.path.changes(new.path)
            if reconnect and session.reconnect(why):
                ending += 1
                continue
            kept += 1
            if self._ctx.metrics is not None:
                self._ctx.metrics.proxy_upstream_change.labels(new.listener.name,
                                                               "kept").inc()
        if ending:
            log.info("listener %s: the way to upstream %s changed (%s): %d open session(s) "
                     "end at their next safe point so clients reconnect the new way",
                     new.listener.name, new.upstream.name, why, ending)
        if kept:
            because = ("on_upstream_change = \"keep\"" if not reconnect else
                       "they cannot be ended safely (logged in under \"keep\", or COMPRESS)")
            log.warning("listener %s: the way to upstream %s changed (%s): %d open "
                        "session(s) stay on the old way until they end (%s)",
                        new.listener.name, new.upstream.name, why, kept, because)

    # -- accepting -------------------------------------------------------------------------
    def _accept(self) -> Channel:
        ch = Channel()
        ch.on_connect = self._connected
        return ch

    def _connected(self, ch: Channel) -> None:
        assert ch.transport is not None
        ctx = self._ctx
        peer = ch.transport.get_extra_info("peername") or ("?", 0)
        addr = str(peer[0])
        sock = ch.transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        refuse: str | None
        if ctx.failures.blocked(addr):
            refuse, slot = "auth_refused", ""
        else:
            refuse, slot = self._counter.admit(addr, Limits.of(ctx.listener))
        session = ProxySession(ctx, ch, (addr, int(peer[1])))
        m = ctx.metrics
        if refuse is None:
            self._sessions[session] = slot
            if m is not None:
                m.proxy_sessions.labels(ctx.listener.name).inc()
                m.proxy_sessions_total.labels(ctx.listener.name).inc()
        elif m is not None:
            m.proxy_login_failures.labels(ctx.listener.name, refuse).inc()
            if refuse in METRIC_REASON:
                m.connections_refused.labels(ctx.listener.name, METRIC_REASON[refuse]).inc()
        task = asyncio.get_running_loop().create_task(session.run(refuse))
        self._tasks[task] = session
        task.add_done_callback(self._done)      # a bound method: no closure per session

    def _done(self, task: asyncio.Task[None]) -> None:
        session = self._tasks.pop(task)
        slot = self._sessions.pop(session, None)
        if slot is not None:
            self._counter.release(slot)
            if session.ctx.metrics is not None:
                session.ctx.metrics.proxy_sessions.labels(session.ctx.listener.name).dec()
