"""XOAUTH2 end to end: relay gets a token from a local token endpoint, Dovecot's oauth2
passdb validates it against a local introspection endpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import imaplib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from relay.config.schema import Secret, TokenSourceConfig
from relay.oauth.tokens import TokenSources
from relay.transports.factory import Transports
from tests.faults.proxy import FaultProxy
from tests.peers import wait_until
from tests.peers.dovecot import Dovecot, Introspection, dovecot, introspection_server
from tests.peers.token_server import TokenServer, token_server
from tests.proxy.conftest import run_proxy, until
from tests.proxy.test_proxy_dovecot import imap_fetch_subject, message


@pytest.fixture(scope="module")
def introspect() -> Iterator[Introspection]:
    with introspection_server({}) as srv:
        yield srv


@pytest.fixture(scope="module")
def odc(introspect: Introspection) -> Iterator[Dovecot]:
    # carol has no password at all: only a token the introspection endpoint vouches for
    with dovecot(users={"alice": "alice-pw"}, introspection_url=introspect.url) as d:
        yield d


@pytest.fixture
def tokens(odc: Dovecot, introspect: Introspection) -> Iterator[TokenServer]:
    introspect.tokens.clear()                  # token names repeat across token servers
    with token_server(odc.ca) as srv:
        yield srv


async def verify(user: str, password: Secret) -> bool:
    return user == "agent3" and password.reveal() == "agent-pw"


def sources(srv: TokenServer, odc: Dovecot) -> TokenSources:
    cfg = TokenSourceConfig(name="o365", kind="client_credentials", provider="custom",
                            token_url=srv.url, client_id=srv.client_id,
                            client_secret=Secret("app-secret-value"), ca_file=odc.ca_file)
    return TokenSources([cfg], transports=Transports())


async def test_token_from_endpoint_validated_by_dovecot_introspection(
        odc: Dovecot, introspect: Introspection, tokens: TokenServer) -> None:
    subject = f"oauth2-{uuid.uuid4().hex}"
    sent = message(subject)
    odc.deliver("carol", sent)
    ts = sources(tokens, odc)
    async with run_proxy(odc, up_tls="implicit", auth="xoauth2", username="carol",
                         token_source="o365", verify=verify, token_for=ts.token) as r:
        # The endpoint vouches for every token it issued, as carol.
        original = tokens._issue

        def issue(extra: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:
            status, body = original(extra)
            introspect.tokens[str(body["access_token"])] = "carol"
            return status, body
        tokens._issue = issue  # type: ignore[method-assign]

        def client() -> bytes:
            bodies = []
            for _ in range(2):                  # the second login reuses the cached token
                m = imaplib.IMAP4("127.0.0.1", r.port)
                m.login("agent3", "agent-pw")
                bodies.append(imap_fetch_subject(m, subject))
                m.logout()
            assert bodies[0] == bodies[1]
            return bodies[0]
        assert await asyncio.to_thread(client) == sent
    assert len(tokens.issued) == 1 and len(tokens.requests) == 1
    assert tokens.issued[0] in introspect.requests
    # Dovecot's log process writes the line a moment after the login: wait for it.
    await asyncio.to_thread(wait_until, lambda: "user=<carol>, method=XOAUTH2" in odc.log_text())


async def test_token_the_provider_does_not_vouch_for(odc: Dovecot, introspect: Introspection,
                                                     tokens: TokenServer) -> None:
    ts = sources(tokens, odc)                   # issues tokens introspection does not know
    async with run_proxy(odc, up_tls="implicit", auth="xoauth2", username="carol",
                         token_source="o365", verify=verify, token_for=ts.token) as r:
        def client() -> str:
            m = imaplib.IMAP4("127.0.0.1", r.port)
            with pytest.raises(imaplib.IMAP4.error) as exc:
                m.login("agent3", "agent-pw")
            m.logout()
            return str(exc.value)
        assert "UNAVAILABLE" in await asyncio.to_thread(client)
        assert r.metric("relay_proxy_login_failures_total",
                        {"listener": "imap-in", "reason": "auth_refused"}) == 1
    assert tokens.issued and tokens.issued[-1] in introspect.requests


async def test_token_endpoint_refusal_is_a_token_failure(odc: Dovecot,
                                                         tokens: TokenServer) -> None:
    tokens.client_secret = "rotated-secret"     # relay's secret is now wrong: invalid_client
    ts = sources(tokens, odc)
    async with run_proxy(odc, up_tls="implicit", auth="xoauth2", username="carol",
                         token_source="o365", verify=verify, token_for=ts.token) as r:
        def client() -> str:
            m = imaplib.IMAP4("127.0.0.1", r.port)
            with pytest.raises(imaplib.IMAP4.error) as exc:
                m.login("agent3", "wrong")
            with pytest.raises(imaplib.IMAP4.error) as exc:
                m.login("agent3", "agent-pw")
            m.logout()
            return str(exc.value)
        assert "UNAVAILABLE" in await asyncio.to_thread(client)
        assert r.metric("relay_proxy_login_failures_total",
                        {"listener": "imap-in", "reason": "token"}) == 1
        assert len(tokens.requests) == 1        # the wrong password never asked for a token


def vouching(tokens: TokenServer, introspect: Introspection) -> None:
    """Make the introspection endpoint vouch for every token ``tokens`` issues, as carol."""
    original = tokens._issue

    def issue(extra: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:
        status, body = original(extra)
        introspect.tokens[str(body["access_token"])] = "carol"
        return status, body
    tokens._issue = issue  # type: ignore[method-assign]


def logins(port: int, n: int) -> list[str]:
    """``n`` concurrent IMAP logins; each one's outcome ("OK" or the NO text), then LOGOUT."""
    def one() -> str:
        m = imaplib.IMAP4("127.0.0.1", port)
        try:
            m.login("agent3", "agent-pw")
            outcome = "OK"
        except imaplib.IMAP4.error as exc:
            outcome = str(exc)
        assert m.logout()[0] == "BYE"          # the session stayed in sync either way
        return outcome
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: one(), range(n)))


