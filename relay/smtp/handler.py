"""What the listener does with a finished DATA: refuse or check, stamp, accept, reply.

Also the per-config context that every session of a listener shares, the connection
counter behind the total and per-client limits, and the listener's ``Received:`` header.
Every refusal is counted in ``relay_messages_refused{listener,reason}`` and written to the
mail log as one ``rejected`` line (client, stage, reason, reply, sender, recipients; never
credentials).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import ssl
import time
from dataclasses import dataclass, field
from email.utils import formatdate

from relay.config.schema import ListenerConfig
from relay.connlimits import ConnectionCounter, Counter
from relay.envelope import Envelope
from relay.errors import SpoolError
from relay.maillog import MailLog
from relay.metrics import Metrics
from relay.smtp import replies
from relay.smtp.data import BareLineEnding, Event, TooBig
from relay.throttle import FailureThrottle
from relay.users import UserDB
from relay.verdict import AcceptFn, Checks, Refusal, SessionInfo, SizeLimit

log = logging.getLogger("relay.smtp")


@dataclass(slots=True)
class Context:
    """Everything a session needs, fixed for the session's lifetime (reload makes a new one)."""

    cfg: ListenerConfig
    hostname: str
    accept: AcceptFn
    maillog: MailLog
    tls_context: ssl.SSLContext | None = None
    users: UserDB | None = None
    checks: Checks | None = None
    metrics: Metrics | None = None
    throttle: FailureThrottle = field(
        default_factory=lambda: FailureThrottle(limit=5, window=300.0))
    connections: Counter = field(default_factory=ConnectionCounter)
    background: set[asyncio.Task[str]] = field(default_factory=set)
    size: SizeLimit | None = None         # effective size limit, once size_limit computed it

    @property
    def size_limit(self) -> SizeLimit:
        """The stricter of the listener's max_message_size and its checks' (profile's)."""
        if self.size is None:
            self.size = effective_size(self.cfg, self.checks)
        return self.size

    def too_big(self) -> Refusal:
        limit = self.size_limit
        return Refusal.from_reply(replies.too_big(limit.size, limit.by), "too_big")

    def refused(self, refusal: Refusal, *, info: SessionInfo | None, client: str, stage: str,
                sender: str | None = None, recipients: tuple[str, ...] = ()) -> str:
        """Count and log a refusal; return its reply line."""
        if self.metrics is not None:
            self.metrics.messages_refused.labels(self.cfg.name, refusal.reason).inc()
        self.maillog.rejected(
            client=f"{client}[{self.cfg.name}]", stage=stage, reason=refusal.reason,
            reply=refusal.reply, user=info.auth_user if info else None,
            **{"from": None if sender is None else f"<{sender}>"},
            to=",".join(f"<{r}>" for r in recipients) or None)
        return refusal.reply


def effective_size(cfg: ListenerConfig, checks: Checks | None) -> SizeLimit:
    """The listener's own limit, or its profile's when that is as strict or stricter."""
    own = SizeLimit(cfg.max_message_size, f"listener {cfg.name}")
    other = checks.size_limit() if checks is not None else None
    return other if other is not None and other.size <= own.size else own


# What may stand in a Received: clause as given: printable ASCII but space, the comment
# delimiters and the backslash (each other character becomes "?").
_UNCLEAN = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e]")


def _clean(text: str, limit: int = 255) -> str:
    return _UNCLEAN.sub("?", text[:limit]) or "unknown"


def received_header(*, info: SessionInfo, hostname: str, extended: bool,
                    tls_version: str | None, now: float) -> bytes:
    """The listener's trace header (RFC 5321 4.4, protocol names of RFC 3848)."""
    proto = "ESMTP" if extended else "SMTP"
    if info.tls:
        proto += "S"
    if info.auth_user:
        proto += "A"
    ip = f"IPv6:{info.client_ip}" if ":" in info.client_ip else info.client_ip
    tls = f"\r\n\t(using {_clean(tls_version, 32)})" if tls_version else ""
    return (f"Received: from {_clean(info.helo)} ([{ip}]){tls}\r\n"
            f"\tby {hostname} (relay) with {proto};\r\n"
            f"\t{_date(int(now))}\r\n").encode("ascii")


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    """RFC 5322 local date of a whole second (every message of that second shares it)."""
    return formatdate(second, localtime=True)


@dataclass(slots=True)
class Transaction:
    """One MAIL ... DATA transaction of a session."""

    sender: str
    smtputf8: bool
    body_8bitmime: bool
    recipients: list[str] = field(default_factory=list)


async def finish_message(ctx: Context, info: SessionInfo, txn: Transaction, event: Event, *,
                         extended: bool, tls_version: str | None) -> str:
    """Turn the end of DATA into the final reply; nothing is queued unless 250 is returned."""
    rcpts = tuple(txn.recipients)

    def refuse(r: Refusal) -> str:
        return ctx.refused(r, info=info, client=info.client_ip, stage="DATA",
                           sender=txn.sender, recipients=rcpts)

    if isinstance(event, TooBig):
        return refuse(ctx.too_big())
    if isinstance(event, BareLineEnding):
        log.warning("%s: bare <%s> in DATA from %s: refused (SMTP smuggling defence)",
                    ctx.cfg.name, event.kind, info.client_ip)
        return refuse(Refusal.from_reply(replies.BARE_LINE_ENDING, "smuggling"))
    if event.body[:1] in (b" ", b"\t"):
        # Whatever checks the listener runs: the Received: field relay puts on top would
        # absorb a leading continuation line (a protected X-Mailer: among them) into itself.
        return refuse(Refusal(550, "5.6.0", "line 1 is a continuation line; the header must "
                              "start with a field", reason="structure"))

    now = time.time()
    envelope = Envelope(
        sender=txn.sender, recipients=rcpts, received_at=now, client_ip=info.client_ip,
        client_helo=info.helo, listener=ctx.cfg.name, auth_user=info.auth_user,
        smtputf8=txn.smtputf8, body_8bitmime=txn.body_8bitmime, trusted=info.trusted)
    data = received_header(info=info, hostname=ctx.hostname, extended=extended,
                           tls_version=tls_version, now=now) + event.body
    try:
        if ctx.checks is not None:
            data = await ctx.checks.check_message(info, envelope, data)
        queue_id = await _accept_shielded(ctx, envelope, data)
    except Refusal as r:
        return refuse(r)
    except SpoolError as exc:
        log.error("%s: could not queue a message from %s: %s", ctx.cfg.name, info.client_ip,
                  exc.explain())
        if exc.disk_full:
            return refuse(Refusal.from_reply(replies.DISK_FULL, "spool_full"))
        return refuse(Refusal.from_reply(replies.LOCAL_ERROR, "spool_error"))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s: unexpected error accepting a message from %s", ctx.cfg.name,
                      info.client_ip)
        return refuse(Refusal.from_reply(replies.LOCAL_ERROR, "error"))
    if ctx.metrics is not None:
        ctx.metrics.messages_received.labels(ctx.cfg.name).inc()
    ctx.maillog.received(queue_id, client=f"{info.client_ip}[{ctx.cfg.name}]",
                         user=info.auth_user or None, **{"from": f"<{txn.sender}>"},
                         nrcpt=len(rcpts), size=len(data))
    return replies.queued(queue_id)


async def _accept_shielded(ctx: Context, envelope: Envelope, data: bytes) -> str:
    """Run accept so that a client hanging up mid-store cannot cut the store in half."""
    task = asyncio.ensure_future(ctx.accept(envelope, data))
    ctx.background.add(task)
    task.add_done_callback(ctx.background.discard)
    return await asyncio.shield(task)
