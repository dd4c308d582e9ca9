"""The SMTP courier: pooled sessions to one upstream, MAIL/RCPT/DATA, provider replies judged.

Sessions are pooled per identity (``relay.outbound.session.Credentials``): at most
``max_connections`` at once, each reused for up to ``max_messages_per_connection``
messages, closed after ``idle_timeout`` seconds unused. A reused session gets an RSET
first when its last transaction was left unfinished or it sat idle for over
``probe_idle`` seconds (a liveness probe); if MAIL on a reused session finds it dead,
the message is tried once more on a fresh session instead of being deferred. After a
failure to set a session up, further attempts fail fast for ``suspend_for`` seconds
(like Postfix's dead-host cache): for the whole upstream, or per identity for AUTH.
The scheduler asks ``suspended`` and waits for the window's end without an attempt; mail
that reaches the courier inside it anyway gets reason ``suspended`` and is not counted.

Per recipient: 2xx delivered; 5xx permanent; 4xx, transport, TLS, AUTH, timeout or
anything unknown transient. 552 at RCPT is treated as 452 (RFC 5321 4.5.3.1.10). A
DATA-phase reply applies to every recipient accepted at RCPT.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from relay.config.schema import UpstreamConfig
from relay.errors import RelayError, TransportError
from relay.metrics import Metrics
from relay.outbound.courier import RcptResult, transient
from relay.outbound.pool import SessionPool
from relay.outbound.session import Credentials, SessionError, SmtpSession
from relay.outbound.session_setup import TokenFor, open_session
from relay.outbound.wire import Reply, command_line
from relay.spool.records import QueuedMessage
from relay.timing import StageTimer
from relay.transports.base import Transport

log = logging.getLogger("relay.delivery")

_Identity = tuple[str, str, str] | None     # Credentials.key; None: the whole upstream
SUSPENDED = "suspended"     # RcptResult.reason of mail held back by the window: not tried


class SmtpCourier:
    """Delivers to one SMTP upstream."""

    def __init__(self, upstream: UpstreamConfig, *, transport: Transport, hostname: str,
                 token_for: TokenFor | None = None, metrics: Metrics | None = None,
                 idle_timeout: float = 30.0, probe_idle: float = 1.0,
                 suspend_for: float = 30.0) -> None:
        self.upstream = upstream
        self._transport = transport
        self._hostname = hostname
        self._token_for = token_for
        self._metrics = metrics
        self._probe_idle = probe_idle      # RSET a session idle longer than this before reuse
        self._pool = SessionPool(upstream, idle_timeout)
        # After a session set-up failure, attempts fail fast for ``suspend_for`` seconds:
        # per upstream (connect, TLS, greeting) or per identity (AUTH, token), so a queue
        # of mail neither hammers a provider that is down nor locks a mailbox out.
        self._suspend_for = suspend_for
        self._suspended: dict[_Identity, tuple[float, str, str]] = {}

    async def close(self) -> None:
        await self._pool.close()

    def _suspension(self, identity: _Identity) -> tuple[float, str, str] | None:
        now = time.monotonic()
        found: tuple[float, str, str] | None = None
        for key in (None, identity):
            entry = self._suspended.get(key)
            if entry is not None:
                if entry[0] <= now:
                    del self._suspended[key]
                elif found is None or entry[0] > found[0]:
                    found = entry
        return found

    def suspended(self, identity: tuple[str, str, str]) -> tuple[float, str] | None:
        """(seconds left, reply) while the fail-fast window holds ``identity`` back."""
        found = self._suspension(identity)
        return None if found is None else (found[0] - time.monotonic(), found[1])

    def clear_suspension(self) -> None:
        """Try at once again (an operator's retry, a reload that changed the upstream)."""
        self._suspended.clear()

    async def carry(self, msg: QueuedMessage, data: bytes, recipients: list[str], *,
                    credentials: Credentials, timer: StageTimer,
                    handed: Callable[[], None]) -> dict[str, RcptResult]:
        up, pool, creds = self.upstream, self._pool, credentials
        results: dict[str, RcptResult] = {}
        suspended = self._suspension(creds.key)
        if suspended is not None:       # the scheduler waits instead; this is only a race
            return {r: transient(f"delivery temporarily suspended: {suspended[1]}",
                                 SUSPENDED) for r in recipients}
        async with pool.sem:
            session: SmtpSession | None = None
            try:
                session = await self._session(pool, up, creds, timer)
                try:
                    return await self._transaction(session, msg, data, recipients, timer,
                                                   results, handed)
                except SessionError as exc:
                    if exc.stage != "mail" or session.messages <= 1:
                        raise
                    # The reused session was dead before MAIL: once more on a fresh one.
                    stale, session = session, None
                    pool.put(stale)
                    session = await self._session(pool, up, creds, timer)
                    return await self._transaction(session, msg, data, recipients, timer,
                                                   results, handed)
            except (SessionError, TransportError) as exc:
                reason = exc.reason
                if self._metrics is not None:
                    self._metrics.upstream_failures.labels(up.name, reason).inc()
                    if isinstance(exc, SessionError) and exc.unknown:
                        self._metrics.delivery_outcome_unknown.labels(up.name).inc()
                log.warning("%s: %s: %s (hint: %s)", msg.queue_id, up.name, exc, exc.hint)
                reply = exc.reply if isinstance(exc, SessionError) and exc.reply else str(exc)
                if session is not None:
                    session.close()
                # Refusals received before the session died stand; the rest are transient.
                return {r: results.get(r) or transient(reply, reason) for r in recipients}
            except RelayError as exc:
                log.warning("%s: %s: %s (hint: %s)", msg.queue_id, up.name, exc, exc.hint)
                if session is not None:
                    session.close()
                return {r: transient(str(exc), "error") for r in recipients}
            except asyncio.CancelledError:     # stop() after its grace: never reuse mid-way
                if session is not None:
                    session.close()
                raise
            except Exception as exc:   # unknown means transient, and never kills the scheduler
                log.exception("%s: unexpected error delivering to %s", msg.queue_id, up.name)
                if session is not None:
                    session.close()
                return {r: transient(f"internal error: {exc!r}", "internal")
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
            session = await open_session(up, transport=self._transport,
                                         helo_name=up.helo_name or self._hostname,
                                         credentials=creds, timer=timer,
                                         token_for=self._token_for, log=log)
        except (SessionError, TransportError) as exc:
            if self._suspend_for > 0:
                scope = creds.key if isinstance(exc, SessionError) and exc.stage == "auth" \
                    else None
                reply = exc.reply if isinstance(exc, SessionError) and exc.reply else str(exc)
                self._suspended[scope] = (
                    time.monotonic() + self._suspend_for, reply, exc.reason)
            raise
        self._suspended.pop(None, None)
        self._suspended.pop(creds.key, None)
        pool.opened += 1
        pool.alive += 1
        return session

    async def _transaction(self, session: SmtpSession, msg: QueuedMessage, data: bytes,
                           recipients: list[str], timer: StageTimer,
                           results: dict[str, RcptResult],
                           handed: Callable[[], None]) -> dict[str, RcptResult]:
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
            mail_line = command_line(b"MAIL", b"FROM:<" + env.sender.encode() + b">", *options)
            rcpt_lines = [command_line(b"RCPT", b"TO:<" + r.encode() + b">")
                          for r in recipients]
            with timer.stage("envelope"):
                mail, replies, pending = await _envelope(session, mail_line, rcpt_lines)
            if not 200 <= mail.code < 300:
                if pending:
                    await _no_data(session)
                verdict = _verdict(mail.code, mail.text, remote, stage="mail")
                return dict.fromkeys(recipients, verdict)
            accepted: list[str] = []
            for rcpt, reply in zip(recipients, replies, strict=False):
                if 200 <= reply.code < 300:
                    accepted.append(rcpt)
                else:
                    results[rcpt] = _verdict(reply.code, reply.text, remote, stage="rcpt")
            if not accepted or session.broken:
                if pending and not session.broken:
                    await _no_data(session)
                for rcpt in recipients:     # not refused, yet not sent: try again later
                    results.setdefault(rcpt, transient("provider closed the session (421)",
                                                        "disconnected"))
                return results
            with timer.stage("data"):
                start = await session.reply("data") if pending else None
                final = await session.data(data, checked=True,   # from the spool: CRLF
                                           before_send=handed, start=start)
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

async def _envelope(session: SmtpSession, mail: bytes, rcpts: list[bytes]
                    ) -> tuple[Reply, list[Reply], bool]:
    """MAIL's reply, the RCPT replies received, and whether DATA was sent (its reply is
    then read by the caller, in the data stage).

    With PIPELINING (RFC 2920) MAIL, every RCPT and DATA go out in one write and every
    reply is read, in order, whatever it says; otherwise one command at a time, stopping
    at a refused MAIL. Either way a 421 ends the reading: the provider closes.
    """
    if session.pipelining:
        session.send(mail, *rcpts, b"DATA\r\n")
        first = await session.reply("mail")
        replies: list[Reply] = []
        for _ in rcpts:
            if session.broken:
                return first, replies, False
            replies.append(await session.reply("rcpt"))
        return first, replies, not session.broken
    session.send(mail)
    first = await session.reply("mail")
    if not 200 <= first.code < 300:
        return first, [], False
    replies = []
    for line in rcpts:
        session.send(line)
        replies.append(reply := await session.reply("rcpt"))
        if reply.code == 421:
            break
    return first, replies, False


async def _no_data(session: SmtpSession) -> None:
    """Read the reply to a pipelined DATA that is not to carry a message (MAIL or every
    RCPT refused); should the provider say 354 anyway, end it with a lone "."."""
    start = await session.reply("data")
    if start.code == 354:
        await session.abandon_data()


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


