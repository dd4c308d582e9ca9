"""One delivery attempt: who relay is toward the provider, pacing, the courier, stage timing.

The deliverer picks the identity (auth translation: an ``[[account]]`` for the sender or
relay user, else the upstream's own credentials), hands the message to the upstream's
courier (``relay.outbound.courier``) and records how long each stage took. It also
answers the scheduler's pacing questions for one config: whose sending a provider
meters (``mailbox_of``: the account, else the sender), which quotas apply
(``claims``: profile rate limits and ``[[upstream.quota]]``), how many connections one
mailbox may hold, and whether the upstream's fail-fast window after a connection failure
is running (``suspension``). Quotas only delay: the scheduler reserves them before an
attempt. Stage times of session set-up (connect, tls, greeting, auth) count toward the
message that opened the session only; later messages on it record envelope (RSET, MAIL,
RCPT, pipelined in one write when the provider offers PIPELINING) and data. When a
courier passes its point of no return, the deliverer writes the handover in the spool's
journal (``relay.spool.handovers``; the runtime owns it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from relay.config.schema import AccountConfig, Config, ProfileConfig, UpstreamConfig
from relay.metrics import Metrics
from relay.outbound.courier import Courier, RcptResult, transient
from relay.outbound.outbox import OutboxCourier
from relay.outbound.pacing import Claim, Cost, Limit, limits_for
from relay.outbound.session import Credentials
from relay.outbound.session_setup import TokenFor
from relay.outbound.smtp_courier import SmtpCourier
from relay.spool.handovers import Handovers
from relay.spool.records import QueuedMessage
from relay.timing import StageTimer
from relay.transports.base import Transport

log = logging.getLogger("relay.delivery")
CREDENTIALS_MEMO = 4096          # (upstream, sender, user) answers kept


def _unjournaled() -> None:
    """``handed`` for a deliverer without a journal (tests, tools): nothing to write."""


class Deliverer:
    """Delivers messages to named upstreams (SMTP sessions or the outbox folder)."""

    def __init__(self, *, upstreams: Sequence[UpstreamConfig],
                 transport_for: Callable[[UpstreamConfig], Transport],
                 hostname: str, accounts: Sequence[AccountConfig] = (),
                 token_for: TokenFor | None = None, slow_threshold: float = 10.0,
                 metrics: Metrics | None = None, fsync: bool = True,
                 idle_timeout: float = 30.0, probe_idle: float = 1.0,
                 profiles: Mapping[str, ProfileConfig] | None = None,
                 suspend_for: float = 30.0, replicas: int = 1,
                 priorities: Mapping[str, int] | None = None,
                 handovers: Handovers | None = None) -> None:
        self._upstreams = {u.name: u for u in upstreams}
        self._handovers = handovers
        self._accounts = tuple(accounts)
        # Asked several times an attempt (mailbox, suspension, delivery); both inputs are
        # fixed for this Deliverer's life (a reload builds a new one).
        self._creds: dict[tuple[str, str, str], Credentials] = {}
        self._slow = slow_threshold
        self._metrics = metrics
        self._couriers: dict[str, Courier] = {}
        for up in upstreams:
            if up.protocol == "outbox":
                self._couriers[up.name] = OutboxCourier(up, fsync=fsync)
            else:
                self._couriers[up.name] = SmtpCourier(
                    up, transport=transport_for(up), hostname=hostname, token_for=token_for,
                    metrics=metrics, idle_timeout=idle_timeout, probe_idle=probe_idle,
                    suspend_for=suspend_for)
        # upstream name -> (mailbox limits, upstream limits): profile rates and overrides
        profiles = profiles or {}
        self._limits: dict[str, tuple[tuple[Limit, ...], tuple[Limit, ...]]] = {}
        self._per_mailbox: dict[str, int] = {}
        for up in upstreams:
            found = limits_for(up, profiles.get(up.name))
            self._limits[up.name] = (tuple(x for x in found if x.scope == "mailbox"),
                                     tuple(x for x in found if x.scope == "upstream"))
            cap = up.connections_per_mailbox
            if cap is None and up.name in profiles:
                cap = profiles[up.name].connections_per_mailbox
            if cap is not None:      # several replicas: each holds its share of the cap
                self._per_mailbox[up.name] = max(1, cap // max(1, replicas))
        self._priorities = dict(priorities or {})

    @classmethod
    def from_config(cls, config: Config, *,
                    transport_for: Callable[[UpstreamConfig], Transport],
                    token_for: Callable[[str], Awaitable[str]] | None = None,
                    metrics: Metrics | None = None,
                    handovers: Handovers | None = None) -> Deliverer:
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
                             if u.profile is not None and u.profile in by_name},
                   replicas=config.pacing.replicas if config.pacing.backend == "redis" else 1,
                   priorities={x.name: x.priority for x in config.listeners},
                   handovers=handovers)

    async def close(self) -> None:
        """QUIT every idle session; sessions still in use are QUIT when their attempt ends
        (after a reload the old deliverer is closed while its last attempts finish)."""
        await asyncio.gather(*(c.close() for c in self._couriers.values()))

    def upstream_names(self) -> list[str]:
        return list(self._upstreams)

    def concurrency(self, upstream: str) -> int:
        """How many attempts may run at once toward ``upstream`` (the scheduler's cap)."""
        up = self._upstreams.get(upstream)
        return max(1, up.max_connections) if up else 1

    def mailbox(self, up: UpstreamConfig, msg: QueuedMessage) -> str:
        """Whose sending a provider meters: the mailbox relay logs in as, else the sender
        (``mailbox = "sender"``: always the sender, for one account sending as many)."""
        if up.mailbox == "sender":
            return msg.envelope.sender.lower()
        creds = self.credentials_for(up, msg.envelope.sender, msg.envelope.auth_user)
        return (creds.username or msg.envelope.sender).lower()

    def mailbox_of(self, upstream: str, msg: QueuedMessage) -> str:
        up = self._upstreams.get(upstream)
        return self.mailbox(up, msg) if up is not None else msg.envelope.sender.lower()

    def claims(self, upstream: str, msg: QueuedMessage, recipients: int) -> list[Claim]:
        """What sending ``msg`` to ``recipients`` of it via ``upstream`` uses of its quotas."""
        mailbox_limits, upstream_limits = self._limits.get(upstream, ((), ()))
        cost = Cost(1, recipients, msg.size)
        out = []
        if mailbox_limits:
            out.append(Claim(f"{upstream}/{self.mailbox_of(upstream, msg)}", mailbox_limits,
                             cost))
        if upstream_limits:
            out.append(Claim(upstream, upstream_limits, cost))
        return out

    def connections_per_mailbox(self, upstream: str) -> int | None:
        """How many attempts one mailbox may have in flight to ``upstream`` (None: any)."""
        return self._per_mailbox.get(upstream)

    def priority(self, listener: str) -> int:
        """The ``priority`` of the listener a message came in on (0 by default)."""
        return self._priorities.get(listener, 0)

    def suspension(self, upstream: str, msg: QueuedMessage) -> tuple[float, str] | None:
        """(seconds left, reply) while the upstream's fail-fast window after a failure to
        connect or log in holds this message's identity back; None otherwise."""
        courier, up = self._couriers.get(upstream), self._upstreams.get(upstream)
        if not isinstance(courier, SmtpCourier) or up is None:
            return None
        creds = self.credentials_for(up, msg.envelope.sender, msg.envelope.auth_user)
        return courier.suspended(creds.key)

    def clear_suspension(self, upstream: str) -> None:
        """End the fail-fast window (an operator's retry, a changed upstream)."""
        courier = self._couriers.get(upstream)
        if isinstance(courier, SmtpCourier):
            courier.clear_suspension()

    def credentials_for(self, up: UpstreamConfig, sender: str, auth_user: str) -> Credentials:
        """Auth translation: an [[account]] for this sender (first) or relay user, else the
        upstream's own credentials."""
        if self._upstreams.get(up.name) is not up:
            return self._credentials(up, sender, auth_user)      # not one of ours: not kept
        key = (up.name, sender.lower(), auth_user)
        creds = self._creds.get(key)
        if creds is None:
            creds = self._credentials(up, sender, auth_user)
            if len(self._creds) >= CREDENTIALS_MEMO:
                self._creds.clear()
            self._creds[key] = creds
        return creds

    def _credentials(self, up: UpstreamConfig, sender: str, auth_user: str) -> Credentials:
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
        The scheduler has reserved the quotas (``claims``) before calling this.

        ``data`` is the message as the spool holds it, so it is not scanned for a bare CR
        or LF here (~175 µs per 100 KB, every attempt): the spool holds only CRLF line
        endings, an invariant ``Spool.store``, its only entrance, enforces
        (``relay.spool.store``). The session sends it as it is (``checked=True``).
        """
        up, courier = self._upstreams.get(upstream), self._couriers.get(upstream)
        if up is None or courier is None:
            return {r: transient(f"upstream {upstream!r} is not configured (or not SMTP)",
                                 "unknown_upstream") for r in recipients}
        creds = self.credentials_for(up, msg.envelope.sender, msg.envelope.auth_user)
        timer = StageTimer()
        journal = self._handovers
        handed = (functools.partial(journal.handed, msg.queue_id, up.name)
                  if journal is not None else _unjournaled)
        try:
            return await courier.carry(msg, data, recipients, credentials=creds, timer=timer,
                                       handed=handed)
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
        elif log.isEnabledFor(logging.DEBUG):         # the summary is built per delivery
            log.debug("%s: delivery to %s: %s", queue_id, upstream, timer.summary())
