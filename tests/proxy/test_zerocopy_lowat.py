"""The kernel splice's wakeup mark (SO_RCVLOWAT) on real loopback TCP, no IMAP server.

relay sits between two socket pairs it accepted and connected itself; the test plays
both the client and the server, so it can send what Dovecot never would.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from relay.proxy import zerocopy
from relay.proxy.pump import Channel
from relay.proxy.safepoint import ImapWatch


async def _channel(sock: socket.socket) -> Channel:
    _, ch = await asyncio.get_running_loop().connect_accepted_socket(Channel, sock)
    return ch


@asynccontextmanager
async def spliced() -> AsyncIterator[tuple[socket.socket, socket.socket,
                                            zerocopy.KernelSplice]]:
    """(client end, server end, relay's watched kernel splice between them)."""
    pairs = []
    for _ in range(2):
        lsock = socket.create_server(("127.0.0.1", 0))
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
        lsock.close()
        pairs.append((a, b))
    (client, relay_client), (relay_server, server) = pairs
    for s in (client, server):
        s.settimeout(5)
    splice = zerocopy.KernelSplice(await _channel(relay_client), await _channel(relay_server),
                                   watch=ImapWatch())
    try:
        yield client, server, splice
    finally:
        splice.close()
        client.close()
        server.close()


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "closed"
        out += chunk
    return bytes(out)


async def test_a_refused_client_literal_does_not_stall_the_next_command() -> None:
    """A synchronizing literal the server refuses never comes: the client's next commands
    must still reach the server (relay must not wait for a big piece of it)."""
    async with spliced() as (client, server, _):
        client.sendall(b"A APPEND INBOX {300000}\r\n")
        assert await asyncio.to_thread(_recv_exactly, server, 25) == b"A APPEND INBOX {300000}\r\n"
        server.sendall(b"A NO [TOOBIG] too big\r\n")
        assert await asyncio.to_thread(_recv_exactly, client, 23) == b"A NO [TOOBIG] too big\r\n"
        for tag in (b"B", b"C", b"D"):     # taken for literal bytes by the watch, still sent
            client.sendall(tag + b" NOOP\r\n")
            assert await asyncio.to_thread(_recv_exactly, server, 8) == tag + b" NOOP\r\n"


async def test_a_server_literal_arrives_whole_and_in_order_around_the_mark() -> None:
    """A 3 MB literal sent in uneven pieces, then a short tagged line: all of it arrives,
    and the line is not held back by the mark."""
    body = bytes(range(256)) * (3 * 4096)
    async with spliced() as (client, server, splice):
        client.sendall(b"F UID FETCH 1 BODY[]\r\n")
        await asyncio.to_thread(_recv_exactly, server, 22)

        def serve() -> None:
            server.sendall(b"* 1 FETCH (BODY[] {%d}\r\n" % len(body))
            for i in range(0, len(body), 70001):
                server.sendall(body[i:i + 70001])
            server.sendall(b")\r\nF OK done\r\n")
        await asyncio.to_thread(serve)
        head = b"* 1 FETCH (BODY[] {%d}\r\n" % len(body)
        got = await asyncio.to_thread(_recv_exactly, client,
                                      len(head) + len(body) + len(b")\r\nF OK done\r\n"))
        assert got == head + body + b")\r\nF OK done\r\n"
        assert splice.down.lowat == 1                      # back to every byte
