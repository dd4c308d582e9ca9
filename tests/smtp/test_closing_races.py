"""Connections caught by a closing accept loop, on both event loops relay runs on."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from relay.acceptloop import AcceptLoop
from relay.app.eventloop import run
from relay.smtp.defences import DefendedSession
from relay.smtp.protocol import SmtpProtocol


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_a_connection_accepted_as_the_loop_closes_is_still_served(kind: str) -> None:
    """A drain closes the accept loop; a plain connection accepted in that same iteration
    is already the client's: it gets its greeting and a normal end, not a dropped socket
    (on uvloop, cancelling its set-up closed the connection under a made protocol)."""
    async def main() -> tuple[bytes, int]:
        listening = socket.create_server(("127.0.0.1", 0))
        listening.setblocking(False)
        lost: list[object] = []

        class Greeter(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                transport.write(b"220 still served\r\n")   # type: ignore[attr-defined]
                transport.close()

            def connection_lost(self, exc: Exception | None) -> None:
                lost.append(exc)

        accepting = AcceptLoop("test", [listening], Greeter)
        accepting.start()
        asyncio.get_running_loop().remove_reader(listening.fileno())   # accept by hand
        client = socket.create_connection(listening.getsockname(), timeout=5)
        await asyncio.sleep(0.05)             # the client waits in the backlog...
        accepting._readable(listening)        # ...is accepted, and in the same iteration
        accepting.close()                     # the loop closes (a drain begins)
        await asyncio.wait_for(accepting.wait_closed(), 5)
        for _ in range(100):
            if lost:
                break
            await asyncio.sleep(0.01)
        got = await asyncio.to_thread(client.recv, 100)
        client.close()
        return got, len(lost)

    assert run(main(), kind) == (b"220 still served\r\n", 1)


class _ClosedHandle:
    """A transport as uvloop leaves it when its handle was closed under the protocol."""

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; "
                           "the handler is closed")


async def test_writing_to_a_closed_handle_is_a_lost_connection() -> None:
    session = SmtpProtocol.__new__(SmtpProtocol)
    session.transport = _ClosedHandle()  # type: ignore[assignment]
    session._write_paused = False
    with pytest.raises(ConnectionResetError, match="connection lost"):
        await session.send(b"220 x\r\n")


def test_a_reply_written_at_once_to_a_closed_handle_is_dropped() -> None:
    """Timeouts and drains write their last reply synchronously, then close: a handle
    already gone is no error there (no traceback from a timer callback)."""
    session = DefendedSession.__new__(DefendedSession)
    session.transport = _ClosedHandle()  # type: ignore[assignment]
    session._held = [b"250 held\r\n"]
    session._write_now("421 4.4.2 timeout")
    assert session._held == []
