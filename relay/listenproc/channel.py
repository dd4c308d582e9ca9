"""Length-prefixed pickle messages (with file descriptors) over a trusted Unix socketpair.

The main relay process and its SMTP listener children talk over one
``socketpair(AF_UNIX, SOCK_STREAM)`` each. A frame is a 4-byte big-endian length, a
2-byte count of file descriptors, then a pickle; the descriptors (listening sockets)
travel as SCM_RIGHTS ancillary data on the frame's first byte. Pickle is only safe
because both ends are relay processes started by relay over a private socketpair.

``Channel`` works on the event loop without threads: ``send()`` never blocks (it queues
what the socket does not take at once), incoming frames are handed to ``on_message`` in
order, and ``on_eof`` runs once when the peer is gone. ``Rpc`` adds numbered requests with
awaited replies on top.

A stored message's bytes ride in its notice (up to 1 MB), so the frames are not copied on
the way: what one loop turn queued leaves in one gathered write (head and body buffers
as they are), and frames are unpickled in place from the read that holds them, joined
only when one spans reads. A 100 KB notice cost 47-55 us of CPU there and back instead of
76-82, and 80 instead of 300-400 while the reader was behind (socketpair, one process).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from relay.errors import RelayError
from relay.tasks import Background

log = logging.getLogger("relay.listenproc")

_HEAD = struct.Struct(">IH")
_GATHER = 512                   # buffers per write, at most (IOV_MAX is 1024)
MAX_FDS = 64
MAX_FRAME = 64 * 1024 * 1024

OnMessage = Callable[[Any, list[socket.socket]], None]

# What the main process and its listener processes agree on besides the frames:
# the lock every listener process holds shared (the main process takes it exclusively
# before recovering the spool, so it never recovers under a listener of a previous
# instance), and how listening sockets are laid out in a ``configure`` request.
LOCK_NAME = "listeners.lock"
Layout = list[tuple[str, int, int]]          # (listener name, socket token, socket count)


class ChannelClosed(ConnectionError):
    """The other process is gone (EOF or a socket error)."""


class Channel:
    """One end of the socketpair; see the module docstring."""

    def __init__(self, sock: socket.socket, *, on_message: OnMessage,
                 on_eof: Callable[[], None]) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._on_message = on_message
        self._on_eof = on_eof
        self._loop = asyncio.get_running_loop()
        self._inbuf: list[bytes | memoryview] = []   # a frame's start, awaiting the rest
        self._inlen = 0                      # bytes in _inbuf
        self._need = 0                       # bytes its frame takes (once its head is in)
        self._infds: deque[int] = deque()
        self._out: deque[tuple[memoryview, list[int]]] = deque()
        self._queued = 0                     # bytes in _out, not yet taken by the socket
        self._writing = False
        self._flush_soon = False
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backlog(self) -> int:
        """Bytes sent here that the socket has not taken yet (the other process is
        behind on reading): what this process holds for it, beside the kernel's buffer."""
        return self._queued

    def send(self, obj: object, fds: list[int] | None = None) -> None:
        """Queue one message (and descriptors, duplicated by the kernel on sending)."""
        if self._closed:
            raise ChannelClosed("the other relay process is gone")
        fds = list(fds or ())
        if len(fds) > MAX_FDS:
            raise ValueError(f"at most {MAX_FDS} descriptors per message")
        body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        # Head and body stay apart (no copy of a large body); the descriptors ride on
        # the head, the frame's first byte.
        self._out.append((memoryview(_HEAD.pack(len(body), len(fds))), fds))
        self._out.append((memoryview(body), []))
        self._queued += _HEAD.size + len(body)
        if not self._writing and not self._flush_soon:
            # At the end of this loop iteration: the notices of stores that finished
            # together leave in one write (and wake the other process once).
            self._flush_soon = True
            self._loop.call_soon(self._flush)

    def flush(self) -> None:
        """Write what is queued now (what the socket does not take waits as usual)."""
        if not self._writing:
            self._flush()

    def read_pending(self) -> None:
        """Handle what the other process has already sent, without waiting for the loop."""
        for _ in range(8):                       # up to 2 MB; the loop reads the rest
            if self._closed or not self._readable():
                return

    def _flush(self) -> None:
        self._flush_soon = False
        if self._closed:
            return
        out = self._out
        while out:
            # One gathered write of what is queued, up to the next descriptors (they go
            # with the first byte of a write, so a frame carrying some starts its own).
            fds = out[0][1]
            views = [out[0][0]]
            for view, more in itertools.islice(out, 1, _GATHER):
                if more:
                    break
                views.append(view)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] \
                if fds else []
            try:
                sent = self._sock.sendmsg(views, anc)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._lost()
                return
            self._queued -= sent
            while sent:
                view = out[0][0]
                if sent < len(view):
                    out[0] = (view[sent:], [])        # descriptors went with the first byte
                    break
                sent -= len(view)
                out.popleft()
        want = bool(self._out)
        if want != self._writing:
            self._writing = want
            if want:
                self._loop.add_writer(self._sock.fileno(), self._flush)
            else:
                self._loop.remove_writer(self._sock.fileno())

    def _readable(self) -> bool:
        """Read and handle what there is; False when there was nothing (or it ended)."""
        try:
            data, anc, _flags, _addr = self._sock.recvmsg(
                256 * 1024, socket.CMSG_SPACE(MAX_FDS * 4))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data, anc = b"", []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self._infds.extend(fds)
        if not data:
            self._lost()
            return False
        # Frames are read in place: from what arrived, or, when a frame began in an
        # earlier read, from the pieces joined once (not copied on every read).
        if self._inbuf:
            self._inbuf.append(data)
            self._inlen += len(data)
            if self._inlen < self._need:
                return True
            data = b"".join(self._inbuf)
            self._inbuf.clear()
        buf = memoryview(data)
        pos, end = 0, len(data)
        while end - pos >= _HEAD.size:
            size, nfds = _HEAD.unpack_from(buf, pos)
            if size > MAX_FRAME:
                log.error("listener channel: frame of %d bytes; closing", size)
                self._lost()
                return False
            if end - pos - _HEAD.size < size:
                break
            body = buf[pos + _HEAD.size:pos + _HEAD.size + size]
            pos += _HEAD.size + size
            socks = [socket.socket(fileno=self._infds.popleft())
                     for _ in range(min(nfds, len(self._infds)))]
            try:
                obj = pickle.loads(body)
            except Exception:
                log.exception("listener channel: undecodable message; closing")
                for s in socks:
                    s.close()
                self._lost()
                return False
            try:
                self._on_message(obj, socks)
            except Exception:
                log.exception("listener channel: handling a message failed")
            if self._closed:
                return False
        if pos < end:                            # the start of a frame: wait for the rest
            rest = buf[pos:]
            self._inbuf.append(rest)
            self._inlen = len(rest)
            self._need = _HEAD.size + (_HEAD.unpack_from(rest)[0] if len(rest) >= _HEAD.size
                                       else 0)
        return True

    def _lost(self) -> None:
        if self._closed:
            return
        self.close()
        self._on_eof()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:                                 # best effort: what was sent before closing
            while self._out:
                view, fds = self._out.popleft()
                anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                       if fds else [])
                if self._sock.sendmsg([view], anc) < len(view):
                    break
        except OSError:
            pass
        self._out.clear()
        self._queued = 0
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._sock.fileno())
        if self._writing:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        while self._infds:
            with contextlib.suppress(OSError):
                os.close(self._infds.popleft())


