"""One upstream SMTP session: transport connect, TLS, greeting/EHLO, AUTH, timed and classified.

Used by the SMTP courier (``relay.outbound.smtp_courier``) and by ``relay check``.
Every failure to set up a session raises ``SessionError`` (a transient
``DeliveryError`` with a bounded ``reason`` and an operator hint) or the transport's
``TransportError``; neither ever bounces mail.
Commands after set-up return ``Reply`` objects so the caller classifies them per
recipient. Secrets (passwords, tokens, AUTH payloads) are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiosmtplib

from relay.config.schema import Secret, UpstreamConfig
from relay.errors import DeliveryError, OAuthError
from relay.outbound.wire import (
    Reply,
    Wire,
    WireError,
    command_line,
    dot_stuff,
    has_bare_cr_or_lf,
    printable,
)
from relay.sasl import xoauth2_string
from relay.timing import StageTimer
from relay.tls import classify_tls_error, load_client_context, split_handshake, ssl_cause
from relay.transports.base import Transport

TokenFor = Callable[[str], Awaitable[str]]


_EXCHANGE_535_HINT = (
    "the provider refused the credentials. For Exchange Online (535 5.7.139/5.7.3): SMTP "
    "AUTH may be disabled for the mailbox or tenant (Set-CASMailbox -SmtpClientAuthenticationD"
    "isabled $false), security defaults may block basic auth, or the app lacks SMTP.SendAsApp"
    "; consider auth = \"xoauth2\"")


class SessionError(DeliveryError):
    """An upstream session could not be set up or broke; always transient for delivery.

    ``unknown``: the session broke after the whole message was sent and before the
    provider's reply, so the provider may have accepted it (a retry may duplicate it).
    """

    def __init__(self, message: str, *, reason: str, stage: str, reply: str = "",
                 hint: str = "", unknown: bool = False) -> None:
        super().__init__(printable(message), permanent=False, reply=printable(reply),
                         reason=reason, hint=hint)
        self.stage = stage
        self.unknown = unknown


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who relay is toward the provider for one session (``relay.outbound.attempt``)."""

    mechanism: Literal["none", "password", "xoauth2"] = "none"
    username: str = ""
    password: Secret | None = None
    token_source: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        """Pool key: sessions are only reused for the same identity."""
        return (self.mechanism, self.username, self.token_source or "")


def _tls_error(upstream: UpstreamConfig, exc: BaseException, server_name: str) -> SessionError:
    """The one explanation of TLS failures (``relay.tls``), naming the upstream."""
    err = classify_tls_error(ssl_cause(exc) or exc, server_name)
    return SessionError(f"{upstream.name} ({upstream.host}:{upstream.port}): {err}",
                        reason=err.reason, stage="tls", hint=err.hint)


