"""Property tests: any byte stream, split anywhere, never crashes the pre-auth machines,
never yields credentials with control characters, and never buffers beyond the limit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proxy.events import Close, Event, Login
from relay.proxy.imap import ImapPreAuth
from relay.proxy.pop3 import Pop3PreAuth

pytestmark = pytest.mark.fast

# Fragments that steer random input toward interesting states.
PIECES = st.sampled_from([
    b"a LOGIN ", b"b AUTHENTICATE PLAIN", b"AUTH PLAIN ", b"USER ", b"PASS ", b"{5}", b"{3+}",
    b"{99999999}", b'"', b"\\", b"\r\n", b"\n", b"\r", b"\x00", b" ", b"AGFsaWNlAHB3", b"*",
    b"c STARTTLS", b"STLS", b"x", b"alice", b"CAPA", b"d NOOP",
])
STREAM = st.lists(st.one_of(PIECES, st.binary(max_size=40)), max_size=40)


def feed(machine: ImapPreAuth | Pop3PreAuth, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        out = machine.receive(chunk)
        events += out
        assert len(machine._buf) <= 4 * machine.max_line + len(chunk)
        if any(isinstance(e, (Login, Close)) for e in out):
            break
    return events


def check(events: list[Event]) -> None:
    for e in events:
        if isinstance(e, Login):
            secret = e.password.reveal()
            assert e.user and secret
            assert not any(c in e.user + secret for c in "\x00\r\n")


@settings(max_examples=400, deadline=None)
@given(STREAM, st.sampled_from(["none", "starttls", "implicit"]))
def test_imap_machine_survives_anything(chunks: list[bytes], tls: str) -> None:
    m = ImapPreAuth(tls_mode=tls, tls_active=tls == "implicit", max_line=256)  # type: ignore[arg-type]
    check(feed(m, chunks))


@settings(max_examples=400, deadline=None)
@given(STREAM, st.sampled_from(["none", "starttls", "implicit"]))
def test_pop3_machine_survives_anything(chunks: list[bytes], tls: str) -> None:
    m = Pop3PreAuth(tls_mode=tls, tls_active=tls == "implicit", max_line=256)  # type: ignore[arg-type]
    check(feed(m, chunks))
