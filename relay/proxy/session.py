"""One proxy session: pre-auth with the client, map credentials, log in upstream, splice.

The session drives a sans-IO machine (``ImapPreAuth``/``Pop3PreAuth``) over the client
``Channel``; on ``Login`` it asks the ``Authenticator`` who to be toward the provider,
logs in through the upstream's transport, answers the client, and splices the two
channels until either side closes or the post-login idle timeout passes. It writes one
log line when it ends and never logs a password or token.

Before login the client has ``login_timeout`` in all (a deadline from its connection,
not an idle timer: bytes trickled one at a time do not extend it), and a STARTTLS
handshake ``tls_handshake_timeout``; a failed or stalled handshake is one INFO line.
Failed logins count against the client's network and the account (``relay.throttle``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.acceptloop import note_tls_failure
from relay.config.schema import ListenerConfig, UpstreamConfig
from relay.errors import OAuthError, ProxyUpstreamError, RelayError, TransportError
from relay.maillog import censor
from relay.metrics import Metrics
from relay.proxy import zerocopy
from relay.proxy.accounts import Authenticator
from relay.proxy.events import Close, Event, Login, LoginFailure, PreAuth, Send, StartTls
from relay.proxy.imap import ImapPreAuth
from relay.proxy.pop3 import Pop3PreAuth
from relay.proxy.pump import Channel, ChannelClosed, TransportSplice
from relay.proxy.safepoint import ImapWatch, Pop3Watch, watch_for
from relay.proxy.upstream import TokenFor, login_upstream
from relay.proxy.upstream_path import UpstreamPath
from relay.throttle import FailureThrottle
from relay.transports.base import Transport

log = logging.getLogger("relay.proxy")


@dataclass(slots=True)
class SessionContext:
    """What every session of one listener shares (swapped whole on reconfigure)."""

    listener: ListenerConfig
    upstream: UpstreamConfig
    authenticator: Authenticator
    transport_for: Callable[[UpstreamConfig], Transport]
    token_for: TokenFor | None
    metrics: Metrics | None
    failures: FailureThrottle
    server_tls: ssl.SSLContext | None = None
    kernel_splice: bool = True                 # splice(2) plain sessions (Linux)
    upstream_tls: ssl.SSLContext | None = None
    sessions: set[ProxySession] = field(default_factory=set)
    path: UpstreamPath | None = None           # the way to the provider (reload compares)


def _fmt(value: object) -> str:
    text = censor(str(value))
    if text and all(c.isalnum() or c in "._@:-[]/+=" for c in text):
        return text
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ProxySession:
    """A client connection from greeting to close."""

    __slots__ = ("_idle_handle", "addr", "client", "ctx", "deadline", "end", "flushed",
                 "machine", "peer", "reconnecting", "spliced", "started", "to_upstream_extra",
                 "upstream", "user", "watch")

    def __init__(self, ctx: SessionContext, client: Channel, peer: tuple[str, int]) -> None:
        self.ctx = ctx
        self.client = client
        self.peer = peer
        self.addr = peer[0]
        cfg = ctx.listener
        kind = ImapPreAuth if cfg.protocol == "imap" else Pop3PreAuth
        self.machine: PreAuth = kind(tls_mode=cfg.tls, tls_active=cfg.tls == "implicit",
                                     max_line=cfg.max_line,
                                     allow_plaintext_auth=cfg.allow_plaintext_auth,
                                     max_junk=cfg.max_junk_commands)
        self.upstream: Channel | None = None
        self.spliced: TransportSplice | zerocopy.KernelSplice | None = None
        self.user = ""
        self.end = "unknown"
        self.started = time.monotonic()
        self.deadline = 0.0                   # loop time by which the client must log in
        self.to_upstream_extra = 0
        self.flushed = [0, 0]
        self._idle_handle: asyncio.TimerHandle | None = None
        self.watch: ImapWatch | Pop3Watch | None = None
        self.reconnecting = ""            # why it ends at its next safe point

    # -- the whole session -----------------------------------------------------------------
    async def run(self, refuse: str | None = None) -> None:
        try:
            if refuse is not None:
                self.end = refuse
                self.client.write(self.machine.refuse(
                    "Too many failed logins, try again later." if refuse == "auth_refused"
                    else "Too many connections, try again later."))
                return
            self.client.write(self.machine.greeting())
            if await self._preauth():
                await self._spliced()
        except ChannelClosed:
            if self.upstream is None and self.end == "unknown":
                self.end = "client_closed"
        except Exception:
            self.end = "internal_error"
            log.exception("proxy session from %s failed", self.addr)
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        if self.spliced is not None:
            self.spliced.close()
        self._flush_bytes()
        cfg = self.ctx.listener
        up_in, down = self._counts()
        splice = ("-" if self.spliced is None else
                  "kernel" if isinstance(self.spliced, zerocopy.KernelSplice) else "transport")
        log.info("proxy session listener=%s client=%s user=%s upstream=%s duration=%.3f "
                 "bytes_to_upstream=%d bytes_to_client=%d splice=%s end=%s",
                 cfg.name, _fmt(f"{self.addr}:{self.peer[1]}"), _fmt(self.user or "-"),
                 self.ctx.upstream.name, time.monotonic() - self.started, up_in, down,
                 splice, self.end)

    def _flush_bytes(self) -> None:
        m = self.ctx.metrics
        if m is None:
            return
        up, down = self._counts()
        name = self.ctx.listener.name
        if up > self.flushed[0]:
            m.proxy_bytes.labels(name, "to_upstream").inc(up - self.flushed[0])
        if down > self.flushed[1]:
            m.proxy_bytes.labels(name, "to_client").inc(down - self.flushed[1])
        self.flushed = [up, down]

    def _counts(self) -> tuple[int, int]:
        if self.spliced is None:
            return 0, 0
        up, down = self.spliced.counts()
        return up + self.to_upstream_extra, down

    # -- before login ----------------------------------------------------------------------
    async def _preauth(self) -> bool:
        """Run the pre-auth conversation; True once logged in upstream and ready to splice."""
        cfg = self.ctx.listener
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + cfg.login_timeout
        while True:
            try:
                async with asyncio.timeout_at(self.deadline):
                    data = await self.client.read_some()
            except TimeoutError:
                self.client.write(self.machine.timed_out())
                self.end = "login_timeout"
                self._closed_because("login_deadline")
                return False
            events: deque[Event] = deque(self.machine.receive(data))
            while events:
                ev = events.popleft()
                if isinstance(ev, Send):
                    self.client.write(ev.data)
                elif isinstance(ev, Close):
                    self.end = ev.reason
                    if ev.reason not in ("logout", "refused"):    # refusals counted already
                        self._count_failure(ev.reason)
                    if ev.reason in ("junk", "not_protocol"):
                        self._closed_because(ev.reason)
                    return False
                elif isinstance(ev, StartTls):
                    if not await self._start_tls():
                        return False
                elif isinstance(ev, Login):
                    why = await self._login(ev)
                    if why is None:
                        return True
                    events.extend(self.machine.login_failed(why))

    async def _start_tls(self) -> bool:
        """Upgrade the client connection; False (one INFO line) when the handshake failed."""
        ctx = self.ctx.server_tls
        assert ctx is not None
        cfg = self.ctx.listener
        await self.client.drain()
        left = self.deadline - asyncio.get_running_loop().time()     # the login deadline
        timeout = max(0.001, min(cfg.tls_handshake_timeout, left))
        try:
            await self.client.start_tls(ctx, server_side=True, timeout=timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            stalled = isinstance(exc, TimeoutError) or "taking longer" in str(exc)
            self.end = "tls_timeout" if stalled else "tls_failed"
            self._closed_because(self.end)
            note_tls_failure(cfg.name, self.addr, exc, stalled=stalled,
                             metrics=self.ctx.metrics, timeout=timeout)
            return False
        self.machine.tls_started()
        return True

    def _closed_because(self, reason: str) -> None:
        if self.ctx.metrics is not None:
            self.ctx.metrics.sessions_closed.labels(self.ctx.listener.name, reason).inc()

    def _count_failure(self, reason: str) -> None:
        if self.ctx.metrics is not None:
            self.ctx.metrics.proxy_login_failures.labels(self.ctx.listener.name, reason).inc()

    async def _login(self, ev: Login) -> LoginFailure | None:
        ctx = self.ctx
        self.user = ev.user
        refusal = ctx.failures.refusal(self.addr, ev.user)
        if refusal == "network":
            self._count_failure("refused")
            self.end = "auth_refused"
            return "refused"
        if refusal == "account":                  # its password is not even checked
            self._count_failure("account_locked")
            return "account_locked"
        try:
            creds = await ctx.authenticator.login(ev.user, ev.password)
        except RelayError as exc:
            log.error("proxy login for %s on %s: %s", _fmt(ev.user), ctx.listener.name,
                      exc.explain())
            self._count_failure("config")
            return "unavailable"
        if creds is None:
            return await self._bad_credentials("bad_credentials", ev.user)
        try:
            result = await login_upstream(
                ctx.upstream, creds, transport=ctx.transport_for(ctx.upstream),
                token_for=ctx.token_for, tls_context=ctx.upstream_tls, metrics=ctx.metrics)
        except ProxyUpstreamError as exc:
            if exc.credentials and ctx.authenticator.passthrough:
                return await self._bad_credentials("upstream_refused", ev.user)
            log.warning("proxy login for %s on %s: %s", _fmt(ev.user), ctx.listener.name,
                        exc.explain())
            self._count_failure(exc.reason)
            return "unavailable"
        except TransportError as exc:
            log.warning("proxy login for %s on %s: %s", _fmt(ev.user), ctx.listener.name,
                        exc.explain())
            self._count_failure(exc.reason)
            return "unavailable"
        except OSError as exc:           # below the transport: usually out of descriptors
            log.error("proxy login for %s on %s: cannot open an upstream connection: %s\n"
                      "  hint: %s", _fmt(ev.user), ctx.listener.name, exc,
                      "relay may be out of file descriptors (each session needs two): raise "
                      "LimitNOFILE or lower max_connections" if exc.errno == errno.EMFILE
                      else "check the host's network and resources")
            self._count_failure("resources" if exc.errno == errno.EMFILE else "connect_failed")
            return "unavailable"
        except OAuthError as exc:
            log.warning("proxy login for %s on %s: token: %s", _fmt(ev.user),
                        ctx.listener.name, exc.explain())
            self._count_failure("token")
            return "unavailable"
        ctx.failures.success(self.addr, ev.user)
        self._logged_in_through(ctx)
        self.upstream = result.channel
        self.client.write(self.machine.login_succeeded(result.capability, result.untagged))
        leftover = self.machine.leftover()
        self.to_upstream_extra = len(leftover)
        # Nothing but bytes from here on: the kernel moves them when neither side has TLS.
        # Watched (to end at a safe point if a reload changes the way) unless "keep".
        if ctx.listener.on_upstream_change == "reconnect":
            self.watch = watch_for(ctx.listener.protocol)
        self.spliced = None
        if ctx.kernel_splice and zerocopy.available(self.client, result.channel):
            try:
                self.spliced = zerocopy.KernelSplice(self.client, result.channel,
                                                     to_upstream=leftover, watch=self.watch)
            except OSError as exc:                    # out of fds for the dup: stay in Python
                log.warning("kernel splice unavailable (%s); using the transport pump", exc)
        if self.spliced is None:
            self.spliced = TransportSplice(self.client, result.channel, to_upstream=leftover,
                                           watch=self.watch)
        if ctx.metrics is not None:
            path = "kernel" if isinstance(self.spliced, zerocopy.KernelSplice) else "transport"
            ctx.metrics.proxy_splices.labels(ctx.listener.name, path).inc()
        if self.reconnecting:                # the way changed while this one logged in
            self.reconnect(self.reconnecting)
        return None

    async def _bad_credentials(self, reason: str, user: str) -> LoginFailure:
        self._count_failure(reason)
        cfg = self.ctx.listener
        delay, refused = self.ctx.failures.failure(self.addr, user, listener=cfg.name,
                                                   protocol=cfg.protocol)
        if delay:
            await asyncio.sleep(delay)            # slow down guessing, as servers do
        if refused and self.ctx.failures.refusal(self.addr) == "network":
            self.end = "auth_refused"
            return "refused"
        return "credentials"

    # -- after login -----------------------------------------------------------------------
    async def _spliced(self) -> None:
        spliced = self.spliced
        assert spliced is not None
        self.end = "spliced"
        if isinstance(spliced, zerocopy.KernelSplice):
            self.upstream = None      # its socket is the splice's now: keep no dead channel
        self._idle_handle = asyncio.get_running_loop().call_later(self._period(), self._tick)
        how = await spliced.done            # a future of the splice itself: no extra task
        if self.end == "spliced":
            self.end = how
        await spliced.wait_closed(30)

    def _period(self) -> float:
        return min(self.ctx.listener.idle_timeout, 60.0)

    def _tick(self) -> None:
        """Every minute at most: count the bytes moved, and end an idle session.

        A method, not a closure: an idle session's memory is mostly what it keeps.
        """
        spliced = self.spliced
        assert spliced is not None
        self._flush_bytes()
        loop = asyncio.get_running_loop()
        if loop.time() - spliced.last_activity >= self.ctx.listener.idle_timeout:
            self.end = "idle_timeout"
            spliced.close()
            return
        self._idle_handle = loop.call_later(self._period(), self._tick)

    # -- after a reload that changed the way to the provider -----------------------------
    def _logged_in_through(self, ctx: SessionContext) -> None:
        """Keep the context this login used; if a reload swapped in another meanwhile (the
        listener does so for sessions not spliced yet) whose way differs, end at once."""
        newer, self.ctx = self.ctx, ctx
        if newer is not ctx and newer.path is not None and ctx.path is not None and \
                newer.path != ctx.path and newer.listener.on_upstream_change == "reconnect":
            self.reconnecting = ctx.path.changes(newer.path)

    def reconnect(self, why: str) -> bool:
        """End at the next safe point so the client reconnects the new way; False if this
        session cannot tell its safe points (it logged in under "keep", or uses COMPRESS).
        """
        self.reconnecting = why
        if self.spliced is None:
            return True                       # still logging in: once spliced
        watch = self.watch
        if watch is None or watch.opaque:
            return False
        watch.on_rest = self._at_rest
        watch.drain()
        return True

    def _at_rest(self) -> None:
        watch, spliced = self.watch, self.spliced
        assert watch is not None and spliced is not None
        self.end = "upstream_changed"
        to_client, to_upstream = watch.farewell(
            "relay: the way to the mail server changed; please reconnect")
        log.info("proxy session listener=%s client=%s user=%s: ending at a safe point "
                 "(%s changed on reload); the client reconnects the new way",
                 self.ctx.listener.name, _fmt(f"{self.addr}:{self.peer[1]}"),
                 _fmt(self.user or "-"), self.reconnecting)
        if self.ctx.metrics is not None:
            self.ctx.metrics.proxy_upstream_change.labels(self.ctx.listener.name,
                                                          "reconnected").inc()
        # Not from inside the watch's feed: the splice is in the middle of moving bytes.
        asyncio.get_running_loop().call_soon(spliced.end_with, "upstream_changed",
                                             to_client, to_upstream)

    def abort(self) -> None:
        """Drop both connections now (shutdown after the grace period)."""
        self.end = "shutdown"
        self.client.abort()
        if self.upstream is not None:
            self.upstream.abort()
        if self.spliced is not None:
            self.spliced.abort()
