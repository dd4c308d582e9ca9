"""Pooled SMTP sessions of one upstream: reuse per identity, concurrency cap, idle expiry."""

from __future__ import annotations

import asyncio
import logging

from relay.config.schema import UpstreamConfig
from relay.outbound.session import SmtpSession
from relay.tasks import Background

log = logging.getLogger("relay.delivery")


class SessionPool:
    """Sessions of one upstream, idle ones by identity; the semaphore is the concurrency cap.

    ``alive`` counts open sessions (in use and idle). Opening one more than
    ``max_connections`` first closes the oldest idle session of another identity, so
    idle sessions never push the connection count past the cap.
    """

    def __init__(self, upstream: UpstreamConfig, idle_timeout: float) -> None:
        self.upstream = upstream
        self.limit = max(1, upstream.max_connections)
        self.sem = asyncio.Semaphore(self.limit)
        self.idle_timeout = idle_timeout
        self._idle: list[tuple[SmtpSession, asyncio.TimerHandle]] = []   # oldest first
        self.closing = Background(f"sessions of {upstream.name}", log)
        self.opened = 0     # sessions opened so far (tests and debugging)
        self.alive = 0
        self.closed = False  # after close(): sessions still in use are QUIT when returned

    def take(self, key: tuple[str, str, str]) -> SmtpSession | None:
        """The most recently used idle session for this identity, if any is usable."""
        for i in range(len(self._idle) - 1, -1, -1):
            session, handle = self._idle[i]
            if session.credentials.key != key:
                continue
            del self._idle[i]
            handle.cancel()
            if session.usable:
                return session
            self.discard(session)
        return None

    async def make_room(self) -> None:
        """Before opening a session: QUIT the oldest idle one(s) while the cap is reached."""
        while self.alive >= self.limit and self._idle:
            session, handle = self._idle.pop(0)
            handle.cancel()
            session.discarded = True
            self.alive -= 1
            await session.quit()

    def put(self, session: SmtpSession) -> None:
        """Return a session after an attempt: keep it idle, or QUIT it."""
        per_conn = max(1, self.upstream.max_messages_per_connection)
        if self.closed or not session.usable or session.messages >= per_conn:
            self.discard(session)
            return
        loop = asyncio.get_running_loop()
        session.idle_since = loop.time()
        handle = loop.call_later(self.idle_timeout, self._expire, session)
        self._idle.append((session, handle))

    def _expire(self, session: SmtpSession) -> None:
        for i, (s, _h) in enumerate(self._idle):
            if s is session:
                del self._idle[i]
                self.discard(session)
                return

    def discard(self, session: SmtpSession) -> None:
        """QUIT (politely, in the background) and forget a session; idempotent."""
        if session.discarded:
            return
        session.discarded = True
        self.alive -= 1
        self.closing.spawn(session.quit(), name="quit")

    async def close(self) -> None:
        self.closed = True
        for session, handle in self._idle:
            handle.cancel()
            self.discard(session)
        self._idle.clear()
        await self.closing.wait()