Handler = Callable[[Any, list[socket.socket]], Awaitable[Any]]


class Rpc:
    """Requests with replies, and one-way notices, over a ``Channel``.

    Messages are ``("req", seq, kind, payload)``, ``("rep", seq, ok, payload)`` and
    ``("note", kind, payload)``. A handler's exception is replied as ``ok=False`` with its
    text; ``call()`` then raises ``RemoteError``. A ``quick`` handler is a plain function,
    answered within the dispatch (no task), or when the ``asyncio.Future`` it returns is
    done: for frequent requests such as admissions.
    """

    def __init__(self, sock: socket.socket, *, handlers: dict[str, Handler],
                 notices: dict[str, Callable[[Any], None]],
                 on_eof: Callable[[], None],
                 quick: dict[str, Callable[[Any], Any]] | None = None) -> None:
        self._handlers = handlers
        self._quick = quick or {}
        self._notices = notices
        self._on_eof_cb = on_eof
        self._seq = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._tasks = Background("listener channel", log)
        self.channel = Channel(sock, on_message=self._dispatch, on_eof=self._eof)

    async def call(self, kind: str, payload: object = None, *, fds: list[int] | None = None,
                   timeout: float = 30.0) -> Any:
        return await self.request(kind, payload, fds=fds, timeout=timeout)

    def request(self, kind: str, payload: object, *, fds: list[int] | None = None,
                timeout: float) -> asyncio.Future[Any]:
        """``call()`` as a bare future (no task, no coroutine), for a request made per
        connection. Fails with ChannelClosed, RemoteError or TimeoutError."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        seq = next(self._seq)
        try:
            self.channel.send(("req", seq, kind, payload), fds)
        except ChannelClosed as exc:
            fut.set_exception(exc)
            return fut
        self._waiting[seq] = fut
        timer = loop.call_later(timeout, _expire, fut)

        def done(_: asyncio.Future[Any]) -> None:
            timer.cancel()
            self._waiting.pop(seq, None)
        fut.add_done_callback(done)
        return fut

    def notify(self, kind: str, payload: object = None, *, now: bool = False) -> None:
        """Send a notice; ``now``: written before returning, not at the end of the loop
        iteration (when its order against what this process writes next matters)."""
        self.channel.send(("note", kind, payload))
        if now:
            self.channel.flush()

    def close(self) -> None:
        self.channel.close()

    def _eof(self) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ChannelClosed("the other relay process is gone"))
        self._on_eof_cb()

    def _dispatch(self, msg: Any, socks: list[socket.socket]) -> None:
        tag = msg[0]
        if tag == "rep":
            _, seq, ok, payload = msg
            fut = self._waiting.get(seq)
            if fut is not None and not fut.done():
                if ok:
                    fut.set_result(payload)
                else:
                    fut.set_exception(RemoteError(str(payload)))
        elif tag == "note":
            _, kind, payload = msg
            self._notices[kind](payload)
        elif tag == "req":
            _, seq, kind, payload = msg
            quick = self._quick.get(kind)
            if quick is not None:
                for s in socks:
                    s.close()
                try:
                    result = quick(payload)
                except Exception as exc:
                    log.debug("request %s failed", kind, exc_info=True)
                    self._reply(("rep", seq, False, str(exc) or repr(exc)))
                    return
                if isinstance(result, asyncio.Future):
                    result.add_done_callback(lambda done: self._reply(
                        ("rep", seq, True, done.result()) if not done.cancelled() else
                        ("rep", seq, False, "cancelled")))
                else:
                    self._reply(("rep", seq, True, result))
                return
            self._tasks.spawn(self._serve(seq, kind, payload, socks), name=f"rpc-{kind}")

    def _reply(self, reply: tuple[object, ...]) -> None:
        with contextlib.suppress(ChannelClosed):
            self.channel.send(reply)

    async def _serve(self, seq: int, kind: str, payload: Any,
                     socks: list[socket.socket]) -> None:
        try:
            result = await self._handlers[kind](payload, socks)
            reply: tuple[object, ...] = ("rep", seq, True, result)
        except Exception as exc:
            log.debug("request %s failed", kind, exc_info=True)
            text = exc.explain() if isinstance(exc, RelayError) else str(exc) or repr(exc)
            reply = ("rep", seq, False, text)
        self._reply(reply)


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("no answer from the other relay process"))


class RemoteError(Exception):
    """The other process answered a request with an error (its text is the message)."""
