"""Sender ownership: an authenticated user sends only as the addresses or domains it owns.

Postfix's ``reject_sender_login_mismatch``, extended to the header: the envelope sender
(at MAIL FROM) and every address of ``From:`` and ``Sender:`` (after DATA) must be owned
by the user who logged in. What a user owns comes from the third field of the users file
(``alice:HASH:alice@example.com,example.org``) and from the ``owns`` of ``[[account]]``
entries naming the user: an address, a domain (any address in it) or ``*.domain`` (its
subdomains). A mismatch is refused with ``553 5.7.1 <x@y> not owned by user alice``;
with ``sender_ownership = "log"`` (platforms that legitimately send as many addresses)
it is accepted and logged. Sessions without a login (allow-listed clients) are not
checked, nor is the null sender ``<>`` of bounces.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Literal

from relay.config.schema import AccountConfig
from relay.users import UserDB
from relay.verdict import Refusal

log = logging.getLogger("relay.smtp")


def owns(patterns: Iterable[str], address: str) -> bool:
    """Whether ``address`` matches one of the owned addresses/domains (case-insensitive)."""
    addr = address.lower().rstrip(".")
    domain = addr.rpartition("@")[2]
    for p in patterns:
        if p in (addr, domain):
            return True
        if p.startswith("*.") and domain.endswith(p[1:]) and len(domain) > len(p) - 1:
            return True
    return False


class Ownership:
    """Who owns what on one listener, and the check at MAIL FROM and after DATA."""

    def __init__(self, *, users: UserDB | None, accounts: Sequence[AccountConfig] = (),
                 mode: Literal["enforce", "log"] = "enforce", listener: str = "") -> None:
        self._users = users
        self._accounts: dict[str, tuple[str, ...]] = {}
        for a in accounts:
            if a.user is not None and a.owns:
                self._accounts[a.user] = (*self._accounts.get(a.user, ()), *a.owns)
        self.mode = mode
        self._listener = listener

    def owned_by(self, user: str) -> tuple[str, ...]:
        from_file = self._users.owns(user) if self._users is not None else ()
        return (*from_file, *self._accounts.get(user, ()))

    def users_without_addresses(self) -> list[str]:
        """Users of the file who own nothing (all their mail would be refused)."""
        names = self._users.names() if self._users is not None else []
        return [n for n in names if not self.owned_by(n)]

    def unreadable(self, user: str, where: str) -> None:
        """A From:/Sender: that does not parse cannot be shown to be owned: refuse (or log)."""
        if not user:
            return
        if self.mode == "log":
            log.warning("%s: user %s sent a message whose %s cannot be read as addresses; "
                        "accepted because sender_ownership = \"log\"", self._listener, user,
                        where)
            return
        raise Refusal(553, "5.7.1", f"{where} cannot be read as addresses, so it cannot be "
                      f"checked against what user {user} owns", reason="ownership")

    def check(self, user: str, addresses: Iterable[str], where: str) -> None:
        """Refuse (or log) the first address ``user`` does not own; no user: no check."""
        if not user:
            return
        owned = self.owned_by(user)
        for address in addresses:
            if not address or owns(owned, address):
                continue
            if self.mode == "log":
                log.warning("%s: user %s sent as <%s> (%s), which it does not own; accepted "
                            "because sender_ownership = \"log\"", self._listener, user,
                            address, where)
                continue
            shown = "".join(c if c.isprintable() else "?" for c in address)[:254]
            raise Refusal(553, "5.7.1", f"<{shown}> not owned by user {user}",
                          reason="ownership")
