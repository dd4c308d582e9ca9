"""A listener's ``Checks``: structure, sender ownership, profile limits and SPF.

SPF is decided at MAIL FROM (so a ``550 5.7.23`` or ``451 4.4.3`` comes before DATA is
sent) and its trace headers are prepended after DATA, after removing any
Authentication-Results field that claims relay's own hostname (RFC 8601 section 5);
authenticated sessions are not
SPF-checked (SPF is about MTAs, not a platform's submissions). Profile limits are checked
at MAIL (local part), RCPT (recipients, local part) and after DATA, for the listener's
profile and for the profile of the upstream each recipient routes to. After DATA the
message's structure is checked first (``relay.checks.structure``: the listener's checks
plus those the applicable profiles turn on), then the ``From:``/``Sender:`` ownership of
an authenticated user (``relay.checks.ownership``, which also checks the envelope sender
at MAIL), then the profile limits; mail from trusted clients then gets a ``Date:`` and
``Message-ID:`` if it lacks them (``relay.headers.add_missing``).
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from email.utils import formatdate
from typing import TYPE_CHECKING, Literal

from relay.checks import structure
from relay.checks.ownership import Ownership
from relay.checks.profile import check_message_async, check_recipient, check_sender
from relay.config.schema import ProfileConfig
from relay.envelope import Envelope
from relay.headers import add_missing, remove_forged_results
from relay.verdict import BaseChecks, SessionInfo, SizeLimit

if TYPE_CHECKING:                        # pyspf and dnspython: only with SPF on
    from relay.checks.spf import SpfChecker

RouteProfile = Callable[[str, str], ProfileConfig | None]     # (sender, recipient) → profile
_PENDING_LIMIT = 10_000
_INLINE = 256 * 1024        # larger messages are inspected in a thread (base64 decoding)


class MessageChecks(BaseChecks):
    """One listener's checks (build a new one on reload)."""

    def __init__(self, *, profile: ProfileConfig | None = None,
                 route_profile: RouteProfile | None = None,
                 spf: SpfChecker | None = None,
                 spf_policy: Literal["off", "tag", "reject"] = "off",
                 spf_permerror: Literal["tag", "reject"] = "tag",
                 structure_checks: Sequence[str] = (), max_header_size: int = 256 * 1024,
                 ownership: Ownership | None = None, add_missing_headers: bool = False,
                 hostname: str = "localhost") -> None:
        self.profile = profile
        self._route_profile = route_profile
        self._spf = spf if spf_policy != "off" else None
        self._policy = spf_policy
        self._permerror = spf_permerror
        self._structure = frozenset(structure_checks)
        self._max_header = max_header_size
        self._ownership = ownership
        self._add_missing = add_missing_headers
        self._hostname = hostname
        # SPF headers decided at MAIL FROM, waiting for the end of DATA (bounded).
        self._pending: OrderedDict[tuple[str, int, str, str], bytes] = OrderedDict()

    def _profiles(self, sender: str, recipients: Sequence[str]) -> list[ProfileConfig]:
        found: dict[str, ProfileConfig] = {}
        if self.profile is not None:
            found[self.profile.name] = self.profile
        if self._route_profile is not None:
            for rcpt in recipients:
                p = self._route_profile(sender, rcpt)
                if p is not None:
                    found.setdefault(p.name, p)
        return list(found.values())

    @staticmethod
    def _key(session: SessionInfo, sender: str) -> tuple[str, int, str, str]:
        return (session.client_ip, session.client_port, session.helo, sender)

    def size_limit(self) -> SizeLimit | None:
        """The listener's profile's message size limit, if it sets one."""
        p = self.profile
        if p is None or p.max_message_bytes is None:
            return None
        return SizeLimit(p.max_message_bytes, p.name)

    async def check_sender(self, session: SessionInfo, sender: str,
                           params: Mapping[str, str | None]) -> None:
        if self.profile is not None and sender:
            check_sender(self.profile, sender)
        if self._ownership is not None:
            self._ownership.check(session.auth_user, [sender], "envelope sender")
        if self._spf is None or session.auth_user:
            return
        verdict = await self._spf.verdict(self._policy, ip=session.client_ip, sender=sender,
                                          helo=session.helo, listener=session.listener,
                                          permerror=self._permerror)
        if verdict.refusal is not None:
            raise verdict.refusal
        key = self._key(session, sender)
        self._pending[key] = verdict.headers
        self._pending.move_to_end(key)
        while len(self._pending) > _PENDING_LIMIT:
            self._pending.popitem(last=False)

    async def check_recipient(self, session: SessionInfo, sender: str, recipient: str,
                              accepted: Sequence[str]) -> None:
        for p in self._profiles(sender, [recipient]):
            already = len(accepted) if p is self.profile else sum(
                1 for r in accepted if self._route_profile and
                (q := self._route_profile(sender, r)) is not None and q.name == p.name)
            check_recipient(p, recipient, accepted=already)

    async def check_message(self, session: SessionInfo, envelope: Envelope,
                            data: bytes) -> bytes:
        profiles = self._profiles(envelope.sender, envelope.recipients)
        shape = await self._inspect(envelope, data, profiles)
        if self._ownership is not None:
            for name in (b"from", b"sender"):
                where = f"{name.decode().title()}: header"
                if name in shape.unreadable:
                    self._ownership.unreadable(session.auth_user, where)
                self._ownership.check(session.auth_user, shape.addresses.get(name, ()), where)
        for p in profiles:
            await check_message_async(p, data)
        if self._add_missing and session.trusted:
            data = self._missing(data, shape)
        if self._spf is None or session.auth_user:
            return data
        headers = self._pending.pop(self._key(session, envelope.sender), None)
        if headers is None:      # e.g. evicted: decide again rather than pass unchecked
            headers = await self._headers(session, envelope)
        data = remove_forged_results(data, self._spf.hostname)
        # the listener's own Received line stays on top, SPF results right under it
        end = structure.own_trace_end(data)
        return data[:end] + headers + data[end:]

    async def _inspect(self, envelope: Envelope, data: bytes,
                       profiles: Sequence[ProfileConfig]) -> structure.Shape:
        checks = self._structure.union(*(p.structure_checks for p in profiles))
        run = functools.partial(structure.inspect, data, start=structure.own_trace_end(data),
                                checks=checks, smtputf8=envelope.smtputf8,
                                max_header_size=self._max_header)
        if len(data) <= _INLINE:           # one pass of C-level searches: cheaper inline
            return run()
        return await asyncio.to_thread(run)

    def _missing(self, data: bytes, shape: structure.Shape) -> bytes:
        """Postfix's always_add_missing_headers for submitted mail: Date:, Message-ID:."""
        fields = []
        now = time.time()
        if not shape.has(b"date"):
            fields.append(f"Date: {formatdate(now, localtime=True)}\r\n".encode())
        if not shape.has(b"message-id"):
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
            fields.append(f"Message-ID: <{stamp}.{secrets.token_hex(8)}@{self._hostname}>"
                          "\r\n".encode())
        if not fields:
            return data
        return add_missing(data, shape.head_end, fields)

    async def _headers(self, session: SessionInfo, envelope: Envelope) -> bytes:
        assert self._spf is not None
        v = await self._spf.verdict(self._policy, ip=session.client_ip, sender=envelope.sender,
                                    helo=session.helo, listener=session.listener,
                                    permerror=self._permerror)
        if v.refusal is not None:
            raise v.refusal
        return v.headers
