"""The accept pipeline of one SMTP listener: route check, header rules, DKIM, guard, spool.

What happens between a finished DATA and the ``250 ... queued as <id>``:

1. (at RCPT) every recipient must have a route; a message nobody can deliver is refused
   in the session (``550 5.7.1`` for a recipient no route covers), never bounced later;
2. header rules of the listener, then of the ``[[route]]`` each recipient matched and of
   its upstream, are applied, each set once (rules can never touch protected headers:
   the config loader refuses such rules);
3. trusted mail (authenticated or allow-listed clients) whose From domain has a DKIM key
   is signed, last, after every header change relay makes;
4. the protected-header guard compares what relay received with what it will store; a
   difference (a bug, by construction) is counted, logged and answered ``451 4.3.0`` so
   the platform keeps the message and retries, rather than relay sending altered mail;
5. the spool stores it durably; only then does the listener answer 250.

Before any of that, at MAIL FROM, the spool must have room (``relay.spool.health``):
below ``[relay] spool_reserve`` (plus the client's announced SIZE) the sender gets
``452 4.3.1`` before it sends DATA, a read-only spool ``451 4.3.0``; after DATA the
same check runs with the real size before the store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from relay.checks.message import MessageChecks
from relay.config.schema import Config, HeaderRule, ListenerConfig, ProfileConfig
from relay.envelope import Envelope
from relay.errors import SpoolError
from relay.headers import HeaderGuard, apply_rules
from relay.routing import Router
from relay.smtp import replies
from relay.spool.health import Shortage, SpoolHealth
from relay.spool.store import Spool
from relay.verdict import Refusal, SessionInfo

if TYPE_CHECKING:                        # loaded only by a config that uses them
    from relay.checks.spf import SpfChecker
    from relay.dkim.sign import Signer

NO_ROUTE = "550 5.7.1 Relaying denied: no route for this recipient"


def _announced_size(params: Mapping[str, str | None]) -> int:
    size = params.get("SIZE")
    return int(size) if size is not None and size.isdigit() and len(size) <= 20 else 0


def shortage_refusal(shortage: Shortage) -> Refusal:
    """The reply to MAIL while the spool cannot take mail (452 when full, else 451)."""
    if shortage.full:
        return Refusal.from_reply(replies.DISK_FULL, "spool_full")
    return Refusal.from_reply(replies.LOCAL_ERROR, "spool_error")


class AcceptPipeline:
    """The ``accept`` callable an ``SmtpListener`` hands finished messages to."""

    def __init__(self, *, listener: ListenerConfig, config: Config, spool: Spool,
                 router: Router, signer: Signer | None, guard: HeaderGuard) -> None:
        self._rules = listener.header_rules
        self._route_rules = any(r.header_rules for r in config.routes)
        self._upstream_rules = {u.name: u.header_rules for u in config.upstreams
                                if u.header_rules}
        self._spool = spool
        self._router = router
        self._signer = signer
        self._guard = guard

    def _rules_for(self, envelope: Envelope) -> list[HeaderRule]:
        rules = list(self._rules)
        if not (self._route_rules or self._upstream_rules):
            return rules
        # Each rule set once, however many recipients take it: the rules of the [[route]]
        # that matched (not of every route naming the same upstream), then the upstream's.
        routes_done: set[int] = set()
        upstreams_done: set[str] = set()
        for rcpt in envelope.recipients:
            upstream = self._router.route_or_none(envelope.sender, rcpt)
            if upstream is None:
                continue
            route = self._router.matching_rule(envelope.sender, rcpt)
            if route is not None and route.header_rules and id(route) not in routes_done:
                routes_done.add(id(route))
                rules.extend(route.header_rules)
            if upstream not in upstreams_done:
                upstreams_done.add(upstream)
                rules.extend(self._upstream_rules.get(upstream, ()))
        return rules

    async def __call__(self, envelope: Envelope, data: bytes) -> str:
        """Header rules, DKIM, guard, then the spool; returns the queue id.

        The spool only takes CRLF messages (``relay.spool.store``); this vouches for its
        own (``crlf_checked``) instead of having it scan them again. ``data`` has no bare
        CR or LF: the DATA reader (``relay.smtp.data``) refused every message with one.
        Neither has anything relay adds to the header on the way, each field a whole
        CRLF-terminated line with no CR or LF inside, inserted at a line start or removed
        whole: the listener's ``Received:`` on top (the client's words through
        ``handler._clean``, the peer's IP, ``[relay] hostname``, a checked domain:
        ``relay.config.values.is_domain``); the checks' ``Date:``/``Message-ID:``
        (``relay.headers.add_missing`` refuses any other field, or one with a CR or LF
        before its CRLF) and SPF fields
        (values cleaned of CR and LF, ``relay.checks.spf``); header rules (names
        checked by ``relay.config.values.is_header_name``, values refused when they hold a
        CR or LF by ``relay.config.sections.read_header_rules``; ``relay.headers.apply_rules``
        ends each new field like the first line, the CRLF of ``Received:``); and the
        ``DKIM-Signature`` (fixed names, base64, the key's checked domain and selector,
        folded with that same CRLF: ``relay.dkim.sign``).
        """
        received = data
        rules = self._rules_for(envelope)
        if rules:
            data = apply_rules(data, rules)
        if self._signer is not None:       # the DATA reader let no bare CR or LF in
            data = await self._signer.maybe_sign(envelope, data, crlf=True)
        if not self._guard.check(received, data):
            raise Refusal(451, "4.3.0", "Error: local error in processing; try again later",
                          reason="protected_headers")
        shortage = await self._spool.health.check(len(data))
        if shortage is not None:
            raise SpoolError(f"not storing a message of {len(data)} bytes: {shortage.text}",
                             disk_full=shortage.full,
                             hint="free space on the spool's filesystem (or lower "
                                  "[relay] spool_reserve); clients retry meanwhile")
        return await self._spool.store(envelope, data, crlf_checked=True)


class RoutedChecks(MessageChecks):
    """The listener's checks (structure, ownership, profiles, SPF) plus: every recipient
    needs a route."""

    def __init__(self, *, router: Router, profile: ProfileConfig | None,
                 upstream_profiles: Mapping[str, ProfileConfig], spf: SpfChecker | None,
                 spf_policy: Literal["off", "tag", "reject"],
                 space: SpoolHealth | None = None, **options: Any) -> None:
        self._router = router
        self._space = space
        self._upstream_profiles = upstream_profiles
        super().__init__(profile=profile, route_profile=self._profile_of, spf=spf,
                         spf_policy=spf_policy, **options)

    def _profile_of(self, sender: str, recipient: str) -> ProfileConfig | None:
        upstream = self._router.route_or_none(sender, recipient)
        return None if upstream is None else self._upstream_profiles.get(upstream)

    async def check_sender(self, session: SessionInfo, sender: str,
                           params: Mapping[str, str | None]) -> None:
        if self._space is not None:
            shortage = await self._space.check(_announced_size(params))
            if shortage is not None:      # counted and mail-logged by the listener; the
                raise shortage_refusal(shortage)   # main process logs the cause once
        await super().check_sender(session, sender, params)

    async def check_recipient(self, session: SessionInfo, sender: str, recipient: str,
                              accepted: Sequence[str]) -> None:
        if self._router.route_or_none(sender, recipient) is None:
            raise Refusal.from_reply(NO_ROUTE, "no_route")
        await super().check_recipient(session, sender, recipient, accepted)
