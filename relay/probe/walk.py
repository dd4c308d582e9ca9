"""The ``relay check`` engine: walk each upstream like a "Test connection" button.

For every upstream: transport (proxy or bastion steps timed apart), TCP, TLS (certificate
names and expiry), greeting, EHLO/CAPABILITY, AUTH (token fetch timed apart), each done by
the code relay really runs: SmtpSession for SMTP, the proxy's upstream login for IMAP/POP3.
No mail is sent unless ``send_test`` names a recipient. Each failure is explained with a
hint.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import os
import socket
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relay.config.schema import Config, UpstreamConfig
from relay.errors import OAuthError, RelayError
from relay.oauth.tokens import TokenSources
from relay.outbound.session import Credentials, SessionError, SmtpSession
from relay.probe.hints import explain_auth_reply
from relay.probe.mailbox import Login, probe_certificate, walk_mailbox
from relay.probe.steps import Report, transport_steps
from relay.timing import StageTimer
from relay.tls import classify_tls_error, client_context, server_name, ssl_object_detail
from relay.transports.factory import Transports, Via


def login_for(config: Config, up: UpstreamConfig) -> Login:
    """The identity ``relay check`` logs in with: the upstream's own, else its first account."""
    if up.auth in ("none", "passthrough"):
        note = ("auth = passthrough: clients' own credentials are used, nothing to test"
                if up.auth == "passthrough" else "auth = none")
        return Login(up.auth, note=note)
    accounts = [a for a in config.accounts if a.upstream == up.name]
    if up.auth == "password":
        if up.username and up.password is not None:
            return Login("password", up.username, up.password)
        for a in accounts:
            if a.password is not None:
                return Login("password", a.username, a.password,
                             note=f"credentials of the [[account]] for {a.user or a.sender}")
    else:
        source = up.token_source
        if up.username and source:
            return Login("xoauth2", up.username, token_source=source)
        for a in accounts:
            if a.token_source or source:
                return Login("xoauth2", a.username or up.username,
                             token_source=a.token_source or source,
                             note=f"mailbox of the [[account]] for {a.user or a.sender}")
    return Login("none", note=f"auth = {up.auth} but no credentials are configured to test")


def _ssl_cause(exc: BaseException | None) -> ssl.SSLError | None:
    for _ in range(6):
        if exc is None or isinstance(exc, ssl.SSLError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _session_tls(session: SmtpSession) -> str:
    """TLS version and certificate of a set-up session."""
    obj = session.ssl_object
    if obj is not None:
        return ssl_object_detail(obj)
    info = session.tls_info
    names = info.get("names") or ["-"]
    until = info.get("not_after", "")
    if until:
        until = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(until),
                                          dt.UTC).strftime("%Y-%m-%d")
    return f"{info.get('version') or 'TLS'}, certificate CN={names[0]} valid until {until or '?'}"


class _Given:
    """A transport that hands out one already connected socket: the one the transport steps
    opened, for SmtpSession and the proxy's IMAP/POP3 login."""

    name = "check"

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def connect(self, host: str, port: int, *, timeout: float) -> socket.socket:
        return self._sock

    async def close(self) -> None:
        return None


