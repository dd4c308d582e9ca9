"""``relay check`` for IMAP and POP3 upstreams: greeting, capabilities, STARTTLS, login.

Also fetches a server's certificate with verification off (after STARTTLS where the
protocol needs it), so a certificate failure can name what the server presented.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from relay.config.schema import Secret, UpstreamConfig
from relay.errors import OAuthError, TransportError
from relay.probe.hints import explain_login_reply
from relay.probe.steps import Report, close_quietly
from relay.sasl import xoauth2_string
from relay.tls import classify_tls_error, server_name, ssl_object_detail
from relay.transports.factory import connect_timed

TokenFor = Callable[[str], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Login:
    mechanism: Literal["none", "password", "xoauth2", "passthrough"]
    username: str = ""
    password: Secret | None = None
    token_source: str | None = None
    note: str = ""                  # where the credentials came from


class ProtocolFailure(Exception):
    def __init__(self, step: str, message: str, *, reason: str, hint: str = "") -> None:
        super().__init__(message)
        self.step, self.reason, self.hint = step, reason, hint


class _Conn:
    """Line I/O with a per-line timeout; commands carrying secrets are never echoed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout

    async def line(self) -> str:
        async with asyncio.timeout(self.timeout):
            raw = await self.reader.readline()
        if not raw:
            raise ConnectionError("the server closed the connection")
        return raw.decode("utf-8", "replace").rstrip("\r\n")

    async def send(self, text: str) -> None:
        self.writer.write(text.encode("utf-8") + b"\r\n")
        await self.writer.drain()


async def _imap_command(c: _Conn, tag: str, command: str) -> tuple[str, list[str]]:
    await c.send(f"{tag} {command}")
    untagged: list[str] = []
    while True:
        line = await c.line()
        if line.startswith(f"{tag} "):
            return line[len(tag) + 1:], untagged
        if line.startswith("+"):
            await c.send("")            # a challenge we do not answer (e.g. XOAUTH2 error)
        untagged.append(line)


async def _imap_caps(c: _Conn, tag: str) -> set[str]:
    status, lines = await _imap_command(c, tag, "CAPABILITY")
    caps: set[str] = set()
    for line in lines:
        if line.upper().startswith("* CAPABILITY "):
            caps |= set(line[13:].upper().split())
    if not status.upper().startswith("OK"):
        raise ProtocolFailure("capability", f"CAPABILITY refused: {status}", reason="protocol")
    return caps


async def _pop_command(c: _Conn, command: str, *, multiline: bool = False) -> tuple[str, list[str]]:
    await c.send(command)
    status = await c.line()
    while status.startswith("+ "):      # SASL challenge: answer empty to end the exchange
        await c.send("")
        status = await c.line()
    lines: list[str] = []
    if multiline and status.startswith("+OK"):
        while (line := await c.line()) != ".":
            lines.append(line[1:] if line.startswith("..") else line)
    return status, lines


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def _starttls(c: _Conn, cfg: UpstreamConfig, ctx: ssl.SSLContext) -> None:
    await c.writer.start_tls(ctx, server_hostname=server_name(cfg),
                             ssl_handshake_timeout=cfg.connect_timeout)


