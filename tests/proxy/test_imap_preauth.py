"""Transcript tests of the IMAP pre-auth machine: bytes in, events out, no sockets."""

from __future__ import annotations

import base64

import pytest

from relay.proxy.events import Close, Event, Login, Send, StartTls
from relay.proxy.imap import ImapPreAuth

pytestmark = pytest.mark.fast


def machine(**kw: object) -> ImapPreAuth:
    opts: dict[str, object] = {"tls_mode": "none", "max_line": 8192}
    opts.update(kw)
    return ImapPreAuth(**opts)  # type: ignore[arg-type]


def sent(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def logins(events: list[Event]) -> list[tuple[str, str, str]]:
    return [(e.user, e.password.reveal(), e.mechanism) for e in events if isinstance(e, Login)]


def b64(s: bytes) -> bytes:
    return base64.b64encode(s)


LOGIN_CASES = [
    # (input, (user, password))
    (b"a LOGIN alice secret\r\n", ("alice", "secret")),
    (b'a LOGIN "alice" "se cr\\"et\\\\"\r\n', ("alice", 'se cr"et\\')),
    (b"a login alice secret\n", ("alice", "secret")),                    # bare LF, lower case
    (b'a LOGIN "al\xc3\xa9" "p\xc3\xa4ss"\r\n', ("al\u00e9", "p\u00e4ss")),   # UTF-8 quoted
    (b"a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n", ("alice", "secret")),   # LITERAL+
    (b"a AUTHENTICATE PLAIN " + b64(b"\0alice\0secret") + b"\r\n", ("alice", "secret")),
    (b"a AUTHENTICATE PLAIN " + b64(b"alice\0alice\0secret") + b"\r\n", ("alice", "secret")),
    (b"a authenticate plain\r\n" + b64(b"\0alice\0secret") + b"\r\n", ("alice", "secret")),
    (b"a AUTHENTICATE LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(b"secret") + b"\r\n",
     ("alice", "secret")),
]


@pytest.mark.parametrize(("data", "expected"), LOGIN_CASES)
def test_login_forms(data: bytes, expected: tuple[str, str]) -> None:
    m = machine()
    events = m.receive(data)
    assert [(u, p) for u, p, _ in logins(events)] == [expected]
    assert b"BAD" not in sent(events)


def test_synchronising_literal_gets_continuation_then_login() -> None:
    m = machine()
    assert sent(m.receive(b"a LOGIN {5}\r\n")) == b"+ Ready for literal data\r\n"
    assert sent(m.receive(b"alice {6}\r\n")) == b"+ Ready for literal data\r\n"
    events = m.receive(b"sec")
    assert events == []
    events = m.receive(b"ret\r\n")
    assert logins(events) == [("alice", "secret", "login")]


def test_byte_at_a_time_is_the_same_as_all_at_once() -> None:
    m = machine()
    data = b'a LOGIN {5+}\r\nalice "secret"\r\n'
    events: list[Event] = []
    for i in range(len(data)):
        events += m.receive(data[i:i + 1])
    assert logins(events) == [("alice", "secret", "login")]


def test_login_success_reply_carries_upstream_capabilities_and_pipelined_bytes_stay() -> None:
    m = machine()
    events = m.receive(b"t1 LOGIN alice secret\r\nt2 SELECT INBOX\r\n")
    assert logins(events)
    assert m.receive(b"t3 NOOP\r\n") == []            # never parsed after Login
    reply = m.login_succeeded("IMAP4rev1 IDLE", b"* OK hello\r\n")
    assert reply == b"* OK hello\r\nt1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
    assert m.leftover() == b"t2 SELECT INBOX\r\nt3 NOOP\r\n"


def test_failed_login_answers_and_keeps_parsing() -> None:
    m = machine()
    events = m.receive(b"t1 LOGIN alice wrong\r\nt2 NOOP\r\n")
    assert logins(events)
    out = m.login_failed("credentials")
    assert sent(out) == (b"t1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
                         b"t2 OK NOOP completed.\r\n")
    out = m.receive(b"t3 LOGIN alice wrong\r\n")
    out = m.login_failed("refused")
    assert b"t3 NO [UNAVAILABLE]" in sent(out) and isinstance(out[-1], Close)


@pytest.mark.parametrize(("data", "reply"), [
    (b"a CAPABILITY\r\n", b"* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN\r\n"
                          b"a OK Capability completed.\r\n"),
    (b"a NOOP\r\n", b"a OK NOOP completed.\r\n"),
    (b'a ID ("name" "mutt")\r\n', b"* ID NIL\r\na OK ID completed.\r\n"),
    (b"a SELECT INBOX\r\n", b"a BAD Command not allowed before login.\r\n"),
    (b"a STARTTLS\r\n", b"a BAD STARTTLS not available.\r\n"),
    (b"a LOGIN onlyuser\r\n", b"a BAD Invalid arguments to LOGIN.\r\n"),
    (b"a AUTHENTICATE CRAM-MD5\r\n", b"a NO Unsupported authentication mechanism.\r\n"),
    (b"a AUTHENTICATE PLAIN\r\n*\r\n", b"+ \r\na BAD Authentication canceled.\r\n"),
    (b"a AUTHENTICATE PLAIN !!!\r\n", b"a BAD Invalid authentication data: invalid base64.\r\n"),
    (b"a AUTHENTICATE PLAIN " + b64(b"bob\0alice\0pw") + b"\r\n",
     b"a BAD Invalid authentication data: authorization identity differs from the user.\r\n"),
    (b"\r\n", b"* BAD Invalid tag or command.\r\n"),
    (b"+tag NOOP\r\n", b"* BAD Invalid tag or command.\r\n"),
    (b'a LOGIN "alice secret\r\n', b"a BAD Unterminated quoted string.\r\n"),
    (b'a LOGIN "al\rice" "pw"\r\n', b"a BAD CR, LF or NUL inside a quoted string.\r\n"),
    (b'a LOGIN al\x00ice pw\r\n', b"a BAD Invalid characters in atom.\r\n"),
    (b'a LOGIN "alice"x pw\r\n', b"a BAD Missing space after quoted string.\r\n"),
    (b"a LOGIN {8+}\r\nal\r\nice pw\r\n",
     b"a BAD Invalid credentials: control characters in credentials.\r\n"),
])
def test_replies_before_login(data: bytes, reply: bytes) -> None:
    m = machine()
    events = m.receive(data)
    assert sent(events) == reply
    assert not logins(events)


def test_crlf_injected_inside_quoted_login_never_becomes_a_command() -> None:
    m = machine()
    events = m.receive(b'a LOGIN "alice\r\nb DELETE INBOX" "pw"\r\n')
    assert not logins(events)
    assert sent(events) == (b"a BAD Unterminated quoted string.\r\n"
                            b"b BAD Command not allowed before login.\r\n")


def test_starttls_discards_pipelined_plaintext_and_requires_tls_for_login() -> None:
    m = machine(tls_mode="starttls")
    assert b"LOGINDISABLED" in m.greeting() and b"STARTTLS" in m.greeting()
    assert b"AUTH=PLAIN" not in m.greeting()
    out = m.receive(b"a LOGIN alice secret\r\n")
    assert sent(out).startswith(b"a NO [PRIVACYREQUIRED]") and not logins(out)
    out = m.receive(b"b STARTTLS\r\nc LOGIN mallory injected\r\n")
    assert sent(out) == b"b OK Begin TLS negotiation now.\r\n"
    assert isinstance(out[-1], StartTls) and not logins(out)
    m.tls_started()
    assert m.leftover() == b""
    caps = m.capabilities()
    assert "STARTTLS" not in caps and "AUTH=PLAIN" in caps and "LOGINDISABLED" not in caps
    assert logins(m.receive(b"d LOGIN alice secret\r\n")) == [("alice", "secret", "login")]


def test_implicit_tls_allows_login_and_offers_no_starttls() -> None:
    m = machine(tls_mode="implicit", tls_active=True)
    assert b"STARTTLS" not in m.greeting() and b"AUTH=PLAIN" in m.greeting()
    assert sent(m.receive(b"a STARTTLS\r\n")) == b"a BAD TLS is already active.\r\n"


@pytest.mark.parametrize(("data", "reason"), [
    (b"a LOGIN {999999999}\r\n", "literal_too_large"),
    (b"a LOGIN {999999999+}\r\n", "literal_too_large"),
    (b"a LOGIN {99999999999999999999}\r\n", "literal_too_large"),
    (b"a LOGIN {100}\r\n", "literal_too_large"),            # max_line is 64 here
    (b"a LOGIN " + b"x" * 100 + b"\r\n", "line_too_long"),
    (b"a LOGIN " + b"x" * 100, "line_too_long"),            # no newline yet: still refused
    (b"a LOGIN {20+}\r\n" + b"y" * 20 + b" {30+}\r\n", "literal_too_large"),   # total size
])
def test_oversized_input_is_refused_and_closed_without_allocating(data: bytes,
                                                                   reason: str) -> None:
    m = machine(max_line=64)
    events = m.receive(data)
    assert isinstance(events[-1], Close) and events[-1].reason == reason
    assert b"BAD" in sent(events) or b"BYE" in sent(events)
    assert not logins(events)
    assert m.receive(b"b NOOP\r\n") == []                    # closed: nothing more parsed


def test_too_many_bad_commands_close() -> None:
    m = machine(max_bad=3)
    events = m.receive(b"a X\r\nb X\r\nc X\r\nd NOOP\r\n")
    assert isinstance(events[-1], Close) and events[-1].reason == "bad_input"
    assert b"d OK" not in sent(events)


def test_logout_and_timeout() -> None:
    m = machine()
    events = m.receive(b"a LOGOUT\r\n")
    assert sent(events) == b"* BYE Logging out.\r\na OK Logout completed.\r\n"
    assert events[-1] == Close("logout")
    assert machine().timed_out().startswith(b"* BYE")
    assert machine().refuse("busy") == b"* BYE [UNAVAILABLE] busy\r\n"


def test_password_never_in_repr() -> None:
    (ev,) = [e for e in machine().receive(b"a LOGIN alice hunter2\r\n") if isinstance(e, Login)]
    assert "hunter2" not in repr(ev)
