"""A middlebox on loopback between relay and its upstream that injects network faults.

It speaks just enough SMTP to know where a session is (greeting, EHLO, MAIL, RCPT, the
DATA command, the message body, the final dot) and, when an armed ``Rule`` matches, drops
the connection, resets it, stalls, answers in the upstream's place, or strips STARTTLS
from the EHLO reply, before or after passing the command on. After STARTTLS it passes
bytes blindly (they are encrypted). ``tcp=True`` makes it a plain byte pipe (a token
endpoint behind it) that can only refuse or stall. Runs on its own event loop thread, so
the test's body can be blocking and relay a real process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from tests.peers import free_port, refuse_in_fast_lane

# Where a rule can strike, in session order.
EVENTS = ("connect", "greeting", "EHLO", "STARTTLS", "MAIL", "RCPT", "DATA", "body", "dot")
ACTIONS = ("drop", "rst", "stall", "reply", "drop_after", "stall_after", "strip_starttls",
           "garbage", "delay")


@dataclass
class Rule:
    """At ``at``, do ``do`` (``reply``: answer ``text`` in the upstream's place).

    ``drop``/``rst``/``stall``/``reply`` act before the command reaches the upstream
    (``reply`` to the final dot also closes: the upstream never saw the message);
    ``drop_after``/``stall_after`` pass it on and then lose or sit on the upstream's
    reply (after ``dot``: the upstream has the message, relay cannot know); ``delay``
    waits ``text`` seconds before passing it on.
    ``times`` matches, then the rule is spent.
    """

    at: str
    do: str
    text: str = ""
    times: int = 1

    def __post_init__(self) -> None:
        assert self.at in EVENTS and self.do in ACTIONS, (self.at, self.do)


class _Cut(Exception):
    """End this connection now (the fault fired)."""


class FaultProxy:
    """``with FaultProxy(upstream_port) as fp:`` relay connects to ``fp.port``."""

    def __init__(self, target: int, *, tcp: bool = False) -> None:
        self.target = target
        self.tcp = tcp
        self.port = 0
        self.fired: list[str] = []
        self.stalls = 0                    # connections a rule has begun to hold (stall*)
        self.plaintext: list[str] = []     # commands seen before any TLS
        self.connections = 0
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._refusing = False
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stalled: list[asyncio.Event] = []

    # --- control (from the test's thread) -------------------------------------------------

    def arm(self, *rules: Rule) -> None:
        with self._lock:
            self._rules.extend(rules)

    def disarm(self) -> None:
        """Drop every rule still armed and let stalled connections go (they close)."""
        with self._lock:
            self._rules.clear()
        self._call(self._release)

    @property
    def armed(self) -> int:
        with self._lock:
            return sum(r.times for r in self._rules)

    def refuse(self, on: bool = True) -> None:
        """Stop listening (connection refused) or listen again on the same port."""
        self._refusing = on
        self._call(self._listen_or_not)

    # --- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        refuse_in_fast_lane("a fault proxy on loopback")
        self.port = free_port()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"fault-proxy-{self.port}")
        self._thread.start()
        self._call(self._listen_or_not)
        return self

    def __exit__(self, *exc: object) -> None:
        self._refusing = True
        self._call(self._listen_or_not)
        self._call(self._release)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()

    def _call(self, func: object) -> None:
        async def run() -> None:
            result = func()  # type: ignore[operator]
            if asyncio.iscoroutine(result):
                await result
        asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    async def _listen_or_not(self) -> None:
        if self._refusing and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        elif not self._refusing and self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                      reuse_address=True, limit=1 << 24)

    def _release(self) -> None:
        for ev in self._stalled:
            ev.set()
        self._stalled.clear()

    # --- the sessions -----------------------------------------------------------------------

    def _take(self, at: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.at == at and rule.times > 0:
                    rule.times -= 1
                    if rule.times == 0:
                        self._rules.remove(rule)
                    self.fired.append(f"{at}:{rule.do}")
                    return rule
        return None

    async def _stall(self) -> None:
        ev = asyncio.Event()
        self._stalled.append(ev)
        self.stalls += 1                  # after ``stall_after``: the reply is in hand
        await ev.wait()
        raise _Cut

    async def _handle(self, creader: asyncio.StreamReader,
                      cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        swriter: asyncio.StreamWriter | None = None
        try:
            rule = self._take("connect")
            if rule is not None:
                await self._strike(rule, cwriter, None)
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target,
                                                             limit=1 << 24)
            if self.tcp:
                await _pipe_both(creader, cwriter, sreader, swriter)
            else:
                await self._smtp(creader, cwriter, sreader, swriter)
        except (_Cut, OSError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for w in (cwriter, swriter):
                if w is not None:
                    w.close()

    async def _strike(self, rule: Rule, client: asyncio.StreamWriter,
                      server: asyncio.StreamWriter | None) -> None:
        """Act before passing anything on (drop, rst, stall, reply, garbage)."""
        if rule.do == "stall":
            await self._stall()
        if rule.do == "rst":
            sock = client.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raise _Cut
        if rule.do == "drop":
            raise _Cut
        if rule.do == "reply":
            client.write(rule.text.encode() + b"\r\n")
            await client.drain()
            if rule.text.startswith("421"):
                raise _Cut
            return
        if rule.do == "garbage":
            client.write(b"HTTP/1.1 400 Bad Request\r\n")
            await client.drain()
            return

    async def _smtp(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter,
                    sreader: asyncio.StreamReader, swriter: asyncio.StreamWriter) -> None:
        greeting = await _reply(sreader)
        rule = self._take("greeting")
        if rule is not None:
            await self._strike(rule, cwriter, swriter)
            if rule.do in ("reply", "garbage"):
                greeting = b""
        cwriter.write(greeting)
        await cwriter.drain()
        in_data = False
        while True:
            if in_data:
                body = await creader.readuntil(b"\r\n.\r\n")
                in_data = False
                if (rule := self._take("body")) is not None:
                    swriter.write(body[:len(body) // 2])         # half the message, then gone
                    await swriter.drain()
                    raise _Cut
                command, event, data = "", "dot", body
            else:
                data = await creader.readuntil(b"\r\n")
                command = data[:8].split(b" ")[0].split(b":")[0].strip().upper().decode(
                    "ascii", "replace")
                event = command if command in EVENTS else ""
            if command:
                self.plaintext.append(command)
            rule = self._take(event) if event else None
            if rule is not None and rule.do == "delay":
                await asyncio.sleep(float(rule.text))   # a slow path, on purpose
            elif rule is not None and rule.do not in ("drop_after", "stall_after",
                                                      "strip_starttls"):
                await self._strike(rule, cwriter, swriter)
                if event == "dot":
                    raise _Cut                # the upstream is still waiting for a body
                continue                      # answered in the upstream's place
            swriter.write(data)
            await swriter.drain()
            reply = await _reply(sreader)
            if rule is not None and rule.do == "drop_after":
                raise _Cut
            if rule is not None and rule.do == "stall_after":
                await self._stall()
            if rule is not None and rule.do == "strip_starttls":
                reply = _strip_starttls(reply)
            cwriter.write(reply)
            await cwriter.drain()
            if command == "DATA" and reply.startswith(b"354"):
                in_data = True
            elif command == "STARTTLS" and reply.startswith(b"220"):
                await _pipe_both(creader, cwriter, sreader, swriter)    # encrypted from here
                return
            elif command == "QUIT":
                return


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole (multi-line) SMTP reply."""
    out = b""
    while True:
        line = await reader.readuntil(b"\r\n")
        out += line
        if line[3:4] != b"-":
            return out


def _strip_starttls(reply: bytes) -> bytes:
    lines = [ln for ln in reply.split(b"\r\n") if ln and ln[4:].upper() != b"STARTTLS"]
    last = lines[-1]
    lines[-1] = last[:3] + b" " + last[4:]
    return b"".join(ln + b"\r\n" for ln in lines)


async def _pipe_both(creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter,
                     sreader: asyncio.StreamReader, swriter: asyncio.StreamWriter) -> None:
    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        with contextlib.suppress(OSError):
            w.write_eof()

    await asyncio.gather(pipe(creader, swriter), pipe(sreader, cwriter))


@contextlib.contextmanager
def fault_proxy(target: int, *, tcp: bool = False) -> Iterator[FaultProxy]:
    with FaultProxy(target, tcp=tcp) as fp:
        yield fp
