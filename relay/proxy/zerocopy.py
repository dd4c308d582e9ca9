"""Kernel splice for plain-TCP sessions: bytes move socket → pipe → socket, never into Python.

When neither side of a logged-in session uses TLS, relay has nothing to do with the bytes,
so it hands both sockets to ``os.splice`` (Linux). Each direction reads into a pipe only
while that pipe is empty and stops reading while the destination cannot take more, so
backpressure is the kernel's. A direction's pipe exists only while bytes flow: it is
kept between bursts of one transfer (making a 1 MB pipe per socket wakeup cost more than
the splice) and closed once the session has moved nothing for ``PIPE_IDLE`` seconds, so
idle sessions hold no pipes. The TLS path stays in ``relay.proxy.pump``.

A watched session (``relay.proxy.safepoint``, to end it at a safe point after a reload)
reads what the watch must see into Python (IMAP lines, all of POP3) and still splices
what it need not (IMAP literal bodies: a large FETCH stays in the kernel). While a long
literal from the server flows, the server socket's SO_RCVLOWAT asks epoll to wake relay
only once ``LOWAT`` bytes of it (or all that is left of it) have arrived: a few large
splices per megabyte instead of one small one per burst of segments, which is what kept
a 50 MB FETCH's CPU above nginx's. A server's literal size is a promise of bytes to come,
so the wait cannot outlast the transfer; EOF and errors wake epoll whatever the mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from collections.abc import Callable

from relay.proxy.pump import Channel
from relay.proxy.safepoint import Stream, Watch

CHUNK = 1024 * 1024
READ = 256 * 1024                 # a watched read: what the watch looks at in one go
_F_SETPIPE_SZ = 1031
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_BURST = 16                       # reads per wakeup before yielding to other sessions
PIPE_IDLE = 1.0                   # seconds without bytes before a direction's pipe closes
LOWAT = 512 * 1024                # in a long literal, wake for no less (SO_RCVLOWAT)
_LOWAT_MIN = 64 * 1024            # literals shorter than this keep ordinary wakeups


def available(client: Channel, upstream: Channel) -> bool:
    """True when both channels are plain, idle-to-write TCP sockets and splice(2) exists."""
    if not hasattr(os, "splice"):
        return False
    for ch in (client, upstream):
        t = ch.transport
        if (t is None or t.is_closing() or ch.is_closed or t.get_extra_info("ssl_object")
                is not None or t.get_extra_info("socket") is None
                or t.get_write_buffer_size() != 0):
            return False
    return True


def detach(client: Channel, upstream: Channel) -> tuple[int, int]:
    """Duplicate both sockets' fds, then let asyncio forget (and close) the originals.

    Raises OSError (e.g. EMFILE) before touching either channel if a dup fails, so the
    caller can fall back to the transport splice.
    """
    fds: list[int] = []
    try:
        for ch in (client, upstream):
            assert ch.transport is not None
            fds.append(os.dup(ch.transport.get_extra_info("socket").fileno()))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    for ch in (client, upstream):
        assert ch.transport is not None
        ch.transport.abort()       # closes only asyncio's fd: the connection lives on in ours
        ch.forget()                # an idle session keeps no dead transport (~0.8 KB each)
    return fds[0], fds[1]


class _Direction:
    """Bytes from ``src`` to ``dst`` through a pipe, with kernel backpressure."""

    __slots__ = ("bytes", "closing", "dst", "eof", "feed", "inpipe", "lowat", "owner",
                 "pending", "pipe", "src", "stream", "timer", "trailer", "watch")

    def __init__(self, owner: KernelSplice, src: int, dst: int, pending: bytes, *,
                 watch: Watch | None = None, stream: Stream | None = None,
                 feed: Callable[[bytes], int] | None = None) -> None:
        self.owner = owner
        self.src, self.dst = src, dst
        self.pending = pending
        self.pipe: tuple[int, int] | None = None
        self.inpipe = 0
        self.bytes = 0
        self.eof = False
        self.watch, self.stream, self.feed = watch, stream, feed
        self.trailer = b""              # written after everything else when closing
        self.closing = False
        self.timer: asyncio.TimerHandle | None = None   # closes the pipe once idle
        self.lowat = 1                  # the source's SO_RCVLOWAT

    def start(self) -> None:
        if self.pending:
            self.writable()
        else:
            self.owner.loop.add_reader(self.src, self.readable)

    def _rest(self) -> None:
        """The source has nothing now: keep the pipe for the next burst, and close it once
        the session has been idle ``PIPE_IDLE`` seconds."""
        if self.pipe is not None and self.timer is None:
            self.timer = self.owner.loop.call_later(PIPE_IDLE, self._idle_check)

    def _idle_check(self) -> None:
        self.timer = None
        if self.pipe is None:
            return
        idle = self.owner.loop.time() - self.owner.last_activity
        if idle >= PIPE_IDLE and self.inpipe == 0:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None
        else:
            self.timer = self.owner.loop.call_later(max(PIPE_IDLE - idle, 0.1),
                                                    self._idle_check)

    def _flush(self) -> bool:
        """Write what is pending and in the pipe; True when all of it went out."""
        while self.pending:
            try:
                n = os.write(self.dst, self.pending)
            except BlockingIOError:
                return False
            self.pending = self.pending[n:]
        while self.inpipe:
            assert self.pipe is not None
            try:
                n = os.splice(self.pipe[0], self.dst, self.inpipe, flags=_FLAGS)
            except BlockingIOError:
                return False
            self.inpipe -= n
        if self.closing and self.trailer:
            self.pending, self.trailer = self.trailer, b""
            return self._flush()
        return True

    def readable(self) -> None:
        if self.feed is not None:
            self._readable_watched()
            return
        loop = self.owner.loop
        try:
            for _ in range(_BURST):
                if self.pipe is None:
                    self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                    with contextlib.suppress(OSError):
                        fcntl.fcntl(self.pipe[1], _F_SETPIPE_SZ, CHUNK)
                try:
                    n = os.splice(self.src, self.pipe[1], CHUNK, flags=_FLAGS)
                except BlockingIOError:
                    self._rest()
                    return
                if n == 0:
                    self.eof = True
                    loop.remove_reader(self.src)
                    self.owner.ended(self)
                    return
                self.inpipe += n
                self.bytes += n
                self.owner.last_activity = loop.time()
                if not self._flush():
                    loop.remove_reader(self.src)          # backpressure: wait for dst
                    loop.add_writer(self.dst, self.writable)
                    return
        except OSError as exc:
            self.owner.failed(exc)

    def _wake_at(self, n: int) -> None:
        """Let epoll wake this direction only once ``n`` bytes are queued (SO_RCVLOWAT)."""
        if n == self.lowat:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, self.src)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self.lowat = n
        except OSError:
            pass
        finally:
            sock.detach()

    def _readable_watched(self) -> None:
        """Like ``readable``, but the watch sees every byte it must (and may hold some)."""
        loop, watch, stream, feed = self.owner.loop, self.watch, self.stream, self.feed
        assert watch is not None and stream is not None and feed is not None
        try:
            for _ in range(_BURST):
                blind = watch.blind(stream)
                wait = False                            # for epoll, not the next read
                if blind:                               # a literal's body: kernel only
                    if self.pipe is None:
                        self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                        with contextlib.suppress(OSError):
                            fcntl.fcntl(self.pipe[1], _F_SETPIPE_SZ, CHUNK)
                    try:
                        n = os.splice(self.src, self.pipe[1], min(blind, CHUNK), flags=_FLAGS)
                    except BlockingIOError:
                        self._rest()
                        return
                    if n:
                        watch.skip(stream, n)
                        self.inpipe += n
                        # The rest of a server's literal must come: wake for big pieces
                        # of it, never for more than it has left. Not a client's: a
                        # synchronizing literal the server refused never comes, and not
                        # once COMPRESS or STARTTLS made the sizes unreadable.
                        rest = watch.blind(stream)
                        wait = rest >= _LOWAT_MIN and stream is watch.down and not watch.opaque
                        self._wake_at(min(rest, LOWAT) if wait else 1)
                else:
                    try:
                        data = os.read(self.src, READ)
                    except BlockingIOError:
                        self._rest()
                        return
                    n = len(data)
                    if n:
                        used = feed(data)
                        self.pending += data if used == n else data[:used]
                        if used < n:                    # held back: read no more
                            loop.remove_reader(self.src)
                if n == 0:
                    self.eof = True
                    loop.remove_reader(self.src)
                    self.owner.ended(self)
                    return
                self.bytes += n
                self.owner.last_activity = loop.time()
                if not self._flush():
                    loop.remove_reader(self.src)          # backpressure: wait for dst
                    loop.add_writer(self.dst, self.writable)
                    return
                if wait or self.closing or watch.rested:
                    return
        except OSError as exc:
            self.owner.failed(exc)

    def end_with(self, trailer: bytes) -> None:
        """Read no more; write what is in flight, then ``trailer``; then tell the owner."""
        self.owner.loop.remove_reader(self.src)
        self.closing, self.trailer = True, trailer
        self.writable()

    def writable(self) -> None:
        loop = self.owner.loop
        try:
            if not self._flush():
                loop.add_writer(self.dst, self.writable)
                return
        except OSError as exc:
            self.owner.failed(exc)
            return
        loop.remove_writer(self.dst)
        if self.closing:
            self.owner.flushed(self)
            return
        if self.eof:
            self.owner.ended(self)
        else:
            self.owner.loop.add_reader(self.src, self.readable)

    def close(self) -> None:
        loop = self.owner.loop
        loop.remove_reader(self.src)
        loop.remove_writer(self.dst)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None


class KernelSplice:
    """A logged-in plain session spliced in the kernel (same interface as TransportSplice)."""

    __slots__ = ("_ending", "_fds", "done", "down", "last_activity", "loop", "up")

    def __init__(self, client: Channel, upstream: Channel, *, to_upstream: bytes = b"",
                 to_client: bytes = b"", watch: Watch | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        cfd, ufd = detach(client, upstream)           # OSError: nothing changed
        to_upstream += client.take_buffer()
        to_client += upstream.take_buffer()
        self._fds: tuple[int, int] | None = (cfd, ufd)
        self._ending = ""
        self.done: asyncio.Future[str] = self.loop.create_future()
        self.last_activity = self.loop.time()
        if watch is None:
            self.up = _Direction(self, cfd, ufd, to_upstream)
            self.down = _Direction(self, ufd, cfd, to_client)
        else:
            to_upstream = to_upstream[:watch.from_client(to_upstream)]
            to_client = to_client[:watch.from_server(to_client)]
            self.up = _Direction(self, cfd, ufd, to_upstream, watch=watch, stream=watch.up,
                                 feed=watch.from_client)
            self.down = _Direction(self, ufd, cfd, to_client, watch=watch, stream=watch.down,
                                   feed=watch.from_server)
        self.up.start()
        self.down.start()

    def counts(self) -> tuple[int, int]:
        return self.up.bytes, self.down.bytes

    def ended(self, d: _Direction) -> None:
        """One side sent EOF: deliver what is left in its pipe, then close the session."""
        if d.inpipe or d.pending:
            self.loop.add_writer(d.dst, d.writable)
            return
        self._finish("client_closed" if d is self.up else "upstream_closed")

    def failed(self, exc: OSError) -> None:
        self._finish("connection_error")

    def end_with(self, how: str, to_client: bytes, to_upstream: bytes) -> None:
        """Stop reading both ways; once what is in flight and the goodbyes are written,
        close the session as ``how``."""
        if self._fds is None or self._ending:
            return
        self._ending = how
        self.down.end_with(to_client)
        self.up.end_with(to_upstream)

    def flushed(self, d: _Direction) -> None:
        if self.up.closing and self.down.closing and not (
                self.up.pending or self.up.inpipe or self.down.pending or self.down.inpipe):
            self._finish(self._ending)

    def _finish(self, how: str) -> None:
        if self._fds is None:
            return
        self.up.close()
        self.down.close()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = None
        if not self.done.done():
            self.done.set_result(how)

    def close(self) -> None:
        self._finish("closed")

    def abort(self) -> None:
        self._finish("aborted")

    async def wait_closed(self, timeout: float) -> None:
        return None                # _finish closes synchronously
