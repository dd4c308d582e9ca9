"""The ``relay check`` engine: walk each channel like a "Test connection" button.

For every channel of every upstream (``relay.probe.channels``: its own credentials, each
[[account]], or the ones given): transport (proxy or bastion steps timed apart), TCP, TLS
(certificate names and expiry), greeting, EHLO/CAPABILITY, AUTH (token fetch timed
apart), each done by the code relay really runs: SmtpSession for SMTP, the proxy's
upstream login for IMAP/POP3. Channels are walked one after the other, each step told to
the report's watcher as it ends; ``timeout`` bounds the whole walk. No mail is sent unless
``send_test`` names a recipient (an outbox upstream gets a test file). Each failure is
explained with a hint, naming a provider only when relay knows the server is theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from relay.config.schema import Config, Secret, UpstreamConfig
from relay.errors import OAuthError, RelayError
from relay.oauth.tokens import TokenSources
from relay.outbound.outbox import write_outbox
from relay.outbound.session import Credentials, SessionError, SmtpSession
from relay.outbound.session_setup import open_session
from relay.probe.channels import Channel, plan
from relay.probe.hints import explain_auth_reply, provider_of
from relay.probe.mailbox import Login, probe_certificate, walk_mailbox
from relay.probe.steps import Report, transport_steps
from relay.timing import StageTimer
from relay.tls import classify_tls_error, client_context, server_name, ssl_object_detail
from relay.transports.factory import Transports, Via


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
    opened, for ``open_session`` (SMTP) and the proxy's IMAP/POP3 login."""

    name = "check"

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def connect(self, host: str, port: int, *, timeout: float) -> socket.socket:
        return self._sock

    async def close(self) -> None:
        return None


_DOING = {"connect": "connecting", "tls": "the TLS handshake",
          "greeting": "the greeting and EHLO", "auth": "AUTH (a token fetch included)"}


class _Watched(StageTimer):
    """The stage timer ``open_session`` fills, telling the report which stage is under way."""

    def __init__(self, report: Report) -> None:
        super().__init__()
        self._report = report

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name != "connect":
            self._report.waiting(name, _DOING.get(name, ""))
        with super().stage(name):
            yield


def provider(config: Config, up: UpstreamConfig, login: Login) -> str:
    """Whose server this is, when relay knows: the host, or the token source's provider."""
    names = [up.host, up.tls_server_name or ""]
    if login.token_source:
        with contextlib.suppress(KeyError):
            names.append(config.token_source(login.token_source).provider)
    return provider_of(*names)