class SmtpSession:
    """A set-up SMTP session to one upstream, ready for MAIL transactions."""

    def __init__(self, upstream: UpstreamConfig, smtp: aiosmtplib.SMTP,
                 credentials: Credentials) -> None:
        self.upstream = upstream
        self.credentials = credentials
        self._smtp = smtp
        self._wire: Wire | None = None   # the byte pump once set up (``relay.outbound.wire``)
        self.greeting = ""
        self.ehlo_reply = ""
        self.tls_info: dict[str, Any] = {}
        self.messages = 0          # transactions started on this session
        self.dirty = False         # a transaction was begun and not finished: RSET first
        self.idle_since = 0.0      # loop time it was last returned to the pool
        self.broken = False        # set on any protocol-level failure: never reuse
        self.discarded = False     # set by the delivery pool once it let go of the session

    # ---- set-up ------------------------------------------------------------------------

    @classmethod
    async def open(cls, upstream: UpstreamConfig, *, transport: Transport, helo_name: str,
                   credentials: Credentials, timer: StageTimer,
                   token_for: TokenFor | None = None,
                   log: logging.Logger | None = None) -> SmtpSession:
        """Connect through ``transport`` and take the session through TLS, EHLO and AUTH.

        Stages land in ``timer``: connect, tls, greeting (with EHLO), auth (token fetch
        included). With implicit TLS the handshake's end is stamped by the context's
        ``sslobject_class``, which splits the one connect call into tls and greeting.
        """
        log = log or logging.getLogger("relay.delivery")
        server_name = upstream.tls_server_name or upstream.host
        ctx: ssl.SSLContext | None = None
        if upstream.tls != "none":
            ctx = await load_client_context(upstream)
            if not upstream.verify_tls:
                log.warning("upstream %s: TLS certificate verification is OFF (verify_tls = "
                            "false); this connection can be intercepted", upstream.name)
        with timer.stage("connect"):
            sock = await transport.connect(upstream.host, upstream.port,
                                           timeout=upstream.connect_timeout)
        smtp = aiosmtplib.SMTP(hostname=server_name, timeout=upstream.command_timeout,
                               local_hostname=helo_name)
        session = cls(upstream, smtp, credentials)
        try:
            await session._setup(sock, ctx, server_name, timer, token_for)
            session._take_over()
        except BaseException:
            session.close()
            raise
        return session

    async def _setup(self, sock: Any, ctx: ssl.SSLContext | None, server_name: str,
                     timer: StageTimer, token_for: TokenFor | None) -> None:
        up = self.upstream
        implicit = up.tls == "implicit"
        try:
            with split_handshake(timer, ctx if implicit else None):
                resp = await self._smtp.connect(
                    sock=sock, use_tls=implicit, start_tls=False, tls_context=ctx,
                    timeout=up.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise SessionError(
                f"{up.name} refused the session at greeting: {exc.code} {exc.message}",
                reason="greeting_refused", stage="greeting", reply=f"{exc.code} {exc.message}",
                hint="the provider is busy or refuses this relay's address; mail is "
                     "deferred and retried") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            if implicit and ssl_cause(exc) is not None:
                raise _tls_error(up, exc, server_name) from exc
            raise self._broken("greeting", exc) from exc
        self.greeting = f"{resp.code} {resp.message}"
        await self._ehlo(timer)
        if up.tls == "starttls":
            if not self._smtp.supports_extension("starttls"):
                raise SessionError(
                    f"{up.name} does not offer STARTTLS (EHLO: "
                    f"{self.ehlo_reply[:200]!r})", reason="starttls_unavailable", stage="tls",
                    hint="relay never sends mail in clear text to a starttls upstream; check "
                         "the port (465 is implicit TLS: tls = \"implicit\")")
            try:
                with timer.stage("tls"):
                    await self._smtp.starttls(server_hostname=server_name, tls_context=ctx,
                                              timeout=up.connect_timeout)
            except aiosmtplib.SMTPResponseException as exc:
                raise SessionError(f"{up.name} refused STARTTLS: {exc.code} {exc.message}",
                                   reason="tls_failed", stage="tls",
                                   reply=f"{exc.code} {exc.message}") from exc
            except (aiosmtplib.SMTPException, OSError) as exc:
                if ssl_cause(exc) is not None:
                    raise _tls_error(up, exc, server_name) from exc
                raise self._broken("tls", exc) from exc
            await self._ehlo(timer)
        if ctx is not None:
            self._record_tls()
        with timer.stage("auth"):
            await self._auth(token_for)

    async def _ehlo(self, timer: StageTimer) -> None:
        try:
            with timer.stage("greeting"):
                resp = await self._smtp.ehlo()
        except aiosmtplib.SMTPHeloError as exc:
            raise SessionError(f"{self.upstream.name} refused EHLO: {exc.code} {exc.message}",
                               reason="ehlo_refused", stage="greeting",
                               reply=f"{exc.code} {exc.message}",
                               hint="check helo_name (default relay.hostname)") from exc
        except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
            raise self._broken("greeting", exc) from exc
        self.ehlo_reply = f"{resp.code} {resp.message}"

    def _record_tls(self) -> None:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            cert = self._smtp.get_transport_info("peercert") or {}
            obj = self.ssl_object
            names = [v for k, v in (x[0] for x in cert.get("subject", ())) if k == "commonName"]
            names += [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
            self.tls_info = {
                "version": obj.version() if obj is not None else "",
                "cipher": (self._smtp.get_transport_info("cipher") or ("",))[0],
                "names": names, "not_after": cert.get("notAfter", ""),
            }

    async def _auth(self, token_for: TokenFor | None) -> None:
        cred, up = self.credentials, self.upstream
        if cred.mechanism == "none":
            return
        offered = [m.upper() for m in self._smtp.server_auth_methods]
        if not self._smtp.supports_extension("auth"):
            raise SessionError(f"{up.name} offers no AUTH (EHLO: {self.ehlo_reply[:200]!r})",
                               reason="auth_unavailable", stage="auth",
                               hint="AUTH is usually only offered after TLS: check tls; or "
                                    "set auth = \"none\" if the provider trusts this host")
        try:
            if cred.mechanism == "xoauth2":
                resp = await self._auth_xoauth2(token_for, offered)
            else:
                password = cred.password.reveal() if cred.password else ""
                if "PLAIN" in offered:
                    resp = await self._smtp.auth_plain(cred.username, password)
                elif "LOGIN" in offered:
                    resp = await self._smtp.auth_login(cred.username, password)
                else:
                    raise SessionError(
                        f"{up.name} offers neither AUTH PLAIN nor LOGIN (offers "
                        f"{' '.join(offered) or 'nothing'})", reason="auth_unavailable",
                        stage="auth", hint="use auth = \"xoauth2\" if the provider offers it")
        except aiosmtplib.SMTPAuthenticationError as exc:
            reply = f"{exc.code} {exc.message}"
            hint = _EXCHANGE_535_HINT if exc.code == 535 else (
                "check the upstream's username and password/token source")
            raise SessionError(f"{up.name} refused AUTH for {cred.username!r}: {reply}",
                               reason="auth_failed", stage="auth", reply=reply,
                               hint=hint) from exc
        except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
            raise self._broken("auth", exc) from exc
        del resp

    async def _auth_xoauth2(self, token_for: TokenFor | None,
                            offered: list[str]) -> aiosmtplib.SMTPResponse:
        cred, up = self.credentials, self.upstream
        if "XOAUTH2" not in offered:
            raise SessionError(f"{up.name} does not offer AUTH XOAUTH2 (offers "
                               f"{' '.join(offered) or 'nothing'})", reason="auth_unavailable",
                               stage="auth", hint="check the host and port of the upstream")
        if token_for is None or not cred.token_source:
            raise SessionError(f"{up.name}: auth = xoauth2 but no token source is configured",
                               reason="auth_failed", stage="auth",
                               hint="set token_source on the upstream or its [[account]]")
        try:
            token = await token_for(cred.token_source)
        except OAuthError as exc:
            raise SessionError(f"{up.name}: no OAuth2 token from {cred.token_source!r}: {exc}",
                               reason="oauth_failed", stage="auth",
                               hint=exc.hint or "check the token source; mail is deferred"
                               ) from exc
        try:
            initial = xoauth2_string(cred.username, token)
        except ValueError as exc:
            raise SessionError(f"{up.name}: cannot build XOAUTH2 for {cred.username!r}: {exc}",
                               reason="auth_failed", stage="auth",
                               hint="check the upstream's username and token source") from exc
        resp = await self._smtp.execute_command(b"AUTH", b"XOAUTH2", initial)
        if resp.code == 334:
            # The provider's error challenge (base64 JSON): an empty line ends the exchange.
            challenge = resp.message
            resp = await self._smtp.execute_command(b"")
            raise aiosmtplib.SMTPAuthenticationError(
                resp.code, f"{resp.message} (challenge {challenge[:200]})")
        if resp.code != 235:
            raise aiosmtplib.SMTPAuthenticationError(resp.code, resp.message)
        return resp

    # ---- transactions --------------------------------------------------------------------

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS object of the session (certificate, version), None without TLS."""
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            obj = self._smtp.get_transport_info("ssl_object")
            return obj if isinstance(obj, ssl.SSLObject) else None
        return None

    def supports(self, extension: str) -> bool:
        return self._smtp.supports_extension(extension)

    def extension(self, name: str) -> str:
        """The EHLO parameter of an extension (e.g. SIZE's limit), "" if none."""
        return str(self._smtp.esmtp_extensions.get(name.lower(), ""))

    @property
    def pipelining(self) -> bool:
        """The provider offers PIPELINING (RFC 2920): MAIL, RCPT... and DATA in one write."""
        return self.supports("pipelining")

    def _take_over(self) -> None:
        """Set up: from here on the session's bytes go through ``Wire``, not aiosmtplib."""
        transport = self._smtp.transport
        if not isinstance(transport, asyncio.Transport) or transport.is_closing():
            raise self._broken("greeting", WireError("connection lost after set-up"))
        self._wire = Wire(transport)

    def send(self, *lines: bytes) -> None:
        """Write whole command lines (``command_line``) without waiting for replies."""
        try:
            if self._wire is None:
                raise WireError("the session is not set up")
            self._wire.write(b"".join(lines))
        except OSError as exc:
            stage = lines[0].split(b" ", 1)[0].split(b":", 1)[0].decode("ascii", "replace")
            raise self._broken(stage.strip().lower(), exc) from exc

    async def reply(self, stage: str, *, timeout: float | None = None) -> Reply:
        """The next reply, in order; a lost connection or timeout raises ``SessionError``."""
        try:
            if self._wire is None:
                raise WireError("the session is not set up")
            reply = await self._wire.reply(
                timeout if timeout is not None else self.upstream.command_timeout)
        except OSError as exc:      # WireError and TimeoutError are OSErrors
            raise self._broken(stage, exc) from exc
        if reply.code == 421:
            self.broken = True
        return reply

    async def command(self, *args: bytes, timeout: float | None = None) -> Reply:
        """Send one command and wait for its reply."""
        self.send(command_line(*args))
        return await self.reply(args[0].decode("ascii", "replace").lower(), timeout=timeout)

    async def data(self, data: bytes, *, checked: bool = False,
                   before_send: Callable[[], None] | None = None,
                   start: Reply | None = None) -> Reply:
        """DATA with the message; returns the 354-stage refusal or the final reply.

        ``start`` is DATA's reply when DATA went out pipelined already. The message is
        dot-stuffed with ``bytes.replace`` (regexes cost ~1.5 ms per 100 KB); bare CR/LF
        is refused, a smuggling vector (``checked=True``: the caller made sure there is
        none). ``before_send`` runs after the 354, right before the write: past it the
        provider may have the message.
        """
        if not checked and has_bare_cr_or_lf(data):
            raise ValueError("message contains a bare CR or LF")
        if start is None:
            start = await self.command(b"DATA")
        if start.code != 354:
            if start.code < 400:      # 2xx/3xx but not 354: out of step, nothing was sent
                self.broken = True
                raise SessionError(
                    f"{self.upstream.name} answered DATA with {start.text[:80]!r} instead of "
                    "354; the message was not sent", reason="protocol", stage="data",
                    hint="the provider (or something between) does not speak SMTP "
                         "properly; mail is deferred and retried")
            return start
        if before_send is not None:
            before_send()
        self.send(dot_stuff(data))
        try:
            return await self.reply("data", timeout=self.upstream.data_timeout)
        except SessionError as exc:
            raise self._broken("data", exc.__cause__ or exc, sent=True) from exc

    async def abandon_data(self) -> None:
        """End a DATA the provider accepted with 354 though no recipient was: a lone "."
        (RFC 2920 3.1); its reply does not matter, the session wants an RSET after it."""
        self.dirty = True
        self.send(b".\r\n")
        await self.reply("data", timeout=self.upstream.data_timeout)

    async def rset(self) -> bool:
        """RSET before reusing the session; False if the session is no longer usable."""
        try:
            reply = await self.command(b"RSET", timeout=min(30.0, self.upstream.command_timeout))
        except SessionError:
            return False
        return reply.code == 250 and not self.broken

    @property
    def usable(self) -> bool:
        return not self.broken and self._wire is not None and self._wire.open

    async def quit(self) -> None:
        """Polite QUIT (bounded wait), then close."""
        if self._wire is not None and self._wire.open:
            with contextlib.suppress(SessionError):
                await self.command(b"QUIT", timeout=5.0)
        self.close()

    def close(self) -> None:
        self.broken = True
        self._smtp.close()

    def _broken(self, stage: str, exc: BaseException, *, sent: bool = False) -> SessionError:
        self.broken = True
        if isinstance(exc, TimeoutError):
            reason, what = "timeout", "timed out"
        else:
            reason, what = "disconnected", "connection lost"
        if sent:
            return SessionError(
                f"{self.upstream.name}: {what} waiting for the reply to the message: {exc}; "
                "the provider may have accepted it", reason=reason, stage=stage, unknown=True,
                hint="the outcome is unknown: mail is deferred and retried, so the recipient "
                     "may get it twice (counted in relay_delivery_outcome_unknown_total)")
        return SessionError(f"{self.upstream.name}: {what} during {stage}: {exc}",
                            reason=reason, stage=stage,
                            hint="the provider or the network path (proxy) dropped or stalled "
                                 "the session; mail is deferred and retried")
