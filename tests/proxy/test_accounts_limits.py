"""Unit tables: account mapping, users-file checks, failure tracking, limits, SASL strings."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from relay.config.schema import AccountConfig, Secret, UpstreamConfig
from relay.connlimits import ConnectionCounter, Limits
from relay.errors import ConfigError
from relay.proxy.accounts import (
    MappedAuthenticator,
    PassthroughAuthenticator,
    build_authenticator,
    users_file_verify,
)
from relay.proxy.upstream import UpstreamCredentials
from relay.sasl import SaslError, parse_plain, plain_string, xoauth2_string
from relay.users import UserDB, hash_password

pytestmark = pytest.mark.fast


def upstream(auth: str, **kw: object) -> UpstreamConfig:
    return UpstreamConfig(name="o365", protocol="imap", host="outlook.office365.com",
                          port=993, tls="implicit", auth=auth, **kw)  # type: ignore[arg-type]


async def yes(user: str, password: Secret) -> bool:
    return password.reveal() == "right"


ACCOUNTS = (
    AccountConfig(upstream="o365", user="agent1", username="sales@example.com",
                  token_source="sales"),
    AccountConfig(upstream="o365", username="shared@example.com", token_source="shared",
                  password=Secret("shared-pw")),
    AccountConfig(upstream="other", user="agent1", username="nope@example.com"),
)


@pytest.mark.parametrize(("auth", "user", "expected"), [
    ("xoauth2", "agent1", UpstreamCredentials("sales@example.com", token_source="sales")),
    ("xoauth2", "agent2", UpstreamCredentials("shared@example.com", token_source="shared")),
    ("password", "agent2", UpstreamCredentials("shared@example.com",
                                               password=Secret("shared-pw"))),
])
async def test_mapping(auth: str, user: str, expected: UpstreamCredentials) -> None:
    a = MappedAuthenticator(upstream=upstream(auth), accounts=ACCOUNTS, verify=yes)
    assert await a.login(user, Secret("right")) == expected
    assert await a.login(user, Secret("wrong")) is None
    assert "shared-pw" not in repr(expected)


async def test_mapping_errors_name_the_fix() -> None:
    a = MappedAuthenticator(upstream=upstream("password"), accounts=ACCOUNTS[:1], verify=yes)
    with pytest.raises(ConfigError, match="no password") as exc:
        await a.login("agent1", Secret("right"))
    assert "password" in exc.value.hint
    a = MappedAuthenticator(upstream=upstream("xoauth2"), accounts=(), verify=yes)
    with pytest.raises(ConfigError, match="no provider account"):
        await a.login("agent9", Secret("right"))
    with pytest.raises(ConfigError, match="cannot be used"):
        MappedAuthenticator(upstream=upstream("none"), accounts=(), verify=yes)
    with pytest.raises(ConfigError, match="users_file"):
        build_authenticator(upstream("password"), (), None)
    assert isinstance(build_authenticator(upstream("passthrough"), (), None),
                      PassthroughAuthenticator)


async def test_users_file_verify_checks_off_loop_and_caches_successes(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"agent1:{hash_password(b'agent-pw', n=2**10)}\n")
    path.chmod(0o600)
    db = UserDB.load(path)
    calls: list[str] = []

    class Counting:
        def verify_sync(self, name: str, password: bytes) -> bool:
            calls.append(name)
            return db.verify_sync(name, password)

    verify = users_file_verify(Counting(), cache_ttl=60)
    assert await verify("agent1", Secret("agent-pw"))
    assert await verify("agent1", Secret("agent-pw"))
    assert calls == ["agent1"]                       # the second check came from the cache
    assert not await verify("agent1", Secret("wrong"))
    assert not await verify("agent1", Secret("wrong"))
    assert not await verify("nobody", Secret("agent-pw"))
    assert calls == ["agent1", "agent1", "agent1", "nobody"]   # failures never cached


def test_session_counter() -> None:
    c = ConnectionCounter()
    limits = Limits(total=3, per_client=2)

    def admit(addr: str, lim: Limits = limits) -> str | None:
        return c.admit(addr, lim)[0]

    assert admit("a") is None and admit("a") is None
    assert admit("a") == "too_many_sessions_from_client"
    assert admit("b") is None
    assert admit("c") == "too_many_sessions"
    c.release("a")
    assert admit("c") is None
    # a reload's lower limits apply to the next admission; open ones keep their slots
    assert admit("d", Limits(total=1)) == "too_many_sessions"
    assert admit("d", Limits()) is None
    c.release("d")
    c.release("a")
    c.release("b")
    c.release("c")
    assert c.total == 0 and not c._per


def test_sasl_strings() -> None:
    assert base64.b64decode(xoauth2_string("u@example.com", "tok")) == \
        b"user=u@example.com\x01auth=Bearer tok\x01\x01"
    with pytest.raises(SaslError):
        xoauth2_string("u\x01@example.com", "tok")
    with pytest.raises(SaslError):
        xoauth2_string("u@example.com", "tok\r\n")
    assert parse_plain(base64.b64decode(plain_string("u", "p w"))) == ("u", "p w")
    with pytest.raises(SaslError):
        plain_string("u", "p\nw")
    with pytest.raises(SaslError):
        parse_plain(b"\x00u\x00")
    with pytest.raises(SaslError):
        parse_plain(b"\x00u\x00p\x00x")