class Checker:
    """Runs the walk for channels of one config, sharing transports and token sources."""

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

    @staticmethod
    def report_for(channel: Channel) -> Report:
        up = channel.upstream
        return Report(up.name, up.protocol, f"{up.host}:{up.port}" if up.host else
                      str(up.path), up.via or "direct", identity=channel.identity,
                      username=channel.login.username)

    async def check(self, report: Report, channel: Channel) -> None:
        await self._check(report, channel.upstream, channel.login)
        report.note_if_slow(self.config.relay.slow_delivery_threshold)

    async def _check(self, report: Report, up: UpstreamConfig, login: Login) -> None:
        if up.protocol == "outbox":
            await self._outbox(report, up)
            return
        kind = "direct" if up.via is None else self.config.proxy(up.via).kind
        handle = self.transports.for_upstream(up)
        ctx: ssl.SSLContext | None = None
        try:
            if up.tls != "none":
                ctx = await asyncio.to_thread(client_context, up)
        except RelayError as exc:
            report.failed("tls", None, exc)
            return
        sock = await transport_steps(report, handle, kind, up.host, up.port,
                                     timeout=up.connect_timeout)
        if sock is None:
            return
        if up.protocol == "smtp":
            await self._smtp(report, up, handle, sock, login)
        else:
            await walk_mailbox(report, up, _Given(sock), ctx, login, self.tokens.token,
                               self.token_detail, lambda: probe_certificate(handle, up),
                               provider=provider(self.config, up, login))

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
            return
        if self.send_test:
            await self._outbox_test(report, up, path)

    async def _outbox_test(self, report: Report, up: UpstreamConfig, path: Path) -> None:
        """The test message, written as delivery writes one (``write_outbox``)."""
        assert self.send_test is not None
        sender = self.send_from or f"postmaster@{self.config.relay.hostname}"
        t = time.monotonic()
        try:
            written = await write_outbox(
                path, queue_id=f"relay-check-{time.strftime('%Y%m%d-%H%M%S')}", sender=sender,
                recipients=[self.send_test], all_recipients=(self.send_test,),
                data=self._test_message(up, sender))
        except RelayError as exc:
            report.failed("send", time.monotonic() - t, exc)
            return
        report.passed("send", time.monotonic() - t,
                      f"test message from {sender} to {self.send_test} written to {written} "
                      "(an outbox upstream delivers into files; nothing was sent)")

    def _test_message(self, up: UpstreamConfig, sender: str) -> bytes:
        assert self.send_test is not None
        return (f"From: <{sender}>\r\nTo: <{self.send_test}>\r\n"
                f"Subject: relay check: test message via {up.name}\r\n"
                f"Date: {email.utils.formatdate(localtime=True)}\r\n"
                f"Message-ID: {email.utils.make_msgid('relay-check')}\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                f"This message was sent by `relay check --send-test` through upstream "
                f"{up.name}.\r\n").encode()

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
        timer = _Watched(report)
        report.waiting("tls" if up.tls == "implicit" else "greeting",
                       "the TLS handshake" if up.tls == "implicit" else
                       "the greeting and EHLO")
        try:
            session = await open_session(
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
                self._smtp_failure(report, up, stage, stages.get(stage), failed, login,
                                   token_time)
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

    def _smtp_failure(self, report: Report, up: UpstreamConfig, stage: str,
                      seconds: float | None,
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
            hint = explain_auth_reply(code, exc.reply, provider(self.config, up, login))
        report.failed(stage, seconds, exc, hint=hint)

    async def _send_test(self, report: Report, up: UpstreamConfig, session: SmtpSession,
                         login: Login) -> None:
        assert self.send_test is not None
        sender = self.send_from or (login.username if "@" in login.username else
                                    f"postmaster@{self.config.relay.hostname}")
        msg = self._test_message(up, sender)
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
                    send_test: str | None = None, send_from: str | None = None,
                    account: str | None = None, user: str | None = None,
                    password: Secret | None = None, timeout: float | None = None,
                    begin: Callable[[Report], None] | None = None,
                    end: Callable[[Report], None] | None = None) -> list[Report]:
    """Walk every channel of the named upstreams (all when none is named), one after the
    other, within ``timeout`` seconds in all; ``begin``/``end`` frame each channel."""
    channels = plan(config, list(names), account=account, user=user, password=password)
    checker = Checker(config, send_test=send_test, send_from=send_from)
    reports: list[Report] = []
    try:
        async with asyncio.timeout(timeout):
            for channel in channels:
                report = checker.report_for(channel)
                reports.append(report)
                if begin is not None:
                    begin(report)
                await checker.check(report, channel)
                if end is not None:
                    end(report)
    except TimeoutError:
        limit = timeout or 0.0
        reports[-1].timed_out(limit)
        if end is not None:
            end(reports[-1])
        for channel in channels[len(reports):]:
            report = checker.report_for(channel)
            reports.append(report)
            if begin is not None:
                begin(report)
            report.failed("walk", None, f"not checked: the --timeout of {limit:g} s ran out "
                          "before this channel's turn", reason="timeout",
                          hint="raise --timeout, or check this upstream on its own")
            if end is not None:
                end(report)
    finally:
        await checker.close()
    return reports
