"""Fixtures for the SMTP listener tests: a real listener on a free loopback port."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.config.schema import HostPort, ListenerConfig
from relay.envelope import Envelope
from relay.maillog import MailLog
from relay.metrics import Metrics
from relay.smtp.listener import SmtpListener
from relay.users import UserDB, hash_password, write_users
from relay.verdict import Checks

PASSWORD = "s3cret-Password!"


class Recorder:
    """The accept function: records what would be spooled, or raises ``fail``."""

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, bytes]] = []
        self.fail: BaseException | None = None
        self.count = 0

    async def __call__(self, envelope: Envelope, data: bytes) -> str:
        if self.fail is not None:
            raise self.fail
        self.count += 1
        self.messages.append((envelope, data))
        return f"TESTQ{self.count:04d}"


@dataclasses.dataclass
class Relay:
    listener: SmtpListener
    recorder: Recorder
    metrics: Metrics
    port: int
    ca: trustme.CA
    maillog_records: list[str]

    def refused(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "relay_messages_refused_total",
            {"listener": self.listener.config.name, "reason": reason})
        return value or 0.0


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def certs(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        with open(cert_path, "ab") as f:
            f.write(extra.bytes())
    return cert_path, key_path


@pytest.fixture(scope="session")
def user_hashes() -> dict[str, str]:
    return {"alice": hash_password(PASSWORD.encode()), "bob": hash_password(b"bobpw")}


@pytest.fixture
def users_file(tmp_path: Path, user_hashes: dict[str, str]) -> Path:
    path = tmp_path / "users"
    write_users(path, user_hashes)
    return path


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


StartRelay = Callable[..., Any]


@pytest.fixture
async def start_relay(certs: tuple[Path, Path], users_file: Path,
                      ca: trustme.CA) -> AsyncIterator[StartRelay]:
    started: list[SmtpListener] = []

    async def start(*, checks: Checks | None = None, users: bool = True,
                    auth_base_delay: float = 0.0, accept: Any = None,
                    connections: Any = None, **options: Any) -> Relay:
        cert, key = certs
        fields: dict[str, Any] = dict(
            name="platform", protocol="smtp", listen=HostPort("127.0.0.1", 0),
            tls="starttls", cert=cert, key=key, auth="required", users_file=users_file)
        fields.update(options)
        cfg = ListenerConfig(**fields)
        records: list[str] = []
        logger = logging.getLogger(f"relay.mail.test{id(records)}")
        logger.setLevel(logging.INFO)
        logger.addHandler(_ListHandler(records))
        logger.propagate = False
        metrics = Metrics()
        recorder = Recorder()
        listener = SmtpListener(
            cfg, hostname="relay.test", accept=accept or recorder, maillog=MailLog(logger),
            checks=checks, users=UserDB.load(users_file) if users else None,
            metrics=metrics, auth_base_delay=auth_base_delay, connections=connections)
        await listener.start()
        started.append(listener)
        port = listener.addresses[0][1]
        return Relay(listener, recorder, metrics, port, ca, records)

    yield start
    for listener in started:
        await listener.stop_accepting()
        await listener.wait_closed(1.0)


class RawClient:
    """A line-level SMTP client over a plain socket, for bytes smtplib will not send."""

    def __init__(self, port: int, timeout: float = 10.0, source: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""

    def reply(self) -> str:
        """One full (possibly multi-line) reply."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed; got {lines!r} {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """True once the server has closed the connection (reads EOF)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def run(func: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking client function off the loop the listener runs in."""
    return asyncio.to_thread(func, *args)


def submit(port: int, data: bytes, *, sender: str = "a@example.com",
           recipient: str = "b@example.net", helo: str = "platform.test") -> str:
    """One message over a raw socket (``data`` without the final "."); the DATA reply."""
    c = RawClient(port)
    c.reply()
    c.cmd(f"EHLO {helo}")
    c.cmd(f"MAIL FROM:<{sender}>")
    c.cmd(f"RCPT TO:<{recipient}>")
    c.cmd("DATA")
    c.send(data + b".\r\n")
    reply = c.reply()
    c.close()
    return reply
