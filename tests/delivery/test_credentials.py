"""Auth translation answers: the same whether computed or remembered, per identity."""

from __future__ import annotations

from dataclasses import replace

import pytest

import relay.outbound.attempt as attempt
from relay.config.schema import AccountConfig, Secret
from tests.delivery.helpers import deliverer, upstream

pytestmark = pytest.mark.fast

ACCOUNTS = [
    AccountConfig(upstream="up", sender="sales@example.com", username="sales@contoso.test",
                  password=Secret("s1")),
    AccountConfig(upstream="up", user="alice", username="alice@contoso.test",
                  password=Secret("s2")),
]


def test_remembered_credentials_are_the_computed_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attempt, "CREDENTIALS_MEMO", 3)
    up = upstream(25, auth="password", username="relay@contoso.test", password=Secret("u"))
    d = deliverer(up, accounts=ACCOUNTS)
    cases = [("sales@example.com", ""), ("SALES@example.com", ""), ("bob@example.com", "alice"),
             ("bob@example.com", ""), ("sales@example.com", "alice"), ("x@example.com", "eve")]
    for _ in range(3):
        for sender, user in cases:
            assert d.credentials_for(up, sender, user) == d._credentials(up, sender, user)
            assert len(d._creds) <= 3
    assert d.credentials_for(up, "Sales@Example.com", "").username == "sales@contoso.test"
    assert d.credentials_for(up, "bob@example.com", "alice").username == "alice@contoso.test"
    assert d.credentials_for(up, "bob@example.com", "").username == "relay@contoso.test"


def test_an_upstream_that_is_not_the_deliverers_is_answered_not_remembered() -> None:
    up = upstream(25, auth="password", username="relay@contoso.test", password=Secret("u"))
    d = deliverer(up, accounts=ACCOUNTS)
    assert d.credentials_for(up, "bob@example.com", "").username == "relay@contoso.test"
    other = replace(up, username="changed@contoso.test")        # same name, other settings
    assert d.credentials_for(other, "bob@example.com", "").username == "changed@contoso.test"
