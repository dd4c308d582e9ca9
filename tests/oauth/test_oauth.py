"""Token sources against a local HTTPS token endpoint (and through Dante)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import os
import stat
import time
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from relay.config.schema import Secret, TokenSourceConfig
from relay.errors import OAuthError
from relay.metrics import Metrics
from relay.oauth.tokens import TokenSources, jwt_expiry
from relay.transports.factory import Transports
from tests.peers.dante import Dante
from tests.peers.token_server import TokenServer, token_server
from tests.transports.helpers import proxy_config


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def cc(srv: TokenServer, ca_file: Path, **kw: object) -> TokenSourceConfig:
    opts: dict[str, object] = dict(
        name="o365", kind="client_credentials", token_url=srv.url, tenant="tenant-id",
        client_id=srv.client_id, client_secret=Secret(srv.client_secret, "env O365_SECRET"),
        ca_file=ca_file)
    opts.update(kw)
    return TokenSourceConfig(**opts)  # type: ignore[arg-type]


def rt(srv: TokenServer, ca_file: Path, path: Path, **kw: object) -> TokenSourceConfig:
    opts: dict[str, object] = dict(name="mbx", kind="refresh_token", token_url=srv.url,
                                   client_id=srv.client_id, refresh_token_file=path,
                                   ca_file=ca_file)
    opts.update(kw)
    return TokenSourceConfig(**opts)  # type: ignore[arg-type]


async def test_client_credentials_cached_and_refreshed_before_expiry(
        ca: trustme.CA, ca_file: Path) -> None:
    clock = Clock()
    metrics = Metrics()
    with token_server(ca, expires_in=900) as srv:
        sources = TokenSources([cc(srv, ca_file, refresh_margin=300.0)],
                               transports=Transports(), metrics=metrics, clock=clock)
        first = await sources.token("o365")
        assert first == srv.issued[0]
        req = srv.requests[0]
        assert req["grant_type"] == "client_credentials"
        assert req["scope"] == "https://outlook.office365.com/.default"
        assert req["client_secret"] == srv.client_secret
        clock.now += 500          # 400 s left: more than the margin, still cached
        assert await sources.token("o365") == first and len(srv.requests) == 1
        assert metrics.registry.get_sample_value(
            "relay_oauth_token_expiry_seconds", {"source": "o365"}) == pytest.approx(400)
        clock.now += 150          # 250 s left: inside the margin, refreshed early
        second = await sources.token("o365")
        assert second != first and len(srv.requests) == 2
        assert sources.expires_at("o365") == pytest.approx(clock.now + 900)


async def test_concurrent_callers_share_one_request(ca: trustme.CA, ca_file: Path) -> None:
    with token_server(ca, delay=0.2, chunked=True) as srv:
        sources = TokenSources([cc(srv, ca_file)], transports=Transports())
        tokens = await asyncio.gather(*(sources.token("o365") for _ in range(10)))
    assert set(tokens) == {srv.issued[0]} and len(srv.requests) == 1


async def test_refresh_token_rotation_is_persisted(ca: trustme.CA, ca_file: Path,
                                                   tmp_path: Path) -> None:
    path = tmp_path / "refresh_token"
    path.write_text("rt-initial\n")
    clock = Clock()
    with token_server(ca, expires_in=3600) as srv:
        sources = TokenSources([rt(srv, ca_file, path)], transports=Transports(), clock=clock)
        await sources.token("mbx")
        assert srv.requests[0]["refresh_token"] == "rt-initial"
        assert srv.requests[0]["scope"] == "https://outlook.office365.com/.default"
        rotated = path.read_text().strip()
        assert rotated.startswith("rt-rotated-")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        clock.now += 3500
        await sources.token("mbx")
        assert srv.requests[1]["refresh_token"] == rotated   # the old one is no longer valid
        # a restarted relay reads the persisted one
        fresh = TokenSources([rt(srv, ca_file, path)], transports=Transports(), clock=clock)
        await fresh.token("mbx")
    assert len(srv.requests) == 3


async def test_invalid_client_is_explained(ca: trustme.CA, ca_file: Path) -> None:
    with token_server(ca) as srv:
        cfg = cc(srv, ca_file, client_secret=Secret("expired-secret-value", "env X"))
        sources = TokenSources([cfg], transports=Transports())
        with pytest.raises(OAuthError) as info:
            await sources.token("o365")
    err = info.value
    assert err.error == "invalid_client"
    assert "AADSTS7000215" in err.description
    assert "secret is wrong or has expired" in err.hint
    assert "value (not the secret id)" in err.hint
    assert "invalid_client" in str(err) and "Trace ID" not in str(err)


async def test_invalid_grant_asks_for_reconsent(ca: trustme.CA, ca_file: Path,
                                                tmp_path: Path) -> None:
    path = tmp_path / "refresh_token"
    path.write_text("rt-revoked\n")
    with token_server(ca) as srv:
        sources = TokenSources([rt(srv, ca_file, path)], transports=Transports())
        with pytest.raises(OAuthError) as info:
            await sources.token("mbx")
    assert info.value.error == "invalid_grant"
    assert "re-consent" in info.value.hint and "inactivity" in info.value.hint
    assert path.read_text() == "rt-revoked\n"


async def test_unknown_client_id_is_unauthorized_client(ca: trustme.CA, ca_file: Path) -> None:
    with token_server(ca) as srv:
        sources = TokenSources([cc(srv, ca_file, client_id="wrong")], transports=Transports())
        with pytest.raises(OAuthError) as info:
            await sources.token("o365")
    assert info.value.error == "unauthorized_client"
    assert "wrong client_id or tenant" in info.value.hint


def make_cert(tmp: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay-app")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "app.crt", tmp / "app.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_certificate_client_assertion(ca: trustme.CA, ca_file: Path,
                                            tmp_path: Path) -> None:
    cert_file, key_file = make_cert(tmp_path)
    with token_server(ca, certificate_pem=cert_file.read_bytes()) as srv:
        cfg = cc(srv, ca_file, client_secret=None, certificate_file=cert_file,
                 certificate_key_file=key_file)
        assert await TokenSources([cfg], transports=Transports()).token("o365")
        form = srv.requests[0]
        assert "client_secret" not in form
        assert form["client_assertion_type"].endswith("jwt-bearer")
        header = json.loads(jwt_b64(form["client_assertion"].split(".")[0]))
        assert header["alg"] == "RS256" and header["x5t"]
        # a different key is refused by the endpoint: invalid_client, explained
        (tmp_path / "other").mkdir()
        other_cert, _ = make_cert(tmp_path / "other")
        srv.certificate_pem = other_cert.read_bytes()
        with pytest.raises(OAuthError) as info:
            await TokenSources([cfg], transports=Transports()).token("o365")
    assert "certificate is not registered" in info.value.hint


def jwt_b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


async def test_token_request_goes_through_dante(ca: trustme.CA, ca_file: Path,
                                                dante_proxy: Dante) -> None:
    with token_server(ca) as srv:
        transports = Transports([proxy_config(dante_proxy)])
        sources = TokenSources([cc(srv, ca_file, via="dante")], transports=transports)
        assert await sources.token("o365") == srv.issued[0]
    assert f"127.0.0.1.{srv.port}" in dante_proxy.log.read_text()


async def test_proxy_failure_on_token_request_is_an_oauth_error(
        ca: trustme.CA, ca_file: Path, dante_proxy: Dante) -> None:
    with token_server(ca) as srv:
        transports = Transports([proxy_config(dante_proxy, password="nope")])
        sources = TokenSources([cc(srv, ca_file, via="dante")], transports=transports)
        with pytest.raises(OAuthError) as info:
            await sources.token("o365")
    assert info.value.error == "proxy_auth_failed"
    assert "SOCKS : authentication failed" in str(info.value)


async def test_failed_early_refresh_keeps_the_valid_token(ca: trustme.CA,
                                                          ca_file: Path) -> None:
    clock = Clock()
    with token_server(ca, expires_in=900) as srv:
        sources = TokenSources([cc(srv, ca_file)], transports=Transports(), clock=clock)
        first = await sources.token("o365")
        srv.client_secret = "rotated-by-admin"
        clock.now += 700                       # inside the margin, not yet expired
        assert await sources.token("o365") == first
        clock.now += 300                       # expired: now the failure surfaces
        with pytest.raises(OAuthError):
            await sources.token("o365")


async def test_a_slow_token_endpoint_times_out_once_for_every_waiting_caller(
        ca: trustme.CA, ca_file: Path) -> None:
    with token_server(ca, delay=3.0) as srv:
        sources = TokenSources([cc(srv, ca_file, request_timeout=0.3)], transports=Transports())
        started = time.monotonic()
        outcomes = await asyncio.gather(*(sources.token("o365") for _ in range(5)),
                                        return_exceptions=True)
        assert time.monotonic() - started < 2.5
        assert all(isinstance(o, OAuthError) for o in outcomes), outcomes
        assert "timed out" in str(outcomes[0]) and "token endpoint" in str(outcomes[0])
        srv.delay = 0.0
        assert await sources.token("o365") == srv.issued[-1]
    assert len(srv.requests) <= 2          # the timed-out request, maybe, and the good one


async def test_setting_the_clock_back_does_not_keep_an_expired_token(
        ca: trustme.CA, ca_file: Path) -> None:
    wall, mono = Clock(), Clock()
    with token_server(ca, expires_in=900) as srv:
        sources = TokenSources([cc(srv, ca_file)], transports=Transports(), clock=wall,
                               monotonic=mono)
        first = await sources.token("o365")
        wall.now -= 2 * 86400                  # the wall clock is set back two days
        mono.now += 1000                       # while the token's 900 s really ran out
        second = await sources.token("o365")
        assert second != first and len(srv.requests) == 2
        wall.now += 4 * 86400                  # and forward: one refresh, no more
        mono.now += 10
        third = await sources.token("o365")
        assert len(srv.requests) == 3
        assert await sources.token("o365") == third and len(srv.requests) == 3


@pytest.mark.fast
async def test_static_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("static-token-one\n")
    clock = Clock()
    cfg = TokenSourceConfig(name="st", kind="static", token_file=path)
    sources = TokenSources([cfg], transports=Transports(), clock=clock)
    assert await sources.token("st") == "static-token-one"
    path.write_text(json.dumps({"access_token": "static-token-two-longer",
                                "expires_at": clock.now + 60}))
    assert await sources.token("st") == "static-token-two-longer"
    assert sources.expires_at("st") == clock.now + 60
    clock.now += 61
    with pytest.raises(OAuthError) as info:
        await sources.token("st")
    assert info.value.error == "expired"


@pytest.mark.fast
def test_jwt_expiry() -> None:
    claims = base64.urlsafe_b64encode(json.dumps({"exp": 1234}).encode()).rstrip(b"=")
    assert jwt_expiry(f"e30.{claims.decode()}.sig") == 1234
    assert jwt_expiry("opaque") is None


async def test_no_secret_or_token_is_ever_logged(ca: trustme.CA, ca_file: Path,
                                                 tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "refresh_token"
    path.write_text("rt-initial\n")
    clock = Clock()
    with token_server(ca, expires_in=400) as srv:
        good = TokenSources([cc(srv, ca_file), rt(srv, ca_file, path)],
                            transports=Transports(), clock=clock)
        await good.token("o365")
        await good.token("mbx")
        clock.now += 200
        await good.token("mbx")
        bad = TokenSources([cc(srv, ca_file, client_secret=Secret("bad-secret-xyz", "e"))],
                           transports=Transports())
        with pytest.raises(OAuthError):
            await bad.token("o365")
        path.write_text("rt-revoked-abc\n")
        with pytest.raises(OAuthError):
            await TokenSources([rt(srv, ca_file, path)], transports=Transports()).token("mbx")
    secrets = [srv.client_secret, "bad-secret-xyz", "rt-initial", "rt-revoked-abc",
               *srv.issued, *srv.refresh_tokens, *(r.get("refresh_token", "")
                                                    for r in srv.requests)]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "token source" in text           # it did log
    for s in filter(None, secrets):
        assert s not in text, f"secret leaked into the log: {s[:6]}..."
