"""One delivery attempt of one message to one upstream; every recipient ends up with a verdict.

Per recipient: 2xx delivered; 5xx permanent (bounce); 4xx, transport, TLS, AUTH, timeout
or anything unknown transient (retry). 552 at RCPT is treated as 452 (RFC 5321
4.5.3.1.10). A DATA-phase reply applies to every recipient accepted at RCPT.

Sessions are pooled per upstream and identity (``relay.smtp_client.Credentials``): at
most ``max_connections`` at once, each reused for up to ``max_messages_per_connection``
messages, closed after ``idle_timeout`` seconds unused. A reused session gets an RSET
first when its last transaction was left unfinished or it sat idle for over
``probe_idle`` seconds (a liveness probe); if MAIL on a reused session finds it dead,
the message is tried once more on a fresh session instead of being deferred. After a
failure to set a session up, further attempts fail fast for ``suspend_for`` seconds
(like Postfix's dead-host cache): per upstream, or per identity for AUTH. Stage
times of session set-up (connect, tls, greeting, auth) count toward the message that
opened the session only; later messages on it record envelope (RSET, MAIL, RCPT) and data.

Rate limits of an upstream's profile (messages per minute, bytes per 5 minutes,
recipients per day, per mailbox: the provider username, else the envelope sender) only
delay: the scheduler asks ``pace()`` before an attempt and waits instead of trying.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from relay.config.schema import AccountConfig, Config, ProfileConfig, UpstreamConfig
from relay.errors import DeliveryError, RelayError, TransportError
from relay.metrics import Metrics
from relay.outbound.outbox import write_outbox
from relay.outbound.pacing import RateLimiter
from relay.outbound.pool import SessionPool
from relay.outbound.session import (
    Credentials,
    SessionError,
    SmtpSession,
    TokenFor,
    has_bare_cr_or_lf,
)
from relay.spool.records import QueuedMessage
from relay.timing import StageTimer
from relay.transports.base import Transport

log = logging.getLogger("relay.delivery")


@dataclass(frozen=True, slots=True)
class RcptResult:
    """The verdict for one recipient of one attempt."""

    code: int            # SMTP reply code; 0 when no provider reply (network, TLS, local)
    reply: str           # provider's reply text "550 5.1.1 ..." or a local explanation
    permanent: bool      # True: bounce; False and not ok: retry
    reason: str = ""     # bounded label for metrics ("" for provider replies)
    remote: str = ""     # provider host that answered

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def reply_class(self) -> str:
        return f"{self.code // 100}xx" if self.code else (self.reason or "local")


_Identity = tuple[str, str, str] | None     # Credentials.key; None: the whole upstream


def _transient(reply: str, reason: str) -> RcptResult:
    return RcptResult(0, reply, False, reason)


class Deliverer:
    """Delivers messages to named upstreams (SMTP sessions or the outbox folder)."""

    def __init__(self, *, upstreams: Sequence[UpstreamConfig],
                 transport_for: Callable[[UpstreamConfig], Transport],
                 hostname: str, accounts: Sequence[AccountConfig] = (),
                 token_for: TokenFor | None = None, slow_threshold: float = 10.0,
                 metrics: Metrics | None = None, fsync: bool = True,
                 idle_timeout: float = 30.0, probe_idle: float = 1.0,
                 profiles: Mapping[str, ProfileConfig] | None = None,
                 suspend_for: float = 30.0) -> None:
        self._upstreams = {u.name: u for u in upstreams}
        self._accounts = tuple(accounts)
        self._transport_for = transport_for
        self._token_for = token_for
        self._hostname = hostname
        self._slow = slow_threshold
        self._metrics = metrics
        self._fsync = fsync
        self._probe_idle = probe_idle      # RSET a session idle longer than this before reuse
        self._pools = {u.name: SessionPool(u, idle_timeout) for u in upstreams}
        # upstream name -> its profile's rate limiter (profiles: upstream name -> profile)
        self._limiters = {name: RateLimiter(p) for name, p in (profiles or {}).items()
                          if name in self._upstreams}
        self._tidied = time.monotonic()
        # After a session set-up failure, attempts fail fast for ``suspend_for`` seconds:
        # per upstream (connect, TLS, greeting) or per identity (AUTH, token), so a queue
        # of mail neither hammers a provider that is down nor locks a mailbox out.
        self._suspend_for = suspend_for
        self._suspended: dict[tuple[str, _Identity], tuple[float, str, str]] = {}

    @classmethod
    def from_config(cls, config: Config, *,
                    transport_for: Callable[[UpstreamConfig], Transport],
                    token_for: Callable[[str], Awaitable[str]] | None = None,
                    metrics: Metrics | None = None) -> Deliverer:
        """The deliverer for a whole config (SMTP and outbox upstreams)."""
        by_name = {p.name: p for p in config.profiles}
        ups = [u for u in config.upstreams if u.protocol in ("smtp", "outbox")]
        return cls(upstreams=ups, accounts=config.accounts, transport_for=transport_for,
                   token_for=token_for, hostname=config.relay.hostname,
                   slow_threshold=config.relay.slow_delivery_threshold, metrics=metrics,
                   fsync=config.relay.fsync,
                   # never hold a recovered upstream back longer than the retry cadence
                   suspend_for=min(30.0, config.relay.retry.first),
                   profiles={u.name: by_name[u.profile] for u in ups
                             if u.profile is not None and u.profile in by_name})

    async def close(self) -> None:
        """QUIT every idle session; sessions still in use are QUIT when their attempt ends
        (after a reload the old deliverer is closed while its last attempts finish)."""
        await asyncio.gather(*(pool.close() for pool in self._pools.values()))

    def concurrency(self, upstream: str) -> int:
        """How many attempts may run at once toward ``upstream`` (the scheduler's cap)."""
        up = self._upstreams.get(upstream)
        return max(1, up.max_connections) if up else 1

    def _suspension(self, upstream: str, identity: _Identity) -> tuple[str, str] | None:
        now = time.monotonic()
        for key in ((upstream, None), (upstream, identity)):
            entry = self._suspended.get(key)
            if entry is not None:
                if entry[0] > now:
                    return entry[1], entry[2]
                del self._suspended[key]
        return None

    def mailbox(self, up: UpstreamConfig, msg: QueuedMessage) -> str:
        """Whose sending a provider meters: the mailbox relay logs in as, else the sender."""
        creds = self.credentials_for(up, msg.envelope.sender, msg.envelope.auth_user)
        return (creds.username or msg.envelope.sender).lower()

    def pace(self, upstream: str, msg: QueuedMessage, recipients: int) -> float:
        """Seconds until the upstream's rate limits let this message go (0: now)."""
        limiter, up = self._limiters.get(upstream), self._upstreams.get(upstream)
        if limiter is None or up is None:
            return 0.0
        if time.monotonic() - self._tidied > 300:
            self._tidied = time.monotonic()
            for lim in self._limiters.values():
                lim.forget_idle()
        return limiter.delay(self.mailbox(up, msg), recipients=recipients, size=msg.size)

    def credentials_for(self, up: UpstreamConfig, sender: str, auth_user: str) -> Credentials:
        """Auth translation: an [[account]] for this sender (first) or relay user, else the
        upstream's own credentials."""
        mine = [a for a in self._accounts if a.upstream == up.name]
        match = next((a for a in mine if a.sender and a.sender.lower() == sender.lower()), None)
        if match is None and auth_user:
            match = next((a for a in mine if a.user and a.user == auth_user), None)
        username = match.username if match else up.username
        password = match.password if match and match.password else up.password
        token = match.token_source if match and match.token_source else up.token_source
        if up.auth == "xoauth2":
            return Credentials("xoauth2", username, None, token)
        if up.auth == "password":
            return Credentials("password", username, password, None)
        return Credentials("none")

    async def deliver(self, upstream: str, msg: QueuedMessage, data: bytes,
                      recipients: list[str]) -> dict[str, RcptResult]:
        """One attempt to ``upstream`` for ``recipients``; a verdict for each of them.

        Nothing before the rate limiter records this message awaits, so ``pace()``
        returning 0 followed at once by ``deliver()`` reserves the window atomically.
        """
        up = self._upstreams.get(upstream)
        if up is None:
            return {r: _transient(f"upstream {upstream!r} is not configured (or not SMTP)",
                                  "unknown_upstream") for r in recipients}
        if has_bare_cr_or_lf(data):
            res = RcptResult(554, "554 5.6.0 message contains a bare CR or LF; relay refuses "
                                  "to send it (it could smuggle headers or messages)", True,
                             "bare_cr_lf")
            return dict.fromkeys(recipients, res)
        limiter = self._limiters.get(upstream)
        if limiter is not None:        # the scheduler paced; this only waits after a race
            await limiter.acquire(self.mailbox(up, msg), recipients=len(recipients),
                                  size=len(data))
        if up.protocol == "outbox":
            return await self._outbox(up, msg, data, recipients)
        timer = StageTimer()
        try:
            return await self._smtp(up, msg, data, recipients, timer)
        finally:
            self._account_time(up.name, msg.queue_id, timer)

    def _account_time(self, upstream: str, queue_id: str, timer: StageTimer) -> None:
        """Stage histograms, the whole-attempt histogram, and the slow-delivery counter/log."""
        if not timer.stages:
            return
        if self._metrics is not None:
            for stage, seconds in timer.stages.items():
                self._metrics.delivery_stage_seconds.labels(upstream, stage).observe(seconds)
            self._metrics.delivery_seconds.labels(upstream).observe(timer.total)
        if timer.total > self._slow:
            stage, _ = timer.longest()
            if self._metrics is not None:
                self._metrics.slow_deliveries.labels(upstream, stage).inc()
            log.warning("%s: %s (%s)", queue_id, timer.describe(upstream), timer.summary())
        else:
            log.debug("%s: delivery to %s: %s", queue_id, upstream, timer.summary())

    async def _outbox(self, up: UpstreamConfig, msg: QueuedMessage, data: bytes,
                      recipients: list[str]) -> dict[str, RcptResult]:
        if up.path is None:
            return {r: _transient("outbox upstream has no path", "outbox_write")
                    for r in recipients}
        try:
            path = await write_outbox(up.path, queue_id=msg.queue_id,
                                      sender=msg.envelope.sender, recipients=recipients,
                                      all_recipients=msg.envelope.recipients, data=data,
                                      fsync=self._fsync)
        except DeliveryError as exc:
            log.error("%s: %s (hint: %s)", msg.queue_id, exc, exc.hint)
            return {r: _transient(str(exc), exc.reason) for r in recipients}
        return dict.fromkeys(recipients, RcptResult(250, f"250 2.0.0 Ok: written to {path}",
                                                    False))

    async def _smtp(self, up: UpstreamConfig, msg: QueuedMessage, data: bytes,
                    recipients: list[str], timer: StageTimer) -> dict[str, RcptResult]:
        pool = self._pools[up.name]
        creds = self.credentials_for(up, msg.envelope.sender, msg.envelope.auth_user)
        results: dict[str, RcptResult] = {}
        suspended = self._suspension(up.name, creds.key)
        if suspended is not None:
            reply, reason = suspended
            return {r: _transient(f"delivery temporarily suspended: {reply}", reason)
                    for r in recipients}
        async with pool.sem:
            session: SmtpSession | None = None
            try:
                session = await self._session(pool, up, creds, timer)
                try:
                    return await self._transaction(session, msg, data, recipients, timer,
                                                   results)
                except SessionError as exc:
                    if exc.stage != "mail" or session.messages <= 1:
                        raise
                    # The reused session was dead before MAIL: once more on a fresh one.
                    stale, session = session, None
                    pool.put(stale)
                    session = await self._session(pool, up, creds, timer)
                    return await self._transaction(session, msg, data, recipients, timer,
                                                   results)
            except (SessionError, TransportError) as exc:
                reason = exc.reason
                if self._metrics is not None:
                    self._metrics.upstream_failures.labels(up.name, reason).inc()
                log.warning("%s: %s: %s (hint: %s)", msg.queue_id, up.name, exc, exc.hint)
                reply = exc.reply if isinstance(exc, SessionError) and exc.reply else str(exc)
                if session is not None:
                    session.close()
                # Refusals received before the session died stand; the rest are transient.
                return {r: results.get(r) or _transient(reply, reason) for r in recipients}
            except RelayError as exc:
                log.warning("%s: %s: %s (hint: %s)", msg.queue_id, up.name, exc, exc.hint)
                if session is not None:
                    session.close()
                return {r: _transient(str(exc), "error") for r in recipients}
            except asyncio.CancelledError:     # stop() after its grace: never reuse mid-way
                if session is not None:
                    session.close()
                raise
            except Exception as exc:   # unknown means transient, and never kills the scheduler
                log.exception("%s: unexpected error delivering to %s", msg.queue_id, up.name)
                if session is not None:
                    session.close()
                return {r: _transient(f"internal error: {exc!r}", "internal")
                        for r in recipients}
            finally:
                if session is not None:
                    pool.put(session)

    async def _session(self, pool: SessionPool, up: UpstreamConfig, creds: Credentials,
                       timer: StageTimer) -> SmtpSession:
        loop = asyncio.get_running_loop()
        while (session := pool.take(creds.key)) is not None:
            if not session.dirty and loop.time() - session.idle_since < self._probe_idle:
                return session
            try:
                with timer.stage("envelope"):
                    alive = await session.rset()
            except BaseException:
                session.close()
                pool.discard(session)
                raise
            if alive:
                session.dirty = False
                return session
            pool.discard(session)
        await pool.make_room()
        try:
            session = await SmtpSession.open(up, transport=self._transport_for(up),
                                             helo_name=up.helo_name or self._hostname,
                                             credentials=creds, timer=timer,
                                             token_for=self._token_for, log=log)
        except (SessionError, TransportError) as exc:
            if self._suspend_for > 0:
                scope = creds.key if isinstance(exc, SessionError) and exc.stage == "auth" \
                    else None
                reply = exc.reply if isinstance(exc, SessionError) and exc.reply else str(exc)
                self._suspended[(up.name, scope)] = (
                    time.monotonic() + self._suspend_for, reply, exc.reason)
            raise
        self._suspended.pop((up.name, None), None)
        self._suspended.pop((up.name, creds.key), None)
        pool.opened += 1
        pool.alive += 1
        return session

    async def _transaction(self, session: SmtpSession, msg: QueuedMessage, data: bytes,
                           recipients: list[str], timer: StageTimer,
                           results: dict[str, RcptResult]) -> dict[str, RcptResult]:
        """MAIL, RCPT, DATA; ``results`` fills as replies arrive (kept if the session dies)."""
        env, remote = msg.envelope, session.upstream.host
        session.messages += 1
        if env.smtputf8 and not session.supports("smtputf8"):
            res = RcptResult(553, "553 5.6.7 the provider does not support SMTPUTF8, which "
                                  "this message's addresses need", True, "smtputf8", remote)
            return dict.fromkeys(recipients, res)
        options: list[bytes] = []
        if session.supports("size"):
            limit = _int(session.extension("size"))
            if limit and len(data) > limit:
                res = RcptResult(552, f"552 5.3.4 message size {len(data)} exceeds the "
                                      f"provider's limit {limit}", True, "size", remote)
                return dict.fromkeys(recipients, res)
            options.append(f"SIZE={len(data)}".encode())
        if env.body_8bitmime and session.supports("8bitmime"):
            options.append(b"BODY=8BITMIME")
        if env.smtputf8:
            options.append(b"SMTPUTF8")
        session.dirty = True
        try:
            with timer.stage("envelope"):
                mail = await session.command(b"MAIL", b"FROM:<" + env.sender.encode() + b">",
                                             *options)
                if not 200 <= mail.code < 300:
                    verdict = _verdict(mail.code, mail.text, remote, stage="mail")
                    return dict.fromkeys(recipients, verdict)
                accepted: list[str] = []
                for rcpt in recipients:
                    reply = await session.command(b"RCPT", b"TO:<" + rcpt.encode() + b">")
                    if 200 <= reply.code < 300:
                        accepted.append(rcpt)
                    else:
                        results[rcpt] = _verdict(reply.code, reply.text, remote, stage="rcpt")
                    if reply.code == 421:
                        break
            if not accepted or session.broken:
                for rcpt in recipients:     # not refused, yet not sent: try again later
                    results.setdefault(rcpt, _transient("provider closed the session (421)",
                                                        "disconnected"))
                return results
            with timer.stage("data"):
                final = await session.data(data, checked=True)   # deliver() did
        except ValueError as exc:      # control characters in an address: cannot be sent
            session.close()
            res = RcptResult(501, f"501 5.1.3 cannot send this address: {exc}", True,
                             "bad_address")
            return {r: results.get(r, res) for r in recipients}
        session.dirty = not 200 <= final.code < 300    # a refused DATA: RSET to be sure
        verdict = _verdict(final.code, final.text, remote, stage="data")
        for rcpt in accepted:
            results[rcpt] = verdict
        return results


def _int(text: str) -> int:
    try:
        return int(text.split()[0]) if text.strip() else 0
    except ValueError:
        return 0


def _verdict(code: int, text: str, remote: str, *, stage: str) -> RcptResult:
    """Classify one provider reply (RFC 5321 4.2.1; unknown means transient)."""
    if 200 <= code < 300:
        return RcptResult(code, text, False, "", remote)
    if stage == "rcpt" and code == 552:      # too many recipients: really a 452
        return RcptResult(code, text, False, "", remote)
    permanent = 500 <= code < 600
    return RcptResult(code, text, permanent, "", remote)


