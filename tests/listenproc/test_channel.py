"""The listener-process channel: frames, descriptors, partial writes, EOF, requests."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import struct
from typing import Any

import pytest

from relay.errors import RelayError
from relay.listenproc.channel import Channel, ChannelClosed, RemoteError, Rpc


async def test_messages_and_descriptors_arrive_in_order_across_partial_writes() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    got: list[tuple[Any, list[socket.socket]]] = []
    done = asyncio.Event()

    def on_message(obj: Any, socks: list[socket.socket]) -> None:
        got.append((obj, socks))
        if obj == "last":
            done.set()
    sender = Channel(a, on_message=lambda o, s: None, on_eof=lambda: None)
    receiver = Channel(b, on_message=on_message, on_eof=lambda: None)
    listening = socket.create_server(("127.0.0.1", 0))
    big = os.urandom(3 * 1024 * 1024)              # far beyond the socket buffer
    sender.send(("big", big), [listening.fileno()])
    sender.send(("small", 1), [listening.fileno(), listening.fileno()])
    sender.send("last")
    await asyncio.wait_for(done.wait(), 10)
    assert [o for o, _ in got] == [("big", big), ("small", 1), "last"]
    assert [len(s) for _, s in got] == [1, 2, 0]
    port = listening.getsockname()[1]
    for _, socks in got:
        for s in socks:                             # the same listening socket, duplicated
            assert s.getsockname()[1] == port
            s.close()
    sender.close()
    receiver.close()
    listening.close()


async def test_eof_is_reported_once_and_send_after_it_raises() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    eofs: list[int] = []
    gone = asyncio.Event()

    def on_eof() -> None:
        eofs.append(1)
        gone.set()
    ch = Channel(b, on_message=lambda o, s: None, on_eof=on_eof)
    a.close()
    await asyncio.wait_for(gone.wait(), 5)
    assert eofs == [1]
    with pytest.raises(ChannelClosed):
        ch.send("x")


async def test_requests_replies_errors_and_notices() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    noticed: list[Any] = []

    async def double(payload: int, socks: list[socket.socket]) -> int:
        return payload * 2

    async def fail(payload: object, socks: list[socket.socket]) -> None:
        raise RelayError("no such thing", hint="do this")

    server = Rpc(b, handlers={"double": double, "fail": fail}, notices={},
                 on_eof=lambda: None)
    client = Rpc(a, handlers={}, notices={"stored": noticed.append}, on_eof=lambda: None)
    assert await client.call("double", 21) == 42
    with pytest.raises(RemoteError, match=r"no such thing(.|\n)*hint: do this"):
        await client.call("fail")
    server.notify("stored", "Q1")
    await client.call("double", 0)           # ordered after the notice
    assert noticed == ["Q1"]
    pending = asyncio.ensure_future(client.call("never", timeout=5))
    await asyncio.sleep(0)
    server.close()                            # the other process dies mid-request
    with pytest.raises((ChannelClosed, RemoteError)):
        await pending
    client.close()


async def test_what_was_sent_just_before_close_still_arrives() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    got: list[Any] = []
    gone = asyncio.Event()
    sender = Channel(a, on_message=lambda o, s: None, on_eof=lambda: None)
    receiver = Channel(b, on_message=lambda o, s: got.append(o), on_eof=gone.set)
    sender.send("reply")                      # queued for the end of this loop iteration
    sender.close()
    await asyncio.wait_for(gone.wait(), 5)
    assert got == ["reply"]
    receiver.close()


async def test_request_is_answered_or_times_out_without_a_task() -> None:
    a, b = socket.socketpair()
    server = Rpc(a, handlers={}, quick={"echo": lambda p: p,
                                        "later": lambda p: asyncio.get_running_loop()
                                        .create_future()},
                 notices={}, on_eof=lambda: None)
    client = Rpc(b, handlers={}, notices={}, on_eof=lambda: None)
    try:
        assert await client.request("echo", 41, timeout=5) == 41
        with pytest.raises(TimeoutError):
            await client.request("later", None, timeout=0.05)
        assert not client._waiting                    # nothing left behind
    finally:
        server.close()
        client.close()
    with pytest.raises(ChannelClosed):
        await client.request("echo", 1, timeout=5)


async def test_the_backlog_is_what_the_socket_has_not_taken_yet() -> None:
    """What a listener process holds for a main process that is behind on reading."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender = Channel(a, on_message=lambda o, s: None, on_eof=lambda: None)
    sender.send("x" * 1000)
    assert sender.backlog > 1000                   # queued: leaves at the end of the turn
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sender.backlog == 0                     # taken by the socket's buffer
    big = os.urandom(4 * 1024 * 1024)              # far beyond it: nobody reads b yet
    sender.send(big)
    await asyncio.sleep(0.05)
    assert 0 < sender.backlog < len(big)
    got = asyncio.Event()
    receiver = Channel(b, on_message=lambda o, s: got.set() if o == big else None,
                       on_eof=lambda: None)
    await asyncio.wait_for(got.wait(), 10)         # reading lets the rest go
    assert sender.backlog == 0
    sender.close()
    receiver.close()


