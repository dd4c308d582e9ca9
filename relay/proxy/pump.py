"""The one byte pump: a protocol that reads lines before login, then splices to its peer.

A ``Channel`` is an ``asyncio.Protocol`` for one side of a proxy session (client or
provider). Before login the session reads from it (``read_some``, ``read_line``) and
writes to it; ``start_tls`` upgrades it in place and discards anything received before
the upgrade. ``splice(a, b)`` then forwards bytes both ways inside ``data_received``:
no task, no copy beyond the kernel's, and backpressure from the transports themselves
(a peer whose write buffer is full pauses this side's reading until it drains).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from relay.proxy.safepoint import Watch

# Write buffer bounds for spliced transports: big enough to keep a 50 MB FETCH streaming,
# small enough that a slow reader holds at most this much per direction.
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024
READ_SIZE = 1024 * 1024


class ChannelClosed(ConnectionError):
    """The other end closed the connection (or it failed) while the session waited."""


class LineTooLong(ValueError):
    """A line longer than the caller's limit (the peer is not speaking the protocol)."""


class Channel(asyncio.Protocol):
    """One side of a session: buffered reads before login, a splice afterwards."""

    __slots__ = ("_buf", "_drain", "_eof", "_exc", "_limit", "_loop", "_peer",
                 "_waiter", "_write_paused", "closed", "last_activity", "on_connect", "received",
                 "tap", "transport")

    def __init__(self, *, limit: int = 65536) -> None:
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._limit = limit
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._eof = False
        self._exc: BaseException | None = None
        self._peer: Channel | None = None
        self._write_paused = False
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.received = 0                 # bytes read from this side while spliced
        self.last_activity = self._loop.time()
        self.on_connect: Callable[[Channel], None] | None = None
        # While spliced and watched (relay.proxy.safepoint): how many bytes of what arrived
        # may go to the peer; the rest is held back, and reading stops.
        self.tap: Callable[[bytes], int] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.on_connect is not None:
            self.on_connect(self)

    def data_received(self, data: bytes) -> None:
        peer = self._peer
        if peer is not None:
            self.received += len(data)
            self.last_activity = self._loop.time()
            if self.tap is not None:
                used = self.tap(data)
                if used < len(data):
                    data = data[:used]
                    if self.transport is not None:
                        self.transport.pause_reading()
                if not data:
                    return
            out = peer.transport
            if out is not None and not out.is_closing():
                out.write(data)
            elif self.transport is not None:
                self.transport.close()
            return
        self._buf += data
        if len(self._buf) > self._limit and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False                      # close our side; the peer follows in connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._exc = exc
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        peer = self._peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()        # flushes what is buffered toward the peer first
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        peer = self._peer
        if peer is not None and peer.transport is not None:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        peer = self._peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.resume_reading()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- before login ----------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        if self._eof:
            raise ChannelClosed("connection closed by peer") from self._exc
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_some(self) -> bytes:
        """What has arrived (waiting for at least one byte); raises ChannelClosed at EOF."""
        while not self._buf:
            await self._wait()
        data = bytes(self._buf)
        self._buf.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        return data

    async def read_line(self, limit: int = 65536) -> bytes:
        """One line including its LF; raises LineTooLong or ChannelClosed."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end + 1])
                del self._buf[:end + 1]
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.resume_reading()
                return line
            if len(self._buf) > limit:
                raise LineTooLong(f"line longer than {limit} bytes")
            await self._wait()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self._eof and self._exc is not None:
            raise ChannelClosed("connection lost") from self._exc
        if self._write_paused and not self._eof:
            self._drain = self._loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def forget(self) -> None:
        """Drop the (aborted) transport and buffers once the kernel moves this side's bytes.

        The aborted transport still holds its socket object and address extras, which an
        idle kernel-spliced session would keep for its whole life.
        """
        self.transport = None
        self._buf = bytearray()

    def take_buffer(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    async def start_tls(self, context: ssl.SSLContext, *, server_side: bool,
                        server_hostname: str | None = None, timeout: float = 30.0) -> None:
        """Upgrade to TLS in place. Bytes received before the upgrade are discarded.

        ``loop.start_tls`` swaps the protocol synchronously, so no plaintext byte can land
        between the clear and the swap; decrypted bytes may arrive before it returns.
        """
        assert self.transport is not None
        self._buf.clear()
        transport = await self._loop.start_tls(
            self.transport, self, context, server_side=server_side,
            server_hostname=server_hostname, ssl_handshake_timeout=timeout)
        if transport is None:
            raise ChannelClosed("connection closed during the TLS handshake")
        self.transport = transport

    def ssl_object(self) -> ssl.SSLObject | None:
        if self.transport is None:
            return None
        return cast("ssl.SSLObject | None", self.transport.get_extra_info("ssl_object"))

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class TransportSplice:
    """Two channels spliced through their asyncio transports (any TLS on either side)."""

    __slots__ = ("client", "done", "upstream")

    def __init__(self, client: Channel, upstream: Channel, *, to_upstream: bytes = b"",
                 to_client: bytes = b"", watch: Watch | None = None) -> None:
        """From now on every byte read on one channel is written to the other.

        ``to_upstream``/``to_client`` are bytes already read (pipelined commands, responses
        that came with the login reply); they are written first, in order. A ``watch``
        sees every byte (and may hold some back) to find the session's safe points.
        """
        self.client, self.upstream = client, upstream
        self.done: asyncio.Future[str] = client._loop.create_future()
        for ch in (client, upstream):
            assert ch.transport is not None
            ch.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
            if hasattr(ch.transport, "max_size"):      # plain TCP: read up to 1 MB at once
                ch.transport.max_size = READ_SIZE
        to_upstream += client.take_buffer()
        to_client += upstream.take_buffer()
        if watch is not None:
            client.tap, upstream.tap = watch.from_client, watch.from_server
            to_upstream = to_upstream[:watch.from_client(to_upstream)]
            to_client = to_client[:watch.from_server(to_client)]
        client._peer, upstream._peer = upstream, client
        client.last_activity = upstream.last_activity = client._loop.time()
        if to_upstream:
            upstream.write(to_upstream)
        if to_client:
            client.write(to_client)
        for ch, other, how in ((client, upstream, "client_closed"),
                               (upstream, client, "upstream_closed")):
            ch.closed.add_done_callback(functools.partial(self._closed, how))
            if ch._eof:                      # closed before the splice: take the other down
                other.close()
            else:
                assert ch.transport is not None
                ch.transport.resume_reading()
                if other._write_paused:
                    ch.transport.pause_reading()

    def _closed(self, how: str, _f: object = None) -> None:
        if not self.done.done():
            self.done.set_result(how)

    def counts(self) -> tuple[int, int]:
        """Bytes moved so far: (client → upstream, upstream → client)."""
        return self.client.received, self.upstream.received

    @property
    def last_activity(self) -> float:
        return max(self.client.last_activity, self.upstream.last_activity)

    def close(self) -> None:
        self.client.close()
        self.upstream.close()

    def end_with(self, how: str, to_client: bytes, to_upstream: bytes) -> None:
        """Stop splicing, say goodbye to each side after what it was sent, close both."""
        for ch in (self.client, self.upstream):
            ch._peer, ch.tap = None, None
            if ch.transport is not None and not ch.transport.is_closing():
                ch.transport.pause_reading()
        self.client.write(to_client)
        self.upstream.write(to_upstream)
        self._closed(how)
        self.close()

    def abort(self) -> None:
        self.client.abort()
        self.upstream.abort()

    async def wait_closed(self, timeout: float) -> None:
        """Wait for both sides to finish flushing; drop them after ``timeout``."""
        _, pending = await asyncio.wait([self.client.closed, self.upstream.closed],
                                        timeout=timeout)
        if pending:
            self.abort()
