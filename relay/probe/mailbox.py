"""``relay check`` for IMAP and POP3 upstreams: the proxy's own login, reported step by step.

The login is ``relay.proxy.upstream.login_upstream``, the code every proxy session runs;
this module only watches it (one Report step per stage), explains what failed (a
certificate failure names what the server presented, a refused login gets a provider
hint) and says LOGOUT/QUIT. It also fetches a server's certificate with verification off
(after STARTTLS where the protocol needs it), for SMTP upstreams too.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from relay.config.schema import Secret, UpstreamConfig
from relay.errors import OAuthError, ProxyUpstreamError, RelayError, TransportError
from relay.probe.hints import explain_login_reply
from relay.probe.steps import Report, close_quietly
from relay.proxy.pump import Channel
from relay.proxy.upstream import Stage, TokenFor, UpstreamCredentials, login_upstream
from relay.tls import classify_tls_error, server_name
from relay.transports.base import Transport


@dataclass(frozen=True, slots=True)
class Login:
    mechanism: Literal["none", "password", "xoauth2", "passthrough"]
    username: str = ""
    password: Secret | None = None
    token_source: str | None = None
    note: str = ""                  # where the credentials came from


async def walk_mailbox(report: Report, cfg: UpstreamConfig, transport: Transport,
                       ctx: ssl.SSLContext | None, login: Login, token_for: TokenFor,
                       token_detail: Callable[[str], str],
                       probe: Callable[[], Awaitable[bytes | None]], *,
                       provider: str = "") -> None:
    """TLS, greeting, capabilities, token, login, logout, as the proxy does them.

    ``transport`` hands out the connection the transport steps opened; ``probe`` fetches
    the server certificate unverified, to explain a certificate failure; ``provider``
    (``microsoft``, ``google``) when relay knows whose server it is, for the hints.
    """
    creds = None if login.mechanism in ("none", "passthrough") else \
        UpstreamCredentials(login.username, login.password, login.token_source)
    failures: list[Stage] = []

    def observe(stage: Stage) -> None:
        if stage.running:
            report.waiting(stage.name, stage.detail)
        elif stage.error is not None:
            failures.append(stage)
        elif stage.name == "token":
            report.passed("token", stage.seconds, token_detail(login.token_source or ""))
        elif stage.name == "auth":
            report.passed("auth", stage.seconds,
                          stage.detail + (f"; {login.note}" if login.note else ""))
        elif stage.name != "connect":         # the transport steps timed the connection
            report.passed(stage.name, stage.seconds, stage.detail)

    try:
        opened = await login_upstream(cfg, creds, transport=transport, token_for=token_for,
                                      tls_context=ctx, observer=observe, capability=True)
    except (TransportError, OAuthError, ProxyUpstreamError) as exc:
        await _failed(report, cfg, failures[0] if failures else None, exc, probe, provider)
        return
    except OSError as exc:                    # below the login's own classification
        report.failed("session", None, f"{cfg.protocol.upper()} session failed: {exc}",
                      reason="disconnected", hint="the server or the path to it (proxy) "
                      "dropped the session")
        return
    if creds is None:
        report.skipped("auth", login.note or "no credentials to test (auth = "
                       f"{login.mechanism})")
    await _logout(opened.channel, cfg.protocol)


async def _failed(report: Report, cfg: UpstreamConfig, stage: Stage | None,
                  exc: RelayError, probe: Callable[[], Awaitable[bytes | None]],
                  provider: str = "") -> None:
    """One failed step for the stage the login stopped at, explained for the operator."""
    step = stage.name if stage is not None else "auth"
    seconds = stage.seconds if stage is not None else None
    cause = exc.__cause__
    if isinstance(exc, TransportError) and isinstance(cause, ssl.SSLCertVerificationError):
        report.failed(step, seconds, classify_tls_error(cause, server_name(cfg), await probe()))
    elif isinstance(exc, ProxyUpstreamError) and exc.reply and step == "auth":
        doing = stage.detail if stage is not None else "login"
        report.failed(step, seconds, f"{doing} refused: {exc.reply[:200]}",
                      reason="auth_failed" if exc.credentials else exc.reason,
                      hint=explain_login_reply(exc.reply, provider) if exc.credentials
                      else exc.hint)
    elif isinstance(exc, ProxyUpstreamError) and exc.reply and step == "greeting":
        report.failed(step, seconds, f"unexpected greeting: {exc.reply[:200]}",
                      reason=exc.reason, hint="check the port and tls mode: it does not "
                      f"look like {cfg.protocol.upper()}")
    else:
        report.failed(step, seconds, exc)


async def _logout(channel: Channel, protocol: str) -> None:
    channel.write(b"R9 LOGOUT\r\n" if protocol == "imap" else b"QUIT\r\n")
    channel.close()
    await asyncio.wait([channel.closed], timeout=2)


async def probe_certificate(transport: Transport, cfg: UpstreamConfig) -> bytes | None:
    """The server certificate (DER), fetched with verification off; None if unreachable.

    IMAP and POP3 go through the proxy's login code, stopped before the login; SMTP says
    EHLO and STARTTLS itself.
    """
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(cfg.connect_timeout):
            if cfg.protocol == "smtp":
                return await _smtp_certificate(transport, cfg, ctx)
            opened = await login_upstream(cfg, None, transport=transport, tls_context=ctx)
            try:
                return _der(opened.channel.ssl_object())
            finally:
                opened.channel.abort()
    except (OSError, TimeoutError, ssl.SSLError, RelayError):
        return None


def _der(obj: ssl.SSLObject | None) -> bytes | None:
    der = obj.getpeercert(binary_form=True) if obj is not None else None
    return der if isinstance(der, bytes) else None


async def _smtp_certificate(transport: Transport, cfg: UpstreamConfig,
                            ctx: ssl.SSLContext) -> bytes | None:
    sock = await transport.connect(cfg.host, cfg.port, timeout=cfg.connect_timeout)
    implicit = cfg.tls == "implicit"
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=ctx if implicit else None,
        server_hostname=server_name(cfg) if implicit else None)
    try:
        if not implicit:
            await _smtp_reply(reader, b"220")
            for command, code in ((b"EHLO relay-check.invalid", b"250"), (b"STARTTLS", b"220")):
                writer.write(command + b"\r\n")
                await _smtp_reply(reader, code)
            await writer.start_tls(ctx, server_hostname=server_name(cfg))
        return _der(writer.get_extra_info("ssl_object"))
    finally:
        await close_quietly(writer)


async def _smtp_reply(reader: asyncio.StreamReader, code: bytes) -> None:
    """Read one (multi-line) SMTP reply; raise ConnectionError unless it has ``code``."""
    while True:
        line = await reader.readline()
        if len(line) < 4 or line[3:4] != b"-":
            if not line.startswith(code):
                raise ConnectionError(f"unexpected SMTP reply {line[:80]!r}")
            return
