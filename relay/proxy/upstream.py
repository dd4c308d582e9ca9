"""Logging in to the provider's IMAP/POP3 server: transport, TLS, greeting, LOGIN or XOAUTH2.

``login_upstream`` connects through the upstream's ``Transport``, does implicit TLS or
STARTTLS/STLS as configured, and authenticates with the mapped credentials: a password
(IMAP LOGIN, or AUTHENTICATE PLAIN for non-ASCII credentials; POP3 USER/PASS) or an
OAuth2 bearer token (IMAP AUTHENTICATE XOAUTH2, POP3 AUTH XOAUTH2). It returns the
``Channel`` ready to be spliced, with what the client must see of the provider's login
reply (its capabilities). Each stage's duration is recorded.

This is the one implementation of that login: the proxy runs it for every session, and
``relay check`` runs it too, watching each stage through an ``Observer`` and asking for
the capabilities before login (``capability=True``), which the proxy does not need.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from relay.config.schema import Secret, UpstreamConfig
from relay.errors import OAuthError, ProxyUpstreamError, RelayError, TransportError
from relay.maillog import censor
from relay.metrics import Metrics
from relay.proxy.pump import Channel, ChannelClosed, LineTooLong
from relay.proxy.stages import Observer, Progress, Stage
from relay.sasl import SaslError, plain_string, xoauth2_string
from relay.tls import classify_tls_error, client_context, server_name, ssl_object_detail
from relay.transports.base import Transport

TokenFor = Callable[[str], Awaitable[str]]
_CAPA_CODE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
_LINE_LIMIT = 65536


@dataclass(frozen=True, slots=True)
class UpstreamCredentials:
    """Who relay is toward the provider: a password, or a token source for XOAUTH2."""

    username: str
    password: Secret | None = None
    token_source: str | None = None

    def __repr__(self) -> str:
        how = f"token_source={self.token_source}" if self.token_source else "password"
        return f"UpstreamCredentials({self.username!r}, {how})"


@dataclass(slots=True)
class UpstreamLogin:
    """A logged-in provider connection and what the client must be told about it."""

    channel: Channel
    capability: str | None = None      # IMAP: the provider's post-login capabilities
    untagged: bytes = b""              # IMAP: untagged lines that came with the login reply
    stages: dict[str, float] = field(default_factory=dict)


# Refusals that are not about the credentials (RFC 5530, RFC 3206): never the client's fault.
_NOT_CREDENTIALS = (b"[PRIVACYREQUIRED]", b"[UNAVAILABLE]", b"[SYS/TEMP]", b"[SYS/PERM]",
                    b"[IN-USE]", b"[LIMIT]", b"[SERVERBUG]", b"[CONTACTADMIN]")


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace").strip()


def _refused(cfg: UpstreamConfig, reply: bytes, *, credentials: bool) -> ProxyUpstreamError:
    text = censor(_text(reply))
    upper = reply.upper()
    if credentials and any(code in upper for code in _NOT_CREDENTIALS):
        why = "privacy_required" if b"[PRIVACYREQUIRED]" in upper else "provider_unavailable"
        hint = ("the provider wants TLS before login: set tls = \"starttls\" or "
                "\"implicit\" on the upstream" if why == "privacy_required" else
                "the provider refused for a reason other than the credentials (busy, "
                "in use, limits); see its reply")
        return ProxyUpstreamError(f"upstream {cfg.name} refused the login: {text}",
                                  reason=why, reply=text, credentials=False, hint=hint)
    hint = ("check the mapped account's password or token source; for Exchange Online, "
            "IMAP/POP3 must be enabled for the mailbox and the app must hold "
            "IMAP.AccessAsApp/POP.AccessAsApp" if credentials else
            "the provider did not follow the protocol; check host, port and tls mode")
    return ProxyUpstreamError(f"upstream {cfg.name} refused the login: {text}",
                              reason="auth_refused" if credentials else "protocol",
                              reply=text, credentials=credentials, hint=hint)


async def _line(ch: Channel) -> bytes:
    return await ch.read_line(_LINE_LIMIT)


async def _imap(ch: Channel, tag: bytes, command: bytes, *,
                cont: Callable[[bytes], bytes] | None = None) -> tuple[bytes, list[bytes]]:
    """Send a command; return the tagged reply line and the untagged lines before it."""
    ch.write(tag + b" " + command + b"\r\n")
    untagged: list[bytes] = []
    while True:
        line = await _line(ch)
        if line.startswith(tag + b" "):
            return line, untagged
        if line.startswith(b"+"):
            ch.write((cont(line) if cont else b"") + b"\r\n")   # empty answer aborts/ends
        else:
            untagged.append(line)


def _imap_ok(line: bytes, tag: bytes) -> bool:
    return line[len(tag) + 1:len(tag) + 4].upper() == b"OK "


async def _pop3(ch: Channel, command: bytes) -> bytes:
    ch.write(command + b"\r\n")
    return await _line(ch)


def _mechanism(protocol: str, creds: UpstreamCredentials, *, token: bool) -> str:
    """How the login authenticates ``creds``: the command (or SASL mechanism) it sends.

    IMAP: LOGIN, or AUTHENTICATE PLAIN when the credentials are not printable ASCII;
    POP3: USER/PASS, or AUTH PLAIN for a user name with a space or non-ASCII credentials;
    XOAUTH2 for a token.
    """
    if token:
        return "XOAUTH2"
    assert creds.password is not None
    both = creds.username + creds.password.reveal()
    if protocol == "imap":
        return "LOGIN" if both.isascii() and both.isprintable() else "AUTHENTICATE PLAIN"
    return "AUTH PLAIN" if " " in creds.username or not both.isascii() else "USER/PASS"


async def _capabilities(cfg: UpstreamConfig, ch: Channel, greeting: bytes) -> str:
    """What the server offers before login (IMAP: the greeting's code, else CAPABILITY;
    POP3: CAPA). Only reported, never used by the login."""
    if cfg.protocol == "imap":
        code = _CAPA_CODE.search(greeting)
        if code:
            return f"{code.group(1).decode('ascii', 'replace')} (in the greeting)"
        line, untagged = await _imap(ch, b"R0", b"CAPABILITY")
        if not _imap_ok(line, b"R0"):
            return f"CAPABILITY refused: {_text(line)}"
        return " ".join(_text(u)[13:] for u in untagged if u[:13].upper() == b"* CAPABILITY ")
    line = await _pop3(ch, b"CAPA")
    if not line.startswith(b"+OK"):
        return f"CAPA refused: {_text(line)}"
    offered: list[str] = []
    while (entry := _text(await _line(ch))) != ".":
        offered.append(entry)
    return ", ".join(offered)


async def _starttls(cfg: UpstreamConfig, ch: Channel, ctx: ssl.SSLContext | None) -> None:
    if cfg.protocol == "imap":
        line, _ = await _imap(ch, b"R1", b"STARTTLS")
        ok = _imap_ok(line, b"R1")
    else:
        line = await _pop3(ch, b"STLS")
        ok = line.startswith(b"+OK")
    if not ok:
        word = "STARTTLS" if cfg.protocol == "imap" else "STLS"
        raise ProxyUpstreamError(f"upstream {cfg.name} refused {word}: {_text(line)}",
                                 reason="starttls", hint="set tls = \"implicit\" or "
                                 "\"none\" to match what the server offers")
    await _tls(cfg, ch, ctx)


async def _imap_login(cfg: UpstreamConfig, ch: Channel, creds: UpstreamCredentials,
                      token: str | None, how: str, sasl_ir: bool,
                      result: UpstreamLogin) -> None:
    tag = b"R2"
    if token is not None:
        ir = xoauth2_string(creds.username, token)
        if sasl_ir:
            line, untagged = await _imap(ch, tag, b"AUTHENTICATE XOAUTH2 " + ir)
        else:
            sent = [False]

            def answer(_challenge: bytes) -> bytes:
                if sent[0]:
                    return b""            # the error challenge: an empty line ends it
                sent[0] = True
                return ir
            line, untagged = await _imap(ch, tag, b"AUTHENTICATE XOAUTH2", cont=answer)
    else:
        assert creds.password is not None
        user, password = creds.username, creds.password.reveal()
        if how == "LOGIN":
            def quote(s: str) -> bytes:
                return b'"' + s.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
            line, untagged = await _imap(ch, tag, b"LOGIN " + quote(user) + b" " + quote(password))
        else:
            payload = plain_string(user, password)
            line, untagged = await _imap(ch, tag, b"AUTHENTICATE PLAIN",
                                         cont=lambda _c: payload)
    if not _imap_ok(line, tag):
        no = line[len(tag) + 1:len(tag) + 4].upper() == b"NO "
        raise _refused(cfg, line, credentials=no)
    code = _CAPA_CODE.search(line)
    if code:
        result.capability = code.group(1).decode("ascii", "replace")
    elif not any(u[:13].upper() == b"* CAPABILITY " for u in untagged):
        _, capa_untagged = await _imap(ch, b"R3", b"CAPABILITY")
        untagged += capa_untagged
    result.untagged = b"".join(untagged)


async def _pop3_login(cfg: UpstreamConfig, ch: Channel, creds: UpstreamCredentials,
                      token: str | None, how: str) -> None:
    if token is not None:
        line = await _pop3(ch, b"AUTH XOAUTH2")
        if line.startswith(b"+ ") or line.rstrip() == b"+":
            line = await _pop3(ch, xoauth2_string(creds.username, token))
            if line.startswith(b"+ ") or line.rstrip() == b"+":
                line = await _pop3(ch, b"")        # the error challenge: an empty line ends it
    else:
        assert creds.password is not None
        user, password = creds.username, creds.password.reveal()
        if how == "AUTH PLAIN":
            line = await _pop3(ch, b"AUTH PLAIN")
            if line.startswith(b"+"):
                line = await _pop3(ch, plain_string(user, password))
        else:
            line = await _pop3(ch, b"USER " + user.encode())
            if line.startswith(b"+OK"):
                line = await _pop3(ch, b"PASS " + password.encode())
    if not line.startswith(b"+OK"):
        raise _refused(cfg, line, credentials=line.startswith(b"-ERR"))


async def _tls(cfg: UpstreamConfig, ch: Channel, ctx: ssl.SSLContext | None) -> None:
    name = server_name(cfg)
    ctx = ctx or client_context(cfg)
    try:
        await ch.start_tls(ctx, server_side=False, server_hostname=name,
                           timeout=cfg.connect_timeout)
    except (ssl.SSLError, TimeoutError, ConnectionError) as exc:
        raise classify_tls_error(exc, name) from exc


def _classified(cfg: UpstreamConfig, exc: BaseException) -> RelayError | None:
    """The error ``login_upstream`` raises for ``exc`` (None: let it through as it is)."""
    if isinstance(exc, (TransportError, OAuthError, ProxyUpstreamError)):
        return exc
    if isinstance(exc, TimeoutError):
        return ProxyUpstreamError(f"upstream {cfg.name} did not answer within "
                                  f"{cfg.command_timeout:g}s", reason="timeout",
                                  hint="the provider or the tunnel is stalled")
    if isinstance(exc, (ChannelClosed, LineTooLong)):
        return ProxyUpstreamError(f"upstream {cfg.name} closed the connection or sent "
                                  f"garbage during login: {exc}", reason="protocol",
                                  hint="check host, port, protocol and tls mode")
    if isinstance(exc, SaslError):
        return ProxyUpstreamError(f"upstream {cfg.name}: cannot encode credentials: {exc}",
                                  reason="protocol", hint="check the mapped user name")
    return None


async def login_upstream(cfg: UpstreamConfig, creds: UpstreamCredentials | None, *,
                         transport: Transport, token_for: TokenFor | None = None,
                         tls_context: ssl.SSLContext | None = None,
                         metrics: Metrics | None = None, observer: Observer | None = None,
                         capability: bool = False) -> UpstreamLogin:
    """Connect to ``cfg`` through ``transport`` and log in as ``creds``.

    Raises TransportError (connect/TLS), OAuthError (token), or ProxyUpstreamError
    (provider refused, timed out or spoke nonsense). The token is fetched while the
    connection is being made.

    For ``relay check``: ``observer`` is told of each stage as it ends (``Stage``), the
    failed one included; ``capability`` asks for the capabilities after the greeting and
    reports them (the login itself does not use them); ``creds=None`` stops once the
    session is ready for a login (TLS up), for upstreams whose credentials are the
    clients' own. The proxy passes none of these.
    """
    loop = asyncio.get_running_loop()
    token_task: asyncio.Future[str] | None = None
    fetched: list[float] = []                   # how long the token fetch took
    source = creds.token_source if creds is not None else None
    if source is not None:
        if token_for is None:
            raise OAuthError(f"upstream {cfg.name}: no token provider wired for "
                             f"{source}", hint="this is a relay wiring bug")
        get = token_for

        async def fetch() -> str:
            started = time.monotonic()
            try:
                return await get(source)
            finally:
                fetched.append(time.monotonic() - started)
        token_task = asyncio.ensure_future(fetch())
    progress = Progress(cfg, metrics, observer)
    ch: Channel | None = None
    try:
        sock = await transport.connect(cfg.host, cfg.port, timeout=cfg.connect_timeout)
        progress.metric("connect")
        progress.done(lambda: f"connected to {cfg.host}:{cfg.port}")
        implicit = cfg.tls == "implicit"
        name = server_name(cfg)
        ctx = tls_context or (client_context(cfg) if cfg.tls != "none" else None)
        progress.begin("tls" if implicit else "greeting")
        try:
            _, ch = await loop.create_connection(
                Channel, sock=sock,
                ssl=ctx if implicit else None,
                server_hostname=name if implicit else None,
                ssl_handshake_timeout=cfg.connect_timeout if implicit else None)
        except (ssl.SSLError, TimeoutError, ConnectionError) as exc:
            sock.close()
            raise classify_tls_error(exc, name) from exc
        channel = ch
        if implicit:
            progress.metric("tls")
            progress.done(lambda: ssl_object_detail(channel.ssl_object()))
            progress.begin("greeting")
        result = UpstreamLogin(channel=ch, stages=progress.stages)
        async with asyncio.timeout(cfg.command_timeout):
            greeting = await _line(ch)
            ok = b"* OK" if cfg.protocol == "imap" else b"+OK"
            if not greeting.upper().startswith(ok):
                raise _refused(cfg, greeting, credentials=False)
            progress.metric("greeting")
            progress.done(lambda: _text(greeting)[:120])
            if capability:
                progress.begin("capability")
                offered = await _capabilities(cfg, ch, greeting)
                progress.done(lambda: offered[:200])
            token: str | None = None
            if token_task is not None:
                progress.begin("token", f"access token from {source}")
                token = await token_task
                progress.done(lambda: f"access token from {source}", seconds=fetched[0])
            caps = _CAPA_CODE.search(greeting)
            sasl_ir = caps is not None and b"SASL-IR" in caps.group(1).upper().split()
            if cfg.tls == "starttls":
                progress.begin("tls")
                await _starttls(cfg, ch, ctx)
                progress.done(lambda: ssl_object_detail(channel.ssl_object()))
                sasl_ir = False               # capabilities before TLS no longer count
            if creds is None:
                return result
            how = _mechanism(cfg.protocol, creds, token=token is not None)
            progress.begin("auth", f"login as {creds.username!r} ({how})")
            if cfg.protocol == "imap":
                await _imap_login(cfg, ch, creds, token, how, sasl_ir, result)
            else:
                await _pop3_login(cfg, ch, creds, token, how)
            progress.metric("auth")
            progress.done(lambda: f"logged in as {creds.username} ({how})")
        return result
    except BaseException as exc:
        if token_task is not None and not token_task.done():
            token_task.cancel()
        if ch is not None:
            ch.abort()
        error = _classified(cfg, exc)
        if error is None:
            raise
        progress.failed(error, fetched[0] if progress.current == "token" and fetched else None)
        if error is exc:
            raise
        raise error from exc


__all__ = ["Observer", "Stage", "TokenFor", "TransportError", "UpstreamCredentials",
           "UpstreamLogin", "login_upstream"]
