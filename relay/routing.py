"""Routing: which named upstream carries mail from a sender to a recipient.

Rules come from ``[[route]]`` entries (``sender_domain``, ``recipient_domain``, both
optional, exact or ``*.example.com`` wildcard for any subdomain) and fall back to
``relay.default_upstream``. The most specific rule wins: first the rule naming more
fields (sender and recipient beats one of them), then exact domains over wildcards,
then longer wildcards; among equals the first rule in the file wins.

Bounces (null sender) are matched with the recipient's domain standing in for the
sender domain: the DSN goes back to the original sender's mailbox, which the route
for that domain reaches.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.config.schema import RouteConfig
from relay.envelope import Envelope
from relay.errors import DeliveryError

MEMO_SIZE = 4096          # domain pairs remembered (a platform sends from a handful)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].rstrip(".").lower() if "@" in address else ""


def _score(pattern: str | None, domain: str) -> int | None:
    """How specifically ``pattern`` matches ``domain`` (None: no match)."""
    if pattern is None:
        return 0
    pattern = pattern.rstrip(".").lower()
    if pattern.startswith("*."):
        suffix = pattern[1:]                       # ".example.com"
        if domain.endswith(suffix) and len(domain) > len(suffix):
            return 2 * 100 + suffix.count(".")
        return None
    return 3 * 100 if domain == pattern else None


class Router:
    """Built from ``Config.routes`` and ``relay.default_upstream``; pure and cheap."""

    def __init__(self, routes: Sequence[RouteConfig], default: str | None) -> None:
        self._routes = tuple(routes)
        self._default = default
        # The decision depends on the two domains only, and a message asks it several
        # times (RCPT, profile, queueing, delivery): remembered per pair, bounded.
        self._memo: dict[tuple[str, str], RouteConfig | None] = {}

    def matching_rule(self, sender: str, recipient: str) -> RouteConfig | None:
        """The ``[[route]]`` that decides this sender and recipient (None: the default)."""
        rdom = _domain(recipient)
        key = (_domain(sender) or rdom, rdom)
        try:
            return self._memo[key]
        except KeyError:
            pass
        rule = self._decide(*key)
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = rule
        return rule

    def _decide(self, sdom: str, rdom: str) -> RouteConfig | None:
        best: tuple[int, RouteConfig] | None = None
        for rule in self._routes:
            s = _score(rule.sender_domain, sdom)
            r = _score(rule.recipient_domain, rdom)
            if s is None or r is None:
                continue
            named = (rule.sender_domain is not None) + (rule.recipient_domain is not None)
            score = 1000 * named + s + r            # ties keep file order (strict >)
            if best is None or score > best[0]:
                best = (score, rule)
        return best[1] if best is not None else None

    def route_or_none(self, sender: str, recipient: str) -> str | None:
        """The upstream for this sender and recipient, or None (refuse at RCPT time)."""
        rule = self.matching_rule(sender, recipient)
        return rule.upstream if rule is not None else self._default

    def route(self, envelope: Envelope, recipient: str) -> str:
        """The upstream for ``recipient`` of a queued message.

        Raises a transient ``DeliveryError`` (reason ``no_route``) when nothing matches:
        that happens only when a reload removed the route after the message was queued.
        """
        name = self.route_or_none(envelope.sender, recipient)
        if name is None:
            raise DeliveryError(
                f"no route for sender <{envelope.sender}> to <{recipient}>",
                permanent=False, reason="no_route",
                hint="add a [[route]] for this domain or set relay.default_upstream; the "
                     "message stays queued until then")
        return name
