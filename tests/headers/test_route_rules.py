"""Header rules of a [[route]] apply to mail that route carries, and to no other mail,
even when several routes name the same upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from relay.app.listeners import build_listeners
from relay.config.loader import load_config
from relay.envelope import Envelope
from relay.metrics import Metrics
from relay.spool.store import Spool

pytestmark = pytest.mark.fast

CONFIG = """
[relay]
hostname = "relay.test"
spool = "spool"
default_upstream = "out"

[[listener]]
name = "in"
protocol = "smtp"
listen = "127.0.0.1:2525"
tls = "none"
auth = "none"
allow = ["127.0.0.0/8"]

[[upstream]]
name = "out"
protocol = "outbox"
path = "outbox"

[[upstream.header_rule]]
action = "add"
header = "X-Upstream"
value = "out"

[[route]]
sender_domain = "sales.example"
upstream = "out"

[[route.header_rule]]
action = "add"
header = "X-Campaign"
value = "sales"

[[route]]
sender_domain = "support.example"
upstream = "out"

[[route.header_rule]]
action = "add"
header = "X-Queue"
value = "support"
"""

Store = Callable[..., Awaitable[bytes]]
BODY = b"From: a@x\r\nTo: b@y\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture
async def stored(tmp_path: Path) -> AsyncIterator[Store]:
    path = tmp_path / "relay.toml"
    path.write_text(CONFIG)
    config = load_config(path)
    spool = Spool(config.relay.spool)
    accept = build_listeners(config, spool=spool, metrics=Metrics()).listeners["in"].accept
    assert accept is not None

    async def store(sender: str, *rcpts: str) -> bytes:
        env = Envelope(sender=sender, recipients=rcpts, received_at=0.0, listener="in")
        qid = await accept(env, BODY)
        return await spool.read_message(qid)
    yield store
    spool.close()


def header_names(data: bytes) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    return [line.split(":", 1)[0] for line in head.split("\r\n") if not line[:1].isspace()]


async def test_only_the_matching_routes_rules_apply(stored: Store) -> None:
    sales = header_names(await stored("agent@sales.example", "c@customer.example"))
    assert "X-Campaign" in sales and "X-Queue" not in sales and "X-Upstream" in sales
    support = header_names(await stored("agent@support.example", "c@customer.example"))
    assert "X-Queue" in support and "X-Campaign" not in support and "X-Upstream" in support
    other = header_names(await stored("agent@other.example", "c@customer.example"))
    assert "X-Queue" not in other and "X-Campaign" not in other and "X-Upstream" in other


async def test_each_rule_set_applies_once(stored: Store) -> None:
    names = header_names(await stored("agent@sales.example", "c@one.example",
                                      "d@two.example"))
    assert names.count("X-Campaign") == 1 and names.count("X-Upstream") == 1
