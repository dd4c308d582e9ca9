"""Where a logged-in IMAP or POP3 session may end cleanly: its safe points (sans-IO).

After login relay only moves bytes, but when a reload changes the path to the provider
(proxy, tunnel, credentials) a session that goes the old way should end, and only where
the client loses nothing: never inside a command or a response, never in a literal or a
FETCH. A ``Watch`` follows both byte streams of one session without changing a byte: it
splits each into messages (IMAP commands and responses with their literals, POP3 lines
and multi-line responses) and knows which commands await their response.

``drain()`` asks for the end. From then on no new client command is let through (the
bytes of the command being sent still are), and at the first moment nothing is in flight
(every command answered, or the only one open is an IDLE the server acknowledged) the
watch is ``at_rest``: ``feed`` forwards nothing more and ``on_rest`` is called once. The
caller then tells the client (``* BYE``, or ``-ERR`` to a held POP3 command) and closes.

Literal bodies need not be seen: ``blind()`` says how many bytes of the stream may be
moved without looking (the kernel splices them), ``skip(n)`` accounts for them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable

_HEAD = 128           # bytes kept of each message's start (tag, command or status)
_TAIL = 32            # bytes kept of each line's end (a literal's {N} marker)


def literal_size(tail: bytes) -> int | None:
    """The size of the literal announced at the end of a line (``{N}``, ``{N+}``,
    ``~{N}``), or None. ``tail`` ends with LF."""
    line = tail.rstrip(b"\r\n")
    if not line.endswith(b"}"):
        return None
    start = line.rfind(b"{")
    if start < 0:
        return None
    digits = line[start + 1:-1].removesuffix(b"+")
    return int(digits) if digits.isdigit() and len(digits) <= 18 else None


class Stream:
    """One direction of a session, split into messages; ``literals`` for IMAP."""

    __slots__ = ("head", "in_message", "literal", "literals", "tail")

    def __init__(self, *, literals: bool) -> None:
        self.literals = literals
        self.literal = 0              # bytes of a literal still to come
        self.in_message = False       # between a message's first byte and its end
        self.head = bytearray()
        self.tail = b""

    @property
    def at_boundary(self) -> bool:
        return not self.in_message and not self.literal

    def feed(self, data: bytes, ended: Callable[[bytes], None],
             stop: Callable[[], bool]) -> int:
        """Consume ``data``; ``ended(head)`` for each message that ends; before each new
        message ``stop()`` may say to hold the rest. Returns the bytes consumed."""
        i, n = 0, len(data)
        while i < n:
            if self.literal:
                take = min(self.literal, n - i)
                self.literal -= take
                i += take
                continue
            if not self.in_message:
                if stop():
                    break
                self.in_message = True
                self.head = bytearray()
            j = data.find(b"\n", i)
            end = n if j < 0 else j + 1
            if len(self.head) < _HEAD:
                self.head += data[i:min(end, i + _HEAD - len(self.head))]
            self.tail = (self.tail + data[max(i, end - _TAIL):end])[-_TAIL:]
            i = end
            if j < 0:
                break
            size = literal_size(self.tail) if self.literals else None
            self.tail = b""
            if size is not None:
                self.literal = size
            else:
                self.in_message = False
                ended(bytes(self.head))
        return i


class Watch(ABC):
    """Both streams of one logged-in session; subclasses know the protocol."""

    def __init__(self) -> None:
        self.draining = False
        self.rested = False                   # at rest while draining: the end is now
        self.held = False                     # client bytes were held back
        self.opaque = ""                      # why safe points cannot be seen, if so
        self.on_rest: Callable[[], None] | None = None
        self.up: Stream
        self.down: Stream

    # -- the streams ----------------------------------------------------------------------
    def from_client(self, data: bytes) -> int:
        """Bytes the client sent; returns how many of them may go to the server."""
        if self.rested:
            self.held = self.held or bool(data)
            return 0
        used = self.up.feed(data, self.command, lambda: self.draining)
        if used < len(data):
            self.held = True
        self._check()
        return used

    def from_server(self, data: bytes) -> int:
        """Bytes the server sent; returns how many of them may go to the client."""
        if self.rested:
            return 0
        used = self.down.feed(data, self.response, self._rest_here)
        self._check()
        return used

    def blind(self, stream: Stream) -> int:
        """Bytes of ``stream`` that may move unseen (the rest of a literal)."""
        return stream.literal

    def skip(self, stream: Stream, n: int) -> None:
        stream.literal -= n

    # -- the end --------------------------------------------------------------------------
    def drain(self) -> None:
        """Hold new commands and end at the next safe point (``on_rest``)."""
        self.draining = True
        self._check()

    @property
    def at_rest(self) -> bool:
        if self.opaque or not (self.up.at_boundary and self.down.at_boundary):
            return False
        return self.idle()

    def _rest_here(self) -> bool:
        return self.draining and self.at_rest

    def _check(self) -> None:
        if self.draining and not self.rested and self.at_rest:
            self.rested = True
            if self.on_rest is not None:
                self.on_rest()

    # -- the protocol ---------------------------------------------------------------------
    @abstractmethod
    def command(self, head: bytes) -> None:
        """A command line from the client (its head, up to any literal)."""

    @abstractmethod
    def response(self, head: bytes) -> None:
        """A response line from the provider."""

    @abstractmethod
    def idle(self) -> bool:
        """Nothing awaits an answer (both streams are between messages)."""


class ImapWatch(Watch):
    """IMAP4rev1: tagged commands, literals both ways, IDLE (RFC 3501, 2177, 7888)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = Stream(literals=True)
        self.down = Stream(literals=True)
        self.waiting: list[bytes] = []           # tags sent, not yet answered
        self.idle_tag: bytes | None = None
        self.idling = False                      # the server said "+" to IDLE

    def command(self, head: bytes) -> None:
        words = head.split(None, 2)
        if self.idle_tag is not None and head.strip().upper() == b"DONE":
            self.idling = False                  # the IDLE ends; its tagged OK follows
            return
        if not words:
            return
        tag = words[0]
        self.waiting.append(tag)
        verb = words[1].upper() if len(words) > 1 else b""
        if verb == b"IDLE":
            self.idle_tag, self.idling = tag, False
        elif verb in (b"COMPRESS", b"STARTTLS"):
            self.opaque = f"the client sent {verb.decode()}: the bytes that follow are not " \
                          "readable IMAP"

    def response(self, head: bytes) -> None:
        if head.startswith(b"+"):
            if self.idle_tag is not None:
                self.idling = True
            return
        if head.startswith(b"*"):
            return
        tag = head.split(None, 1)[0] if head.strip() else b""
        if tag in self.waiting:
            self.waiting.remove(tag)
        if tag == self.idle_tag:
            self.idle_tag, self.idling = None, False

    def idle(self) -> bool:
        if not self.waiting:
            return True
        return self.idling and self.waiting == [self.idle_tag]

    def farewell(self, reason: str) -> tuple[bytes, bytes]:
        """(to the client, to the server) when the session ends at a safe point."""
        text = reason.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
        upstream = (b"DONE\r\n" if self.idling else b"") + b"RZ LOGOUT\r\n"
        return b"* BYE " + text + b"\r\n", upstream


