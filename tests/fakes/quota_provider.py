"""A provider that enforces its own quota, as Exchange Online does, for pacing tests and the bench.

A real SMTP server (aiosmtpd on the caller's loop, loopback only) that counts accepted
messages per mailbox (the AUTH user, else MAIL FROM) in a sliding window measured when
it accepts DATA, and answers past ``limit`` per ``window`` seconds with Exchange's
throttling reply (a 5xx that only means "wait"). It can also cap concurrent
transactions per mailbox (Exchange's 3) with ``432 4.3.2 ... sender thread limit
exceeded``. It records when it accepted each message, per mailbox, so a test can check
the provider's own view: the most it saw in any window, and the throttles it sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult

EXCHANGE_QUOTA = ("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException;"
                  " Failed to process message due to a permanent exception with message "
                  "Cannot submit message.")
THREAD_LIMIT = "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"


def peak(times: list[float], window: float) -> int:
    """The most timestamps inside any window of ``window`` seconds."""
    times = sorted(times)
    best, start = 0, 0
    for end, ts in enumerate(times):
        while times[start] <= ts - window:
            start += 1
        best = max(best, end - start + 1)
    return best


class _Handler:
    def __init__(self, owner: QuotaProvider) -> None:
        self.owner = owner

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        owner = self.owner
        mailbox = (session.auth_data if isinstance(session.auth_data, str) else address).lower()
        if owner.connections and owner.busy[mailbox] >= owner.connections:
            owner.throttled.append((mailbox, THREAD_LIMIT))
            return THREAD_LIMIT
        owner.busy[mailbox] += 1
        owner.max_busy[mailbox] = max(owner.max_busy[mailbox], owner.busy[mailbox])
        session.quota_mailbox = mailbox
        envelope.mail_from = address
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        owner = self.owner
        mailbox = getattr(session, "quota_mailbox", envelope.mail_from.lower())
        try:
            if owner.latency:
                await asyncio.sleep(owner.latency(mailbox))  # the provider's own pace
            now = time.monotonic()
            seen = owner.recent[mailbox]
            while seen and seen[0] <= now - owner.window:
                seen.popleft()
            if owner.limit and len(seen) >= owner.limit:
                owner.throttled.append((mailbox, owner.reply))
                return owner.reply
            seen.append(now)
            owner.accepted[mailbox].append(now)
            owner.subjects[mailbox].append(_subject(envelope.original_content or b""))
            owner.total += 1
            owner.changed.set()
            return "250 2.6.0 Queued mail for delivery"
        finally:
            owner.busy[mailbox] -= 1
            session.quota_mailbox = None

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        mailbox = getattr(session, "quota_mailbox", None)
        if mailbox:
            self.owner.busy[mailbox] -= 1
            session.quota_mailbox = None
        return "250 2.0.0 Resetting"


def _subject(data: bytes) -> str:
    for line in data.split(b"\r\n"):
        if not line:
            break
        if line.lower().startswith(b"subject:"):
            return line[8:].strip().decode("utf-8", "replace")
    return ""


class QuotaProvider:
    """``await p.start()``, ``p.port``, ``await p.stop()``; see the module docstring."""

    def __init__(self, *, limit: int = 0, window: float = 60.0, connections: int = 0,
                 reply: str = EXCHANGE_QUOTA, latency: Any = None,
                 users: dict[str, str] | None = None) -> None:
        self.limit, self.window, self.connections = limit, window, connections
        self.reply = reply
        self.latency = latency           # callable(mailbox) -> seconds, or None
        self.users = users or {}
        self.recent: dict[str, collections.deque[float]] = collections.defaultdict(
            collections.deque)
        self.accepted: dict[str, list[float]] = collections.defaultdict(list)
        self.subjects: dict[str, list[str]] = collections.defaultdict(list)
        self.throttled: list[tuple[str, str]] = []
        self.busy: collections.Counter[str] = collections.Counter()
        self.max_busy: collections.Counter[str] = collections.Counter()
        self.total = 0
        self.changed = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._protocols: list[SMTP] = []

    def peak(self, mailbox: str | None = None) -> int:
        """The most messages the provider accepted in any window, for one mailbox or the
        busiest one."""
        boxes = [mailbox] if mailbox else list(self.accepted)
        return max((peak(self.accepted[m], self.window) for m in boxes), default=0)

    def _auth(self, server: Any, session: Any, envelope: Any, mechanism: str,
              auth_data: Any) -> AuthResult:
        user, password = auth_data.login.decode(), auth_data.password.decode()
        ok = self.users.get(user) == password
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    def _factory(self) -> SMTP:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            proto = SMTP(_Handler(self), hostname="provider.test", decode_data=False,
                         auth_require_tls=False, authenticator=self._auth,
                         auth_required=bool(self.users))
        self._protocols.append(proto)
        return proto

    async def start(self, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, "127.0.0.1", port,
                                                reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def wait_total(self, n: int, timeout: float) -> None:
        """Until ``n`` messages were accepted in all (bounded by ``timeout``)."""
        async with asyncio.timeout(timeout):
            while self.total < n:
                self.changed.clear()
                await self.changed.wait()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for proto in self._protocols:
                if proto.transport is not None:
                    proto.transport.close()
            await self._server.wait_closed()


@contextlib.contextmanager
def provider_thread(**kw: Any) -> Iterator[QuotaProvider]:
    """A QuotaProvider served by its own event loop in a thread (for tests whose relay is
    another process and whose own code blocks)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: list[QuotaProvider] = []
    stop: list[asyncio.Event] = []

    async def main() -> None:
        p = QuotaProvider(**kw)
        await p.start()
        holder.append(p)
        stop.append(asyncio.Event())
        ready.set()
        await stop[0].wait()
        await p.stop()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    done = asyncio.run_coroutine_threadsafe(main(), loop)
    if not ready.wait(10):
        raise RuntimeError("the quota provider did not start")
    try:
        yield holder[0]
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        done.result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
