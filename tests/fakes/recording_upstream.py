"""A small real SMTP server for tests: aiosmtpd on the test loop, scripted replies, raw bytes.

Scripts are lists of replies consumed in order, one per occurrence of the command
(``None`` or running out means the normal behaviour), so "4xx on the first attempt,
2xx on the second" is ``script={"DATA": ["451 4.3.0 try later"]}``; ``"HANGUP"`` for
MAIL drops the connection without a reply (for DATA: after taking the message, so the
client cannot know it was delivered). RCPT can also be
scripted per address. Everything the client sends is recorded byte for byte, per
connection. STARTTLS or implicit TLS (trustme contexts), AUTH PLAIN/LOGIN checking,
and XOAUTH2 checking (with the provider's 334 JSON challenge on failure).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    auth_user: str | None
    connection: int


@dataclass
class _Handler:
    owner: RecordingUpstream

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname          # aiosmtpd leaves this to the hook
        if self.owner.pipelining:             # RFC 2920; aiosmtpd reads commands in order
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        reply = self.owner._next("MAIL")
        await self.owner._delay("MAIL")
        if reply == "HANGUP":                 # vanish without a reply (a dead idle session)
            server.transport.abort()
            return "421 4.4.2 gone"
        if reply and not reply.startswith("2"):
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        self.owner.mail_options.append(list(mail_options))
        return reply or "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        per_addr = self.owner.rcpt_script.get(address)
        reply = per_addr.pop(0) if per_addr else self.owner._next("RCPT")
        await self.owner._delay("RCPT")
        if reply and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        return reply or "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self.owner._next("DATA")
        await self.owner._delay("DATA")
        if reply and not reply.startswith("2") and reply != "HANGUP":
            return reply
        user = session.auth_data if isinstance(session.auth_data, str) else None
        self.owner.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                            envelope.original_content or envelope.content,
                                            user, getattr(server, "conn_no", 0)))
        self.owner._changed()
        if reply == "HANGUP":        # took the message, then died before answering
            server.transport.abort()
            return "421 4.4.2 gone"
        return reply or "250 2.0.0 Ok: queued"

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> AuthResult:
        owner = self.owner
        blob = args[1] if len(args) > 1 else ""
        try:
            raw = base64.b64decode(blob, validate=True).decode()
        except Exception:
            return AuthResult(success=False, handled=False)
        owner.xoauth2_seen.append(raw)
        ok = False
        if raw.endswith("\x01\x01") and raw.count("\x01") == 3:
            user_part, auth_part, _, _ = raw.split("\x01")
            user = user_part.removeprefix("user=")
            token = auth_part.removeprefix("auth=Bearer ")
            ok = (user_part.startswith("user=") and auth_part.startswith("auth=Bearer ")
                  and owner.tokens.get(user) == token)
            if ok:
                return AuthResult(success=True, auth_data=user)
        challenge = json.dumps({"status": "401", "schemes": "bearer",
                                "scope": "https://mail.google.com/"})
        answer = await server.challenge_auth(challenge)
        owner.xoauth2_seen.append(f"after-challenge:{answer!r}")
        return AuthResult(success=False, handled=False)


class _RecordingSMTP(SMTP):
    def __init__(self, owner: RecordingUpstream, conn_no: int, **kw: Any) -> None:
        super().__init__(_Handler(owner), **kw)
        self.owner, self.conn_no = owner, conn_no
        self._open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._open:
            self._open = True
            self.owner.open_now += 1
            self.owner.max_open = max(self.owner.max_open, self.owner.open_now)
            self.owner._changed()
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._open:
            self._open = False
            self.owner.open_now -= 1
            self.owner._changed()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.owner.raw[self.conn_no].extend(data)
        self.owner.chunks.append((self.conn_no, bytes(data)))
        super().data_received(data)


class RecordingUpstream:
    """Start with ``await up.start()``; ``up.port``; ``await up.stop()``."""

    def __init__(self, *, script: dict[str, list[str | None]] | None = None,
                 rcpt_script: dict[str, list[str]] | None = None,
                 delays: dict[str, float] | None = None,
                 starttls: ssl.SSLContext | None = None,
                 implicit_tls: ssl.SSLContext | None = None,
                 users: dict[str, str] | None = None,
                 tokens: dict[str, str] | None = None,
                 auth_required: bool = False, hostname: str = "upstream.test",
                 size_limit: int = 33554432, pipelining: bool = False) -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.rcpt_script = {k: list(v) for k, v in (rcpt_script or {}).items()}
        self.delays = dict(delays or {})
        self.starttls, self.implicit_tls = starttls, implicit_tls
        self.users, self.tokens = users or {}, tokens or {}
        self.auth_required, self.hostname = auth_required, hostname
        self.size_limit = size_limit
        self.received: list[Received] = []
        self.raw: list[bytearray] = []
        self.chunks: list[tuple[int, bytes]] = []     # (connection, bytes of one read)
        self.pipelining = pipelining
        self.mail_options: list[list[str]] = []
        self.xoauth2_seen: list[str] = []
        self.auth_attempts: list[tuple[str, str]] = []
        self.open_now = 0
        self.max_open = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._cond: asyncio.Condition | None = None
        self._protocols: list[_RecordingSMTP] = []

    @property
    def connections(self) -> int:
        return len(self.raw)

    def _next(self, command: str) -> str | None:
        queue = self.script.get(command)
        return queue.pop(0) if queue else None

    async def _delay(self, command: str) -> None:
        seconds = self.delays.get(command)
        if seconds:
            await asyncio.sleep(seconds)     # the peer being slow is the behaviour under test

    def _changed(self) -> None:
        if self._cond is None:
            return
        cond = self._cond

        async def notify() -> None:
            async with cond:
                cond.notify_all()
        asyncio.get_running_loop().create_task(notify())

    async def wait_for(self, predicate: Any, timeout: float = 20.0) -> None:
        """Wait until ``predicate(self)`` holds (re-checked on every message/disconnect)."""
        assert self._cond is not None
        async with asyncio.timeout(timeout), self._cond:
            await self._cond.wait_for(lambda: predicate(self))

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        user = auth_data.login.decode()
        password = auth_data.password.decode()
        self.auth_attempts.append((mechanism, user))
        ok = bool(self.users) and self.users.get(user) == password
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    def _factory(self) -> _RecordingSMTP:
        self.raw.append(bytearray())
        kw: dict[str, Any] = {"hostname": self.hostname, "decode_data": False,
                              "data_size_limit": self.size_limit,
                              "enable_SMTPUTF8": True, "auth_required": self.auth_required,
                              "auth_require_tls": False, "authenticator": self._authenticate}
        if self.starttls is not None:
            kw["tls_context"] = self.starttls
        with warnings.catch_warnings():     # AUTH without TLS is deliberate in these tests
            warnings.simplefilter("ignore", UserWarning)
            proto = _RecordingSMTP(self, len(self.raw) - 1, **kw)
        self._protocols.append(proto)
        return proto

    async def start(self, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._cond = asyncio.Condition()
        self._server = await loop.create_server(self._factory, "127.0.0.1", port,
                                                ssl=self.implicit_tls, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for proto in list(self._protocols):
            if proto.transport is not None:
                proto.transport.close()
        self._protocols.clear()


@contextlib.asynccontextmanager
async def stopped_after() -> AsyncIterator[list[RecordingUpstream]]:
    """A list for the recording upstreams a test starts; each is stopped when the block ends.

    The ``started`` (tests/delivery) and ``peers`` (tests/scheduler) fixtures are this.
    """
    started: list[RecordingUpstream] = []
    try:
        yield started
    finally:
        for up in started:
            await up.stop()
