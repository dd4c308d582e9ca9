"""A listener's ``Checks``: provider-profile limits and SPF, ready for ``SmtpListener``.

SPF is decided at MAIL FROM (so a ``550 5.7.23`` or ``451 4.4.3`` comes before DATA is
sent) and its trace headers are prepended after DATA, after removing any
Authentication-Results field that claims relay's own hostname (RFC 8601 section 5);
authenticated sessions are not
SPF-checked (SPF is about MTAs, not a platform's submissions). Profile limits are checked
at MAIL (local part), RCPT (recipients, local part) and after DATA, for the listener's
profile and for the profile of the upstream each recipient routes to.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from relay.checks.profile import check_message_async, check_recipient, check_sender
from relay.checks.spf import SpfChecker
from relay.config.schema import ProfileConfig
from relay.envelope import Envelope
from relay.headers import remove_forged_results
from relay.verdict import BaseChecks, SessionInfo

RouteProfile = Callable[[str, str], ProfileConfig | None]     # (sender, recipient) → profile
_PENDING_LIMIT = 10_000


class MessageChecks(BaseChecks):
    """Profile limits and SPF for one listener (build a new one on reload)."""

    def __init__(self, *, profile: ProfileConfig | None = None,
                 route_profile: RouteProfile | None = None,
                 spf: SpfChecker | None = None,
                 spf_policy: Literal["off", "tag", "reject"] = "off") -> None:
        self.profile = profile
        self._route_profile = route_profile
        self._spf = spf if spf_policy != "off" else None
        self._policy = spf_policy
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

    async def check_sender(self, session: SessionInfo, sender: str,
                           params: Mapping[str, str | None]) -> None:
        if self.profile is not None and sender:
            check_sender(self.profile, sender)
        if self._spf is None or session.auth_user:
            return
        verdict = await self._spf.verdict(self._policy, ip=session.client_ip, sender=sender,
                                          helo=session.helo, listener=session.listener)
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
        for p in self._profiles(envelope.sender, envelope.recipients):
            await check_message_async(p, data)
        if self._spf is None or session.auth_user:
            return data
        headers = self._pending.pop(self._key(session, envelope.sender), None)
        if headers is None:      # e.g. evicted: decide again rather than pass unchecked
            headers = await self._headers(session, envelope)
        data = remove_forged_results(data, self._spf.hostname)
        # the listener's own Received line stays on top, SPF results right under it
        end = data.find(b"\r\n", 0)
        while end >= 0 and data[end + 2:end + 3] in (b" ", b"\t"):
            end = data.find(b"\r\n", end + 2)
        if data.startswith(b"Received:") and end >= 0:
            return data[:end + 2] + headers + data[end + 2:]
        return headers + data

    async def _headers(self, session: SessionInfo, envelope: Envelope) -> bytes:
        assert self._spf is not None
        v = await self._spf.verdict(self._policy, ip=session.client_ip, sender=envelope.sender,
                                    helo=session.helo, listener=session.listener)
        if v.refusal is not None:
            raise v.refusal
        return v.headers
