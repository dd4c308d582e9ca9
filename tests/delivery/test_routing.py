"""Routing table: most specific rule wins, file order breaks ties, default last."""

from __future__ import annotations

import time

import pytest

from relay.config.schema import RouteConfig
from relay.envelope import Envelope
from relay.errors import DeliveryError
from relay.routing import Router

pytestmark = pytest.mark.fast

ROUTES = (
    RouteConfig(upstream="any-sub", sender_domain="*.example.com"),
    RouteConfig(upstream="o365", sender_domain="example.com"),
    RouteConfig(upstream="o365-second", sender_domain="example.com"),       # never: tie, later
    RouteConfig(upstream="deep-sub", sender_domain="*.eu.example.com"),
    RouteConfig(upstream="gmail-to-partner", sender_domain="example.com",
                recipient_domain="partner.org"),
    RouteConfig(upstream="partner", recipient_domain="partner.org"),
    RouteConfig(upstream="partner-subs", recipient_domain="*.partner.org"),
)


@pytest.mark.parametrize(("sender", "recipient", "expected"), [
    ("a@example.com", "x@elsewhere.net", "o365"),                 # exact beats file order
    ("a@EXAMPLE.com", "x@elsewhere.net", "o365"),                 # case-insensitive
    ("a@sales.example.com", "x@elsewhere.net", "any-sub"),
    ("a@fr.eu.example.com", "x@elsewhere.net", "deep-sub"),       # longer wildcard wins
    ("a@eu.example.com", "x@elsewhere.net", "any-sub"),           # *.eu.… needs a subdomain
    ("a@example.com", "x@partner.org", "gmail-to-partner"),       # two fields beat one
    ("a@other.net", "x@partner.org", "partner"),
    ("a@other.net", "x@mx.partner.org", "partner-subs"),
    ("a@other.net", "x@partner.org.evil.net", "fallback"),        # suffix, not substring
    ("a@notexample.com", "x@elsewhere.net", "fallback"),
    ("", "a@example.com", "o365"),                                # a bounce: recipient's domain
])
def test_route_table(sender: str, recipient: str, expected: str) -> None:
    assert Router(ROUTES, "fallback").route_or_none(sender, recipient) == expected


def test_no_route_without_default() -> None:
    router = Router(ROUTES, None)
    assert router.route_or_none("a@other.net", "x@elsewhere.net") is None
    env = Envelope(sender="a@other.net", recipients=("x@elsewhere.net",),
                   received_at=time.time())
    with pytest.raises(DeliveryError) as info:
        router.route(env, "x@elsewhere.net")
    assert not info.value.permanent and info.value.reason == "no_route"
    assert "default_upstream" in info.value.hint


def test_remembered_decisions_are_the_computed_ones_and_stay_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The memo answers per domain pair exactly as the rules do, in any order of asking,
    and never holds more than MEMO_SIZE pairs."""
    import relay.routing as routing

    monkeypatch.setattr(routing, "MEMO_SIZE", 8)
    router = Router(ROUTES, "fallback")
    senders = ["a@example.com", "b@EXAMPLE.com", "a@sales.example.com", "a@fr.eu.example.com",
               "", "a@other.net", "x@notexample.com"]
    rcpts = ["x@partner.org", "y@PARTNER.org", "x@mx.partner.org", "x@elsewhere.net",
             "x@partner.org.evil.net"]
    for _ in range(3):                         # asked again: from the memo, or recomputed
        for s in senders:
            for r in rcpts:
                sdom = routing._domain(s) or routing._domain(r)
                assert router.matching_rule(s, r) is router._decide(sdom, routing._domain(r))
                assert len(router._memo) <= 8
