"""The one login-failure throttle (SMTP AUTH and IMAP/POP3 proxy logins)."""

from __future__ import annotations

import pytest

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
