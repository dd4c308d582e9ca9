"""Admission per client network (relay.connlimits): concurrency, rate, and the reserve."""

from __future__ import annotations

import pytest

from relay.config.schema import HostPort, ListenerConfig
from relay.connlimits import (
    RESERVED,
    TOO_FAST,
    TOO_MANY,
    TOO_MANY_FROM_CLIENT,
    ConnectionCounter,
    Limits,
)

pytestmark = pytest.mark.fast


def test_the_reserve_keeps_the_last_slots_for_networks_holding_none() -> None:
    c = ConnectionCounter()
    limits = Limits(total=10, per_client=4, reserve=3)
    got = [c.admit("192.0.2.1", limits)[0] for _ in range(4)]
    got += [c.admit("192.0.2.2", limits)[0] for _ in range(4)]
    assert got[:7] == [None] * 7 and got[7] == RESERVED      # 7 held: into the reserve
    assert c.admit("198.51.100.1", limits)[0] is None        # a newcomer gets in ...
    assert c.admit("198.51.100.1", limits)[0] == RESERVED    # ... once
    assert c.admit("198.51.100.2", limits)[0] is None
    assert c.admit("198.51.100.3", limits)[0] is None        # the 10th slot
    assert c.admit("198.51.100.4", limits)[0] == TOO_MANY
    assert c.total == 10


def test_ipv6_clients_share_their_64_and_prefixes_widen_a_client() -> None:
    c = ConnectionCounter()
    assert c.admit("2001:db8::1", Limits(per_client=2))[0] is None
    assert c.admit("2001:db8::2", Limits(per_client=2))[0] is None
    refused, key = c.admit("2001:db8::ffff", Limits(per_client=2))
    assert (refused, key) == (TOO_MANY_FROM_CLIENT, "2001:db8::/64")
    wide = Limits(per_client=1, ipv4_prefix=24)
    assert c.admit("192.0.2.1", wide) == (None, "192.0.2.0/24")
    assert c.admit("192.0.2.200", wide)[0] == TOO_MANY_FROM_CLIENT
    c.release("192.0.2.0/24")
    assert c.admit("192.0.2.200", wide)[0] is None


def test_the_connection_rate_is_counted_per_network_per_minute() -> None:
    now = [0.0]
    c = ConnectionCounter(clock=lambda: now[0])
    limits = Limits(rate=3)
    for _ in range(3):
        refused, key = c.admit("192.0.2.1", limits)
        assert refused is None
        c.release(key)                          # short connections: concurrency is no issue
    assert c.admit("192.0.2.1", limits)[0] == TOO_FAST
    assert c.admit("192.0.2.2", limits)[0] is None
    now[0] = 60.0
    assert c.admit("192.0.2.1", limits)[0] is None


def test_rate_memory_is_bounded() -> None:
    now = [0.0]
    c = ConnectionCounter(clock=lambda: now[0], max_tracked=50)
    for i in range(500):
        _, key = c.admit(f"10.0.{i // 256}.{i % 256}", Limits(rate=5))
        c.release(key)
    assert len(c._recent) <= 50


def test_the_default_reserve_is_a_tenth_at_most_100() -> None:
    """SMTP's 200 slots keep 20 for newcomers; a proxy listener's 10,000 keep 100, so one
    platform host may hold 9,900 sessions (one per mailbox)."""
    def reserve(**kw: object) -> int:
        return ListenerConfig(name="l", protocol="imap", listen=HostPort("127.0.0.1", 1),
                              **kw).reserve           # type: ignore[arg-type]

    assert reserve(max_connections=200) == 20
    assert reserve(max_connections=30) == 3
    assert reserve(max_connections=10_000) == 100
    assert reserve(max_connections=10_000, reserved_connections=2_000) == 2_000
