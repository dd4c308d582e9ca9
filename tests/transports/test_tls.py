"""TLS failures classified against real handshakes on loopback (trustme certificates)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from relay.config.schema import UpstreamConfig
from relay.errors import TransportError
from relay.tls import cert_info, classify_tls_error, client_context

NAME = "mail.test.example"


@contextlib.asynccontextmanager
async def tls_server(cert: trustme.LeafCert | None) -> AsyncIterator[int]:
    """A server that greets after TLS (or in clear text when ``cert`` is None)."""
    ctx = None
    if cert is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            writer.write(b"220 hello\r\n")
            await writer.drain()
            await reader.read(100)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    async with server:
        yield server.sockets[0].getsockname()[1]


def upstream(ca_file: Path | None, **kw: object) -> UpstreamConfig:
    return UpstreamConfig(name="u", protocol="smtp", host="127.0.0.1", port=465,
                          tls="implicit", ca_file=ca_file, tls_server_name=NAME,
                          **kw)  # type: ignore[arg-type]


async def handshake(port: int, ctx: ssl.SSLContext) -> BaseException:
    with pytest.raises((ssl.SSLError, ConnectionError)) as info:
        await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=NAME)
    return info.value


async def test_unknown_ca(tmp_path: Path) -> None:
    trusted, other = trustme.CA(), trustme.CA()
    trusted.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf = other.issue_cert(NAME)
    async with tls_server(leaf) as port:
        exc = await handshake(port, client_context(upstream(tmp_path / "ca.pem")))
    presented = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    err = classify_tls_error(exc, NAME, presented)
    assert err.reason == "tls_certificate"
    assert "not trusted" in str(err) and "issued by" in str(err)
    assert "ca_file" in err.hint


async def test_expired_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    leaf = ca.issue_cert(NAME, not_before=past - dt.timedelta(days=30), not_after=past)
    async with tls_server(leaf) as port:
        exc = await handshake(port, client_context(upstream(tmp_path / "ca.pem")))
    err = classify_tls_error(exc, NAME)
    assert err.reason == "tls_certificate" and "has expired" in str(err)
    assert "clock" in err.hint


async def test_plain_text_port_is_a_handshake_failure(tmp_path: Path) -> None:
    async with tls_server(None) as port:
        exc = await handshake(port, client_context(upstream(None)))
    err = classify_tls_error(exc, NAME)
    assert err.reason == "tls_failed"
    assert "starttls" in err.hint


@pytest.mark.fast
def test_unreadable_ca_file(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(TransportError) as info:
        client_context(upstream(tmp_path / "bad.pem"))
    assert info.value.reason == "tls_config"


@pytest.mark.fast
def test_verify_off_is_per_upstream() -> None:
    ctx = client_context(upstream(None, verify_tls=False))
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    assert client_context(upstream(None)).verify_mode == ssl.CERT_REQUIRED


@pytest.mark.fast
def test_cert_info_reads_names_and_expiry() -> None:
    leaf = trustme.CA().issue_cert(NAME, "127.0.0.1")
    info = cert_info(ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode()))
    assert info.names == (NAME, "127.0.0.1")
    assert info.not_after.year >= 2999 and "trustme" in info.issuer