async def test_token_endpoint_down_is_a_clean_no_then_logins_work_again(
        odc: Dovecot, introspect: Introspection, tokens: TokenServer) -> None:
    vouching(tokens, introspect)
    with FaultProxy(tokens.port, tcp=True) as gate:
        gate.refuse(True)                       # the identity platform is unreachable
        cfg = TokenSourceConfig(
            name="o365", kind="client_credentials", provider="custom",
            token_url=tokens.url.replace(str(tokens.port), str(gate.port)),
            client_id=tokens.client_id, client_secret=Secret("app-secret-value"),
            ca_file=odc.ca_file)
        ts = TokenSources([cfg], transports=Transports())
        async with run_proxy(odc, up_tls="implicit", auth="xoauth2", username="carol",
                             token_source="o365", verify=verify, token_for=ts.token) as r:
            down = await asyncio.to_thread(logins, r.port, 3)
            assert all("[UNAVAILABLE]" in o for o in down), down
            assert r.metric("relay_proxy_login_failures_total",
                            {"listener": "imap-in", "reason": "token"}) == 3
            gate.refuse(False)
            assert await asyncio.to_thread(logins, r.port, 3) == ["OK"] * 3
    assert len(tokens.requests) == 1
    assert "user=<carol>, method=XOAUTH2" in odc.log_text()


async def test_a_slow_token_endpoint_is_asked_once_for_all_concurrent_logins(
        odc: Dovecot, introspect: Introspection, tokens: TokenServer) -> None:
    vouching(tokens, introspect)
    tokens.delay = 1.0
    cfg = TokenSourceConfig(name="o365", kind="client_credentials", provider="custom",
                            token_url=tokens.url, client_id=tokens.client_id,
                            client_secret=Secret("app-secret-value"), ca_file=odc.ca_file,
                            request_timeout=0.3)
    ts = TokenSources([cfg], transports=Transports())
    async with run_proxy(odc, up_tls="implicit", auth="xoauth2", username="carol",
                         token_source="o365", verify=verify, token_for=ts.token) as r:
        slow = await asyncio.to_thread(logins, r.port, 5)       # past request_timeout
        assert all("[UNAVAILABLE]" in o for o in slow), slow
        await until(lambda: len(tokens.requests) == 1)          # one request for all five
    ts = TokenSources([dataclasses.replace(cfg, request_timeout=10.0)],
                      transports=Transports())
    async with run_proxy(odc, up_tls="implicit", auth="xoauth2", username="carol",
                         token_source="o365", verify=verify, token_for=ts.token) as r:
        assert await asyncio.to_thread(logins, r.port, 5) == ["OK"] * 5   # slow, in time
    assert len(tokens.requests) == 2