def _frames(*objs: object) -> bytes:
    """The wire form of ``objs`` (no descriptors), as a Channel writes it."""
    out = b""
    for obj in objs:
        body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        out += struct.pack(">IH", len(body), 0) + body
    return out


@pytest.mark.parametrize("chunk", [1, 5, 6, 7, 13, 4096, 70_000, 1 << 20])
async def test_frames_arrive_whole_however_the_stream_is_cut(chunk: int) -> None:
    """Frames are read in place from each read and joined only when one spans reads:
    a head cut anywhere, a body in many pieces, several frames in one read."""
    objs: list[object] = ["a", ("stored", os.urandom(150_000)), 7, ("x" * 10, b""), "last"]
    wire = _frames(*objs)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    got: list[object] = []
    done = asyncio.Event()

    def on_message(obj: object, socks: list[socket.socket]) -> None:
        got.append(obj)
        if obj == "last":
            done.set()
    receiver = Channel(b, on_message=on_message, on_eof=lambda: None)
    try:
        for at in range(0, len(wire), chunk):
            a.sendall(wire[at:at + chunk])
            await asyncio.sleep(0)                 # the receiver reads each piece alone
        await asyncio.wait_for(done.wait(), 10)
        assert got == objs
    finally:
        receiver.close()
        a.close()


class _CountingSocket(socket.socket):
    writes = 0

    def sendmsg(self, *args: Any) -> int:
        type(self).writes += 1
        return super().sendmsg(*args)


async def test_a_turns_frames_leave_in_one_write_and_descriptors_start_their_own() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    counting = _CountingSocket(fileno=a.detach())
    got: list[tuple[object, int]] = []
    done = asyncio.Event()

    def on_message(obj: object, socks: list[socket.socket]) -> None:
        got.append((obj, len(socks)))
        for s in socks:
            s.close()
        if obj == "last":
            done.set()
    sender = Channel(counting, on_message=lambda o, s: None, on_eof=lambda: None)
    receiver = Channel(b, on_message=on_message, on_eof=lambda: None)
    listening = socket.create_server(("127.0.0.1", 0))
    try:
        for i in range(100):
            sender.send(("stored", i))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert _CountingSocket.writes == 1           # 100 frames, 200 buffers, one write
        sender.send("plain")
        sender.send("with fd", [listening.fileno()])
        sender.send("after")
        sender.send("last")
        await asyncio.wait_for(done.wait(), 10)
        assert _CountingSocket.writes == 3           # the descriptors began a second write
        assert got[100:] == [("plain", 0), ("with fd", 1), ("after", 0), ("last", 0)]
        assert got[:100] == [(("stored", i), 0) for i in range(100)]
    finally:
        sender.close()
        receiver.close()
        listening.close()