async def walk_mailbox(report: Report, cfg: UpstreamConfig, sock: Any,
                       ctx: ssl.SSLContext | None, login: Login, token_for: TokenFor,
                       token_detail: Callable[[str], str],
                       probe: Callable[[], Awaitable[bytes | None]]) -> None:
    """Greeting, capabilities, STARTTLS, login, logout: one Report step each.

    ``probe`` fetches the server certificate unverified, to explain a certificate failure.
    """
    imap = cfg.protocol == "imap"
    t0 = time.monotonic()
    step = "tls" if cfg.tls == "implicit" else "greeting"
    try:
        async with asyncio.timeout(cfg.connect_timeout):
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=ctx if cfg.tls == "implicit" else None,
                server_hostname=server_name(cfg) if cfg.tls == "implicit" else None)
        c = _Conn(reader, writer, cfg.command_timeout)
        if cfg.tls == "implicit":
            report.passed("tls", time.monotonic() - t0,
                          ssl_object_detail(writer.get_extra_info("ssl_object")))
        try:
            await _walk(report, cfg, c, ctx, login, token_for, token_detail, imap)
        finally:
            await close_quietly(writer)
    except ProtocolFailure as exc:
        report.failed(exc.step, None, str(exc), reason=exc.reason, hint=exc.hint)
    except ssl.SSLError as exc:
        elapsed = time.monotonic() - t0
        der = await probe() if isinstance(exc, ssl.SSLCertVerificationError) else None
        report.failed("tls", elapsed, classify_tls_error(exc, server_name(cfg), der))
    except (OSError, TimeoutError) as exc:
        last = report.steps[-1].step if report.steps else step
        what = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc}"
        report.failed(_next_step(last), None, f"{cfg.protocol.upper()} session {what}",
                      reason="timeout" if isinstance(exc, TimeoutError) else "disconnected",
                      hint="the server or the path to it (proxy) stalled or dropped the "
                           "session")


def _next_step(last: str) -> str:
    order = ["tcp", "channel", "socks5", "tls", "greeting", "capability", "starttls", "token",
             "auth"]
    return order[min(order.index(last) + 1, len(order) - 1)] if last in order else last


async def _walk(report: Report, cfg: UpstreamConfig, c: _Conn, ctx: ssl.SSLContext | None,
                login: Login, token_for: TokenFor, token_detail: Callable[[str], str],
                imap: bool) -> None:
    t = time.monotonic()
    greeting = await c.line()
    good = greeting.startswith(("* OK", "* PREAUTH")) if imap else greeting.startswith("+OK")
    if not good:
        raise ProtocolFailure("greeting", f"unexpected greeting: {greeting[:200]}",
                              reason="greeting_refused",
                              hint="check the port: it does not look like "
                                   f"{cfg.protocol.upper()}")
    report.passed("greeting", time.monotonic() - t, greeting[:120])

    async def caps() -> set[str]:
        if imap:
            return await _imap_caps(c, f"c{len(report.steps)}")
        _status, lines = await _pop_command(c, "CAPA", multiline=True)
        return {line.split()[0].upper() for line in lines if line.split()} | \
            {f"SASL={m.upper()}" for line in lines if line.upper().startswith("SASL ")
             for m in line.split()[1:]}

    t = time.monotonic()
    capabilities = await caps()
    report.passed("capability", time.monotonic() - t, " ".join(sorted(capabilities))[:160])
    if cfg.tls == "starttls":
        assert ctx is not None
        word = "STARTTLS" if imap else "STLS"
        if word not in capabilities:
            raise ProtocolFailure("tls", f"the server does not offer {word}",
                                  reason="starttls_unavailable",
                                  hint="relay never logs in over clear text to a starttls "
                                       "upstream; check the port and tls mode (993/995 are "
                                       "implicit TLS)")
        t = time.monotonic()
        if imap:
            status, _ = await _imap_command(c, "s1", "STARTTLS")
        else:
            status, _ = await _pop_command(c, "STLS")
        if not status.upper().startswith(("OK", "+OK")):
            raise ProtocolFailure("tls", f"{word} refused: {status[:200]}", reason="tls_failed")
        await _starttls(c, cfg, ctx)
        report.passed("tls", time.monotonic() - t,
                      ssl_object_detail(c.writer.get_extra_info("ssl_object")))
        capabilities = await caps()
    await _login(report, c, login, capabilities, token_for, token_detail, imap)
    await c.send("a9 LOGOUT" if imap else "QUIT")


