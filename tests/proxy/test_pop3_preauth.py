"""Transcript tests of the POP3 pre-auth machine: bytes in, events out, no sockets."""

from __future__ import annotations

import base64

import pytest

from relay.proxy.events import Close, Event, Login, Send, StartTls
from relay.proxy.pop3 import Pop3PreAuth

pytestmark = pytest.mark.fast


def machine(**kw: object) -> Pop3PreAuth:
    opts: dict[str, object] = {"tls_mode": "none", "max_line": 512}
    opts.update(kw)
    return Pop3PreAuth(**opts)  # type: ignore[arg-type]


def sent(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def logins(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.user, e.password.reveal()) for e in events if isinstance(e, Login)]


@pytest.mark.parametrize(("data", "expected"), [
    (b"USER alice\r\nPASS secret\r\n", ("alice", "secret")),
    (b"user alice\nPASS sec ret\n", ("alice", "sec ret")),
    (b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n", ("alice", "secret")),
    (b"AUTH PLAIN\r\n" + base64.b64encode(b"\0alice\0secret") + b"\r\n", ("alice", "secret")),
    (b"AUTH LOGIN\r\n" + base64.b64encode(b"alice") + b"\r\n" + base64.b64encode(b"secret")
     + b"\r\n", ("alice", "secret")),
])
def test_login_forms(data: bytes, expected: tuple[str, str]) -> None:
    events = machine().receive(data)
    assert logins(events) == [expected]
    assert b"-ERR" not in sent(events)


@pytest.mark.parametrize(("data", "reply"), [
    (b"CAPA\r\n", b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n"
                  b"AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"),
    (b"AUTH\r\n", b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"),
    (b"STAT\r\n", b"-ERR Command not allowed before login.\r\n"),
    (b"RETR 1\r\n", b"-ERR Command not allowed before login.\r\n"),
    (b"PASS secret\r\n", b"-ERR No user name given.\r\n"),
    (b"STLS\r\n", b"-ERR STLS not available.\r\n"),
    (b"AUTH CRAM-MD5\r\n", b"-ERR Unsupported authentication mechanism.\r\n"),
    (b"AUTH PLAIN\r\n*\r\n", b"+ \r\n-ERR Authentication canceled.\r\n"),
    (b"AUTH PLAIN ###\r\n", b"-ERR Invalid authentication data: invalid base64.\r\n"),
    (b"USER al\x00ice\r\n", b"-ERR Invalid credentials: control characters in credentials.\r\n"),
    (b"USER alice\r\nPASS a\rb\r\n",
     b"+OK\r\n-ERR Invalid credentials: control characters in credentials.\r\n"),
])
def test_replies_before_login(data: bytes, reply: bytes) -> None:
    events = machine().receive(data)
    assert sent(events) == reply
    assert not logins(events)


def test_stls_discards_pipelined_plaintext_and_requires_tls() -> None:
    m = machine(tls_mode="starttls")
    assert b"[AUTH]" in sent(m.receive(b"USER alice\r\n"))
    assert "STLS" in m.capabilities() and "USER" not in m.capabilities()
    out = m.receive(b"STLS\r\nUSER mallory\r\nPASS injected\r\n")
    assert sent(out) == b"+OK Begin TLS negotiation now.\r\n" and isinstance(out[-1], StartTls)
    m.tls_started()
    assert m.leftover() == b"" and "STLS" not in m.capabilities()
    assert logins(m.receive(b"USER alice\r\nPASS secret\r\n")) == [("alice", "secret")]


def test_long_line_closes() -> None:
    m = machine(max_line=64)
    events = m.receive(b"USER " + b"x" * 100)
    assert events[-1] == Close("line_too_long") and sent(events).startswith(b"-ERR")


def test_login_results_and_leftover() -> None:
    m = machine()
    assert logins(m.receive(b"USER a\r\nPASS b\r\nSTAT\r\n"))
    assert m.login_succeeded() == b"+OK Logged in.\r\n"
    assert m.leftover() == b"STAT\r\n"
    m = machine()
    m.receive(b"USER a\r\nPASS b\r\n")
    assert sent(m.login_failed("credentials")) == b"-ERR [AUTH] Authentication failed.\r\n"
    m.receive(b"USER a\r\nPASS b\r\n")
    assert sent(m.login_failed("unavailable")).startswith(b"-ERR [SYS/TEMP]")
    m.receive(b"USER a\r\nPASS b\r\n")
    assert m.login_failed("refused")[-1] == Close("refused")


def test_quit() -> None:
    events = machine().receive(b"QUIT\r\n")
    assert sent(events) == b"+OK Logging out.\r\n" and events[-1] == Close("logout")
