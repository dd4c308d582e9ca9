"""The one login-failure throttle (SMTP AUTH and IMAP/POP3 proxy logins)."""

from __future__ import annotations

import logging

import pytest

from relay.metrics import Metrics
from relay.throttle import FailureThrottle, client_key

pytestmark = pytest.mark.fast


def test_schedule_refusal_and_expiry() -> None:
    now = [0.0]
    t = FailureThrottle(limit=4, window=100, base_delay=1, max_delay=3, clock=lambda: now[0])
    assert t.failure("1.2.3.4") == (0.0, False)
    assert t.failure("1.2.3.4") == (1.0, False)
    assert t.failure("1.2.3.4") == (2.0, False)
    assert t.failures("1.2.3.4") == 3
    assert t.failure("5.6.7.8") == (0.0, False)
    assert t.failure("1.2.3.4") == (0.0, True)
    assert t.blocked("1.2.3.4") and not t.blocked("5.6.7.8")
    now[0] = 101.0
    assert not t.blocked("1.2.3.4")
    # failures outside the window are forgotten; success clears
    assert t.failure("5.6.7.8") == (0.0, False)
    t.success("5.6.7.8")
    assert t.failure("5.6.7.8") == (0.0, False)


def test_delays_are_capped() -> None:
    now = [0.0]
    t = FailureThrottle(limit=0, window=100, base_delay=1, max_delay=3, clock=lambda: now[0])
    delays = [t.failure("10.0.0.1")[0] for _ in range(6)]
    assert delays == [0, 1, 2, 3, 3, 3]
    assert not t.blocked("10.0.0.1")          # limit 0: slowed, never refused


@pytest.mark.parametrize(("addr", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8::1", "2001:db8::/64"),
    ("2001:db8::ffff:1:2", "2001:db8::/64"),
    ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
])
def test_clients_are_counted_per_ipv4_address_or_ipv6_64(addr: str, key: str) -> None:
    assert client_key(addr) == key


def test_an_ipv6_client_hopping_inside_its_64_is_still_refused() -> None:
    now = [0.0]
    t = FailureThrottle(limit=4, window=100, clock=lambda: now[0])
    for host in ("2001:db8::1", "2001:db8::2", "2001:db8::3:4"):
        assert t.failure(host)[1] is False
    assert t.failure("2001:db8::ffff") == (0.0, True)
    assert t.blocked("2001:db8::9") and not t.blocked("2001:db8:0:1::1")


def test_configure_keeps_what_clients_earned() -> None:
    now = [0.0]
    t = FailureThrottle(limit=5, window=100, clock=lambda: now[0])
    for _ in range(3):
        t.failure("10.0.0.1")
    t.configure(limit=4, window=100)
    assert t.failure("10.0.0.1") == (0.0, True)


def test_memory_is_bounded() -> None:
    now = [0.0]
    t = FailureThrottle(limit=3, window=10, max_tracked=100, clock=lambda: now[0])
    for i in range(1000):
        now[0] = float(i)
        t.failure(f"10.0.{i // 256}.{i % 256}")
    assert len(t._failures) <= 100


# --- per account, and across processes ------------------------------------------------------

def accounts_pair(now: list[float], **kw: object) -> tuple[FailureThrottle, FailureThrottle]:
    accounts = FailureThrottle.for_accounts(limit=4, window=100, base_delay=1, max_delay=3,
                                            clock=lambda: now[0], **kw)  # type: ignore[arg-type]
    network = FailureThrottle(limit=5, window=100, base_delay=1, max_delay=3,
                              clock=lambda: now[0], accounts=accounts)
    return network, accounts


def test_one_account_guessed_from_many_addresses_is_refused_for_everyone() -> None:
    now = [0.0]
    network, _ = accounts_pair(now)
    outcomes = [network.failure(f"192.0.2.{i}", "Alice") for i in range(1, 5)]
    assert outcomes == [(0.0, False), (1.0, False), (2.0, False), (0.0, True)]
    assert network.refusal("198.51.100.7", "alice") == "account"      # case-insensitive
    assert network.refusal("198.51.100.7", "bob") is None
    assert network.refusal("198.51.100.7") is None                     # its network is fine
    now[0] = 101.0
    assert network.refusal("198.51.100.7", "alice") is None


def test_a_success_clears_the_account_and_the_network() -> None:
    now = [0.0]
    network, _ = accounts_pair(now)
    for i in range(3):
        network.failure(f"192.0.2.{i}", "alice")
    network.success("192.0.2.0", "alice")
    assert network.failure("192.0.2.9", "alice") == (0.0, False)      # counting from 1 again
    assert network.failures("192.0.2.0") == 0


def test_the_lockout_is_logged_once_naming_the_account_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    metrics = Metrics()
    network, _ = accounts_pair(now, metrics=metrics)
    caplog.set_level(logging.WARNING, logger="relay.auth")
    for i in range(6):
        network.failure(f"192.0.2.{i}", "al\x1bice", listener="platform", protocol="smtp")
    [line] = [r.getMessage() for r in caplog.records]
    assert 'account "al\\x1bice" reached 4 failed logins' in line
    assert "192.0.2.3 on listener platform, smtp" in line
    assert metrics.registry.get_sample_value(
        "relay_auth_lockouts_total", {"protocol": "smtp", "scope": "account"}) == 1


def test_a_replica_forwards_its_failures_and_takes_lockouts_from_the_main_process(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    caplog.set_level(logging.INFO, logger="relay.auth")
    locked: list[tuple[str, float]] = []
    main = FailureThrottle.for_accounts(limit=3, window=60, clock=lambda: now[0],
                                        on_lock=lambda a, s: locked.append((a, s)))
    sent: list[tuple[str, str, str, str]] = []
    replica = FailureThrottle.for_accounts(limit=3, window=60, clock=lambda: now[0],
                                           quiet=True, on_failure=lambda *a: sent.append(a))
    replica.failure("alice")                                   # seen by a listener process
    main.failed_elsewhere(*sent[-1])                           # ... forwarded to main
    main.failed_elsewhere("alice", "192.0.2.8", "mailbox", "imap")   # IMAP in main
    assert not locked
    replica.failure("alice")
    main.failed_elsewhere(*sent[-1])
    assert locked == [("alice", 60)] and main.remaining("alice") == 60
    assert not replica.blocked("alice")                        # it only saw two
    replica.lock("alice", main.remaining("alice"))             # the main process tells it
    assert replica.blocked("alice")
    assert len(caplog.records) == 1                            # logged by main, not the replica


@pytest.mark.parametrize(("addr", "v4", "v6", "key"), [
    ("192.0.2.77", 24, 64, "192.0.2.0/24"),
    ("192.0.2.77", 32, 64, "192.0.2.77"),
    ("2001:db8:1:2::5", 32, 48, "2001:db8:1::/48"),
])
def test_the_client_network_prefixes_can_be_set(addr: str, v4: int, v6: int,
                                                 key: str) -> None:
    assert client_key(addr, ipv4_prefix=v4, ipv6_prefix=v6) == key