# POP3 commands whose +OK answer is a multi-line response ending in "." (RFC 1939, 2449).
_MULTI_ALWAYS = frozenset((b"RETR", b"TOP", b"CAPA"))
_MULTI_WITHOUT_ARGUMENT = frozenset((b"LIST", b"UIDL"))


class Pop3Watch(Watch):
    """POP3: one response per command, in order (pipelining allowed), multi-line ones
    ending with a line holding a single dot."""

    def __init__(self) -> None:
        super().__init__()
        self.up = Stream(literals=False)
        self.down = Stream(literals=False)
        self.expect: deque[bool] = deque()       # per command sent: multi-line if +OK
        self.multi = False                        # inside a multi-line response

    def command(self, head: bytes) -> None:
        words = head.split()
        verb = words[0].upper() if words else b""
        self.expect.append(verb in _MULTI_ALWAYS or
                           (verb in _MULTI_WITHOUT_ARGUMENT and len(words) == 1))

    def response(self, head: bytes) -> None:
        if self.multi:
            if head.rstrip(b"\r\n") == b".":
                self.multi = False
            return
        multi = self.expect.popleft() if self.expect else False
        self.multi = multi and head.startswith(b"+OK")

    def idle(self) -> bool:
        return not self.expect and not self.multi

    def farewell(self, reason: str) -> tuple[bytes, bytes]:
        """(to the client, to the server): a held command gets ``-ERR``; the server is not
        told QUIT, so deletions the client marked are not committed without its QUIT."""
        text = reason.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
        return (b"-ERR [SYS/TEMP] " + text + b"\r\n" if self.held else b""), b""


def watch_for(protocol: str) -> ImapWatch | Pop3Watch:
    return ImapWatch() if protocol == "imap" else Pop3Watch()
