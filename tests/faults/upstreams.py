"""The upstreams of the fault rig besides smtp-sink: aiosmtpd on a thread, XOAUTH2 tokens."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from tests.fakes.recording_upstream import RecordingUpstream
from tests.peers.token_server import TokenServer

MAILBOX = "cc@example.com"


class ThreadedUpstream:
    """The recording aiosmtpd upstream on an event loop thread of its own."""

    def __init__(self, **kw: Any) -> None:
        self.up = RecordingUpstream(**kw)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> ThreadedUpstream:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.up.start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.up.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def subjects(self) -> list[str]:
        return [subject_of(m.data) for m in list(self.up.received)]


class AnyIssued:
    """The recording upstream's token table: any token the endpoint has issued is valid."""

    def __init__(self, srv: TokenServer) -> None:
        self.srv = srv

    def get(self, user: str) -> object:
        issued = self.srv.issued

        class _Any:
            def __eq__(self, other: object) -> bool:
                return user == MAILBOX and other in issued

            __hash__ = None  # type: ignore[assignment]
        return _Any()


def subject_of(data: bytes) -> str:
    for line in data.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"Subject: "):
            return line[9:].decode()
        if not line:
            break
    return "?"
