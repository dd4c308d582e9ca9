"""The hostile catalogue's interpreter: a case is exact bytes sent and exact replies expected.

A case is a tuple of steps run in order by ``play`` (in a thread, with blocking sockets,
while relay runs in the test's event loop). Clients are named; ``c`` is opened at the
start from 127.0.0.1 unless the case opens its own. Steps:

- ``Open(name, source)``: connect from a loopback address, read the greeting (``expect``);
  ``Connect(name, source)``: connect only (an implicit-TLS port greets after TLS);
- ``Send(data)`` / ``Trickle(data, every)``: bytes at once, or one byte at a time (stops
  quietly when relay hangs up, which is what trickle cases check);
- ``Expect(prefix, times=1)``: the next reply (SMTP: a whole multi-line reply; IMAP and
  POP3: one line) starts with ``prefix``, ``times`` times; ``ExpectSome(prefix, then)``:
  any number of ``prefix`` replies, then one starting with ``then``;
- ``Closed()``: relay closed the connection (EOF or reset), with nothing more to read;
- ``StartTls()``: upgrade the client side (the server answered STARTTLS/STLS already);
- ``Flood(addresses, each)``/``Admitted(n)``: open many connections and count how many
  were greeted (the rest must have been refused with the protocol's own reply).

After the last step the runner checks the session's fate: ``end="in_sync"`` sends a
harmless command (NOOP) and expects its own success reply, proving no reply was left
over or lost; ``end="closed"`` checks that relay hung up. Then the protocol's test checks
that nothing was stored (SMTP) or that nothing reached the provider (IMAP/POP3).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Open:
    name: str
    source: str = "127.0.0.1"
    expect: str = ""                    # the greeting's prefix ("" = protocol default)


@dataclass(frozen=True)
class Connect:
    """Connect without waiting for a greeting (implicit TLS: the server waits for us)."""

    name: str = "c"
    source: str = "127.0.0.1"


@dataclass(frozen=True)
class Send:
    data: bytes
    to: str = "c"


@dataclass(frozen=True)
class Trickle:
    """``size`` bytes every ``every`` seconds; ``cut``: relay must hang up before the last."""

    data: bytes
    every: float
    to: str = "c"
    cut: bool = False
    size: int = 1


@dataclass(frozen=True)
class Expect:
    prefix: str
    times: int = 1
    on: str = "c"


@dataclass(frozen=True)
class ExpectSome:
    """Any number of replies starting with ``prefix``, then one starting with ``then``."""

    prefix: str
    then: str
    on: str = "c"


@dataclass(frozen=True)
class Closed:
    on: str = "c"


@dataclass(frozen=True)
class StartTls:
    on: str = "c"


@dataclass(frozen=True)
class Flood:
    """``each`` connections from each of ``addresses``, held open (greeted or not)."""

    addresses: tuple[str, ...]
    each: int


@dataclass(frozen=True)
class Admitted:
    """Of the last Flood, ``count`` were greeted; every other one got ``refused``."""

    count: int
    refused: str


Step = Open | Connect | Send | Trickle | Expect | ExpectSome | Closed | StartTls | Flood | Admitted


@dataclass(frozen=True)
class Case:
    name: str
    steps: tuple[Step, ...]
    end: Literal["in_sync", "closed"] = "in_sync"
    opts: dict[str, Any] = field(default_factory=dict)   # listener settings for the case
    stored: int = 0                                       # messages relay must have stored
    open_c: bool = True                                   # open client "c" first
    log: str = ""                                         # text relay must have logged


class PeerClosed(Exception):
    """Relay closed the connection while the client was still sending."""


class LineClient:
    """A blocking client speaking lines; ``kind`` decides how a reply is read."""

    def __init__(self, port: int, *, kind: str, source: str = "127.0.0.1",
                 timeout: float = 10.0) -> None:
        self.kind = kind
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.buf = b""

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise PeerClosed from exc

    def trickle(self, data: bytes, every: float, size: int = 1) -> bool:
        """``size`` bytes at a time; False once relay has closed the connection."""
        for i in range(0, len(data), size):
            try:
                self.sock.sendall(data[i:i + size])
            except (BrokenPipeError, ConnectionResetError):
                return False
            if self._eof_waiting(every):
                return False
        return True

    def _eof_waiting(self, seconds: float) -> bool:
        """Wait ``seconds`` for relay to say something; True when it has hung up."""
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        except (ConnectionResetError, ssl.SSLError):
            return True
        finally:
            self.sock.settimeout(10.0)
        self.buf += chunk
        return chunk == b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ConnectionError(f"closed before a full line; have {self.buf[:200]!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self) -> str:
        """SMTP: a whole (multi-line) reply; IMAP/POP3: one line."""
        if self.kind != "smtp":
            return self.line().decode("latin-1").rstrip("\r\n")
        lines = []
        while True:
            line = self.line().decode("latin-1").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3:4] != "-":
                return "\n".join(lines)

    def closed(self, timeout: float = 10.0) -> bool:
        """True when relay hangs up (EOF or reset) within ``timeout`` with nothing unread."""
        if self.buf:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return True
        except TimeoutError:
            return False
        if data:
            self.buf += data
            return False
        return True

    def starttls(self, context: ssl.SSLContext) -> None:
        assert not self.buf, f"bytes after the STARTTLS reply: {self.buf!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class Protocol:
    """What differs between SMTP, IMAP and POP3 for the interpreter."""

    kind: str
    greeting: str                     # prefix of a normal greeting
    refused: str                      # prefix of a greeting that refuses the connection
    in_sync: tuple[bytes, str]        # harmless command and the prefix of its reply
    tls: Callable[[], ssl.SSLContext] | None = None


def play(case: Case, port: int, proto: Protocol) -> dict[str, Any]:
    """Run ``case`` against relay on ``port``; returns facts for the caller to check."""
    clients: dict[str, LineClient] = {}
    flood: list[LineClient] = []
    facts: dict[str, Any] = {"greeted": 0}
    try:
        if case.open_c:
            _open(clients, "c", "127.0.0.1", proto.greeting, port, proto)
        for i, step in enumerate(case.steps):
            try:
                _step(step, clients, flood, facts, port, proto)
            except (AssertionError, OSError) as exc:
                raise AssertionError(f"{case.name}: step {i + 1} {step!r}: {exc!r}") from exc
        if "c" not in clients:
            pass                                      # the case checked its own clients
        elif case.end == "in_sync":
            c = clients["c"]
            c.send(proto.in_sync[0])
            got = c.reply()
            assert got.startswith(proto.in_sync[1]), \
                f"{case.name}: out of sync: {proto.in_sync[0]!r} got {got!r}"
            assert not c.buf, f"{case.name}: unexpected extra bytes {c.buf[:200]!r}"
        else:
            assert clients["c"].closed(), f"{case.name}: relay did not close the session"
    finally:
        for client in [*clients.values(), *flood]:
            client.close()
    return facts


def _open(clients: dict[str, LineClient], name: str, source: str, expect: str, port: int,
          proto: Protocol) -> None:
    client = LineClient(port, kind=proto.kind, source=source)
    clients[name] = client
    got = client.reply()
    assert got.startswith(expect or proto.greeting), f"greeting {got!r}"


def _step(step: Step, clients: dict[str, LineClient], flood: list[LineClient],
          facts: dict[str, Any], port: int, proto: Protocol) -> None:
    if isinstance(step, Open):
        _open(clients, step.name, step.source, step.expect, port, proto)
    elif isinstance(step, Connect):
        clients[step.name] = LineClient(port, kind=proto.kind, source=step.source)
    elif isinstance(step, Send):
        clients[step.to].send(step.data)
    elif isinstance(step, Trickle):
        started = time.monotonic()
        complete = clients[step.to].trickle(step.data, step.every, step.size)
        facts["trickle_seconds"] = time.monotonic() - started
        assert not (step.cut and complete), \
            f"relay let all {len(step.data)} bytes trickle in ({facts['trickle_seconds']:.1f} s)"
    elif isinstance(step, Expect):
        for i in range(step.times):
            got = clients[step.on].reply()
            assert got.startswith(step.prefix), \
                f"reply {i + 1} of {step.times}: expected {step.prefix!r}, got {got!r}"
    elif isinstance(step, ExpectSome):
        while True:
            got = clients[step.on].reply()
            if got.startswith(step.then):
                break
            assert got.startswith(step.prefix), \
                f"expected {step.prefix!r} replies then {step.then!r}, got {got!r}"
    elif isinstance(step, Closed):
        assert clients[step.on].closed(), "relay did not close the connection"
    elif isinstance(step, StartTls):
        assert proto.tls is not None
        clients[step.on].starttls(proto.tls())
    elif isinstance(step, Flood):
        greeted = 0
        for source in step.addresses:
            for _ in range(step.each):
                client = LineClient(port, kind=proto.kind, source=source)
                flood.append(client)
                first = client.reply()
                if first.startswith(proto.greeting):
                    greeted += 1
                else:
                    facts.setdefault("refusals", []).append(first)
        facts["greeted"] = greeted
    elif isinstance(step, Admitted):
        assert facts["greeted"] == step.count, \
            f"{facts['greeted']} flood connections greeted, expected {step.count}"
        assert all(r.startswith(step.refused) for r in facts.get("refusals", [])), \
            facts.get("refusals", [])[:3]


def ids(cases: Sequence[Case]) -> list[str]:
    return [c.name for c in cases]