class Checker:
    """Runs the walk for upstreams of one config, sharing transports and token sources."""

    def __init__(self, config: Config, *, send_test: str | None = None,
                 send_from: str | None = None) -> None:
        self.config = config
        self.send_test = send_test
        self.send_from = send_from
        self.transports = Transports(config.proxies)
        self.tokens = TokenSources(config.token_sources, transports=self.transports)

    def token_detail(self, source: str) -> str:
        at = self.tokens.expires_at(source)
        when = (dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
                if at else "unknown")
        return f"token source {source}: access token obtained, valid until {when}"

    async def close(self) -> None:
        await self.transports.close()

    async def check(self, up: UpstreamConfig) -> Report:
        report = await self._check(up)
        report.note_if_slow(self.config.relay.slow_delivery_threshold)
        return report

    async def _check(self, up: UpstreamConfig) -> Report:
        via = up.via or "direct"
        report = Report(up.name, up.protocol, f"{up.host}:{up.port}" if up.host else
                        str(up.path), via)
        if up.protocol == "outbox":
            await self._outbox(report, up)
            return report
        kind = "direct" if up.via is None else self.config.proxy(up.via).kind
        handle = self.transports.for_upstream(up)
        ctx: ssl.SSLContext | None = None
        try:
            if up.tls != "none":
                ctx = await asyncio.to_thread(client_context, up)
        except RelayError as exc:
            report.failed("tls", None, exc)
            return report
        sock = await transport_steps(report, handle, kind, up.host, up.port,
                                     timeout=up.connect_timeout)
        if sock is None:
            return report
        login = login_for(self.config, up)
        if up.protocol == "smtp":
            await self._smtp(report, up, handle, sock, login)
        else:
            await walk_mailbox(report, up, _Given(sock), ctx, login, self.tokens.token,
                               self.token_detail, lambda: probe_certificate(handle, up))
        return report

    async def _outbox(self, report: Report, up: UpstreamConfig) -> None:
        path = Path(up.path or ".")
        t = time.monotonic()
        ok = await asyncio.to_thread(lambda: path.is_dir() and os.access(path, os.W_OK))
        if ok:
            report.passed("outbox", time.monotonic() - t, f"{path} is a writable folder")
        else:
            report.failed("outbox", time.monotonic() - t, f"{path} is not a writable folder",
                          reason="outbox_unwritable",
                          hint="create it and give the relay user write access")

    async def _smtp(self, report: Report, up: UpstreamConfig, handle: Via,
                    sock: socket.socket, login: Login) -> None:
        token_time: list[float] = []

        async def token_for(source: str) -> str:
            t = time.monotonic()
            try:
                return await self.tokens.token(source)
            finally:
                token_time.append(time.monotonic() - t)

        creds = Credentials(
            mechanism="none" if login.mechanism == "passthrough" else login.mechanism,
            username=login.username, password=login.password, token_source=login.token_source)
        timer = StageTimer()
        try:
            session = await SmtpSession.open(
                up, transport=_Given(sock), helo_name=up.helo_name or
                self.config.relay.hostname, credentials=creds, timer=timer,
                token_for=token_for)
        except SessionError as exc:
            self._smtp_steps(report, up, timer, None, login, token_time, failed=exc)
            cause = _ssl_cause(exc)
            if exc.reason == "tls_certificate" and cause is not None:
                der = await probe_certificate(handle, up)
                err = classify_tls_error(cause, server_name(up), der)
                report.steps[-1].detail, report.steps[-1].hint = str(err), err.hint
            return
        except RelayError as exc:
            report.failed("greeting", None, exc)
            return
        try:
            self._smtp_steps(report, up, timer, session, login, token_time)
            if self.send_test:
                await self._send_test(report, up, session, login)
        finally:
            await session.quit()

    def _smtp_steps(self, report: Report, up: UpstreamConfig, timer: StageTimer,
                    session: SmtpSession | None, login: Login, token_time: list[float],
                    failed: SessionError | None = None) -> None:
        stages = timer.stages
        order = ["tls", "greeting", "auth"] if up.tls == "implicit" else \
            ["greeting", "tls", "auth"]
        for stage in order:
            if failed is not None and failed.stage == stage:
                self._smtp_failure(report, stage, stages.get(stage), failed, login, token_time)
                return
            if stage == "tls" and up.tls == "none":
                report.skipped("tls", "tls = none: plain text (only sensible on loopback)")
                continue
            if session is None:
                report.passed(stage, stages.get(stage), {
                    "greeting": "greeting and EHLO accepted", "tls": "TLS established",
                }.get(stage, ""))
                continue
            if stage == "greeting":
                ehlo = session.ehlo_reply.splitlines()[0] if session.ehlo_reply else ""
                report.passed("greeting", stages.get("greeting"),
                              f"{session.greeting[:80]} / EHLO {ehlo[:60]}")
            elif stage == "tls":
                report.passed("tls", stages.get("tls"), _session_tls(session))
            else:
                self._auth_steps(report, stages.get("auth"), login, token_time)

    def _auth_steps(self, report: Report, seconds: float | None, login: Login,
                    token_time: list[float]) -> None:
        if login.mechanism not in ("password", "xoauth2"):
            report.skipped("auth", login.note or "no AUTH configured")
            return
        fetch = sum(token_time)
        if login.mechanism == "xoauth2" and login.token_source:
            report.passed("token", fetch, self.token_detail(login.token_source))
        how = "XOAUTH2" if login.mechanism == "xoauth2" else "password"
        report.passed("auth", (seconds or 0.0) - fetch,
                      f"authenticated as {login.username} ({how})"
                      + (f"; {login.note}" if login.note else ""))

    def _smtp_failure(self, report: Report, stage: str, seconds: float | None,
                      exc: SessionError, login: Login, token_time: list[float]) -> None:
        if stage == "auth" and exc.reason == "oauth_failed":
            cause = exc.__cause__
            report.failed("token", sum(token_time),
                          cause if isinstance(cause, OAuthError) else exc)
            return
        if stage == "auth" and login.mechanism == "xoauth2" and token_time:
            report.passed("token", sum(token_time), self.token_detail(login.token_source or ""))
        hint = exc.hint
        if stage == "auth" and exc.reply:
            code = int(exc.reply[:3]) if exc.reply[:3].isdigit() else 535
            hint = explain_auth_reply(code, exc.reply)
        report.failed(stage, seconds, exc, hint=hint)

    async def _send_test(self, report: Report, up: UpstreamConfig, session: SmtpSession,
                         login: Login) -> None:
        assert self.send_test is not None
        sender = self.send_from or (login.username if "@" in login.username else
                                    f"postmaster@{self.config.relay.hostname}")
        msg = (f"From: <{sender}>\r\nTo: <{self.send_test}>\r\n"
               f"Subject: relay check: test message via {up.name}\r\n"
               f"Date: {email.utils.formatdate(localtime=True)}\r\n"
               f"Message-ID: {email.utils.make_msgid('relay-check')}\r\n"
               "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
               f"This message was sent by `relay check --send-test` through upstream "
               f"{up.name}.\r\n").encode()
        t = time.monotonic()
        for args in ((b"MAIL", f"FROM:<{sender}>".encode()),
                     (b"RCPT", f"TO:<{self.send_test}>".encode())):
            reply = await session.command(*args)
            if reply.code >= 400:
                report.failed("send", time.monotonic() - t,
                              f"{args[0].decode()} refused: {reply.text}", reason="send_refused",
                              hint="the provider refused the test envelope: see its reply")
                return
        reply = await session.data(msg)
        if reply.code >= 400:
            report.failed("send", time.monotonic() - t, f"DATA refused: {reply.text}",
                          reason="send_refused", hint="see the provider's reply")
            return
        report.passed("send", time.monotonic() - t,
                      f"test message from {sender} to {self.send_test}: {reply.text[:100]}")


async def run_check(config: Config, names: Sequence[str] = (), *,
                    send_test: str | None = None,
                    send_from: str | None = None) -> list[Report]:
    """Check the named upstreams (all of them when none is named), concurrently."""
    known = {u.name: u for u in config.upstreams}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RelayError(f"no upstream named {', '.join(unknown)}",
                         hint=f"configured upstreams: {', '.join(known) or 'none'}")
    selected = [known[n] for n in names] if names else list(config.upstreams)
    checker = Checker(config, send_test=send_test, send_from=send_from)
    try:
        results: list[Any] = await asyncio.gather(*(checker.check(u) for u in selected))
    finally:
        await checker.close()
    return list(results)
