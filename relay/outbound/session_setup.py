"""Setting an upstream SMTP session up: transport connect, TLS, greeting/EHLO, AUTH, timed.

``open_session`` is the one way to an ``SmtpSession`` (``relay.outbound.session``), used
by the SMTP courier (``relay.outbound.smtp_courier``) and by ``relay check``. aiosmtplib
drives the set-up; once it is done the session's ``Wire`` takes the transport over.
Every failure raises ``SessionError`` (a transient ``DeliveryError`` with a bounded
``reason`` and an operator hint) or the transport's ``TransportError``; neither ever
bounces mail. Secrets (passwords, tokens, AUTH payloads) are never logged.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiosmtplib

from relay.config.schema import UpstreamConfig
from relay.errors import OAuthError
from relay.outbound.session import Credentials, SessionError, SmtpSession, connection_lost
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


def _tls_error(upstream: UpstreamConfig, exc: BaseException, server_name: str) -> SessionError:
    """The one explanation of TLS failures (``relay.tls``), naming the upstream."""
    err = classify_tls_error(ssl_cause(exc) or exc, server_name)
    return SessionError(f"{upstream.name} ({upstream.host}:{upstream.port}): {err}",
                        reason=err.reason, stage="tls", hint=err.hint)


async def open_session(upstream: UpstreamConfig, *, transport: Transport, helo_name: str,
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
    session = SmtpSession(upstream, smtp, credentials)
    try:
        await _SetUp(session, smtp).run(sock, ctx, server_name, timer, token_for)
        session.take_over()
    except BaseException:
        session.close()
        raise
    return session


class _SetUp:
    """The set-up conversation of one session, on the aiosmtplib client it was made with."""

    def __init__(self, session: SmtpSession, smtp: aiosmtplib.SMTP) -> None:
        self.session = session
        self.upstream = session.upstream
        self.credentials = session.credentials
        self._smtp = smtp

    async def run(self, sock: Any, ctx: ssl.SSLContext | None, server_name: str,
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
            raise connection_lost(up, "greeting", exc) from exc
        self.session.greeting = f"{resp.code} {resp.message}"
        await self._ehlo(timer)
        if up.tls == "starttls":
            if not self._smtp.supports_extension("starttls"):
                raise SessionError(
                    f"{up.name} does not offer STARTTLS (EHLO: "
                    f"{self.session.ehlo_reply[:200]!r})", reason="starttls_unavailable",
                    stage="tls",
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
                raise connection_lost(up, "tls", exc) from exc
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
            raise connection_lost(self.upstream, "greeting", exc) from exc
        self.session.ehlo_reply = f"{resp.code} {resp.message}"

    def _record_tls(self) -> None:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            cert = self._smtp.get_transport_info("peercert") or {}
            obj = self.session.ssl_object
            names = [v for k, v in (x[0] for x in cert.get("subject", ())) if k == "commonName"]
            names += [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
            self.session.tls_info = {
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
            raise SessionError(
                f"{up.name} offers no AUTH (EHLO: {self.session.ehlo_reply[:200]!r})",
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
            raise connection_lost(up, "auth", exc) from exc
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