async def _login(report: Report, c: _Conn, login: Login, capabilities: set[str],
                 token_for: TokenFor, token_detail: Callable[[str], str], imap: bool) -> None:
    if login.mechanism in ("none", "passthrough"):
        report.skipped("auth", login.note or "no credentials to test (auth = "
                       f"{login.mechanism})")
        return
    if login.mechanism == "xoauth2":
        assert login.token_source is not None
        t = time.monotonic()
        try:
            token = await token_for(login.token_source)
        except OAuthError as exc:
            report.failed("token", time.monotonic() - t, exc)
            return
        report.passed("token", time.monotonic() - t, token_detail(login.token_source))
        payload = xoauth2_string(login.username, token).decode()
        command = f"AUTHENTICATE XOAUTH2 {payload}" if imap else f"AUTH XOAUTH2 {payload}"
        how = "XOAUTH2"
    else:
        password = login.password.reveal() if login.password else ""
        if imap and "LOGINDISABLED" in capabilities:
            raise ProtocolFailure("auth", "the server refuses LOGIN here (LOGINDISABLED)",
                                  reason="auth_unavailable", hint="use TLS (tls = starttls)")
        plain = base64.b64encode(f"\0{login.username}\0{password}".encode()).decode()
        if imap:
            command = (f"AUTHENTICATE PLAIN {plain}" if "SASL-IR" in capabilities and
                       "AUTH=PLAIN" in capabilities else
                       f"LOGIN {_quote(login.username)} {_quote(password)}")
        else:
            command = f"AUTH PLAIN {plain}"
        how = "password"
    t = time.monotonic()
    if imap:
        status, _ = await _imap_command(c, "l1", command)
        ok = status.upper().startswith("OK")
    elif how == "password" and "SASL=PLAIN" not in capabilities:
        status, _ = await _pop_command(c, f"USER {login.username}")
        if status.startswith("+OK"):
            status, _ = await _pop_command(c, f"PASS {password}")
        ok = status.startswith("+OK")
    else:
        status, _ = await _pop_command(c, command)
        ok = status.startswith("+OK")
    if not ok:
        report.failed("auth", time.monotonic() - t,
                      f"login as {login.username!r} ({how}) refused: {status[:200]}",
                      reason="auth_failed", hint=explain_login_reply(status))
        return
    report.passed("auth", time.monotonic() - t, f"logged in as {login.username} ({how})"
                  + (f"; {login.note}" if login.note else ""))


async def probe_certificate(transport: Any, cfg: UpstreamConfig) -> bytes | None:
    """The server certificate (DER), fetched with verification off; None if unreachable."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(cfg.connect_timeout):
            sock, _ = await connect_timed(transport, cfg.host, cfg.port,
                                          timeout=cfg.connect_timeout)
            implicit = cfg.tls == "implicit"
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=ctx if implicit else None,
                server_hostname=server_name(cfg) if implicit else None)
            try:
                if not implicit:
                    c = _Conn(reader, writer, cfg.connect_timeout)
                    await _plain_starttls(c, cfg.protocol)
                    await writer.start_tls(ctx, server_hostname=server_name(cfg))
                obj = writer.get_extra_info("ssl_object")
                der = obj.getpeercert(binary_form=True) if obj is not None else None
                return der if isinstance(der, bytes) else None
            finally:
                await close_quietly(writer)
    except (OSError, TimeoutError, ssl.SSLError, TransportError, ProtocolFailure):
        return None


async def _plain_starttls(c: _Conn, protocol: str) -> None:
    async def final(prefix: str) -> str:
        while True:
            line = await c.line()
            if len(line) < 4 or line[3] != "-":
                if not line.startswith(prefix):
                    raise ProtocolFailure("tls", line, reason="tls_failed")
                return line
    if protocol == "smtp":
        await final("220")
        await c.send("EHLO relay-check.invalid")
        await final("250")
        await c.send("STARTTLS")
        await final("220")
    elif protocol == "imap":
        await c.line()
        status, _ = await _imap_command(c, "p1", "STARTTLS")
        if not status.upper().startswith("OK"):
            raise ProtocolFailure("tls", status, reason="tls_failed")
    else:
        await c.line()
        status, _ = await _pop_command(c, "STLS")
        if not status.startswith("+OK"):
            raise ProtocolFailure("tls", status, reason="tls_failed")
