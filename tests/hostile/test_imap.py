"""Hostile IMAP clients before login: exact bytes in, the exact response out, and nothing
reaches the provider.

One table, one runner, as in ``test_smtp.py``; here ``Case.stored`` counts connections
relay made to the provider (Dovecot): 0 unless the case logs in for real. In sync means
a ``z NOOP`` still gets exactly ``z OK``.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest

from tests.hostile.conftest import AGENT, StartProxy
from tests.hostile.harness import (
    Case,
    Connect,
    Expect,
    ExpectSome,
    Open,
    Protocol,
    Send,
    StartTls,
    Trickle,
    ids,
    play,
)
from tests.proxy.conftest import until
from tests.smtp.conftest import run

USER, PASSWORD = AGENT
LOGIN = f"a LOGIN {USER} {PASSWORD}\r\n".encode()
CLIENT_HELLO = b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + bytes(range(32))
STARTTLS = {"tls": "starttls"}


def sasl(*parts: str) -> bytes:
    return base64.b64encode("\0".join(parts).encode())


def guess(n: int, source: str, password: str = "wrong") -> tuple[Open | Send, ...]:
    return (Open(f"g{n}", source), Send(f"a LOGIN {USER} {password}\r\n".encode(), to=f"g{n}"))


CASES = [
    # -- not IMAP at all ------------------------------------------------------------------
    Case("http_get", (Send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
                      Expect("* BYE This is an IMAP server.")), end="closed"),
    Case("tls_client_hello_on_plaintext", (Send(CLIENT_HELLO), Expect("* BYE This is an IMAP")),
         end="closed"),
    Case("binary_line", (Send(b"\x00\x01\x02\r\n"), Expect("* BYE This is an IMAP")),
         end="closed"),
    Case("high_bytes", (Send(b"\xff\xfe a LOGIN x y\r\n"), Expect("* BYE This is an IMAP")),
         end="closed"),
    # -- malformed, answered in sync -------------------------------------------------------
    Case("command_not_allowed_before_login", (Send(b"a SELECT INBOX\r\n"),
                                              Expect("a BAD Command not allowed"))),
    Case("empty_line", (Send(b"\r\n"), Expect("* BAD"))),
    Case("invalid_tag", (Send(b"((( LOGIN x y\r\n"), Expect("* BAD Invalid tag"))),
    Case("login_with_three_arguments", (Send(b"a LOGIN x y z\r\n"), Expect("a BAD Invalid"))),
    Case("unterminated_quote", (Send(b'a LOGIN "agent agent-pw\r\n'),
                                Expect("a BAD Unterminated quoted string."))),
    Case("cr_in_quoted_string", (Send(b'a LOGIN "ag\rent" "agent-pw"\r\n'),
                                 Expect("a BAD CR, LF or NUL"))),
    # -- user names with control characters never reach the provider -----------------------
    Case("control_char_in_user", (Send(b'a LOGIN "ag\x01ent" "agent-pw"\r\n'),
                                  Expect("a BAD Control characters in the user name."))),
    Case("del_in_user", (Send(b'a LOGIN "agent\x7f" "agent-pw"\r\n'),
                         Expect("a BAD Control characters in the user name."))),
    Case("c1_control_in_user", (Send('a LOGIN "agent\u0085" "agent-pw"\r\n'.encode()),
                                Expect("a BAD Control characters in the user name."))),
    Case("control_char_in_literal_user", (Send(b"a LOGIN {6}\r\n"), Expect("+ Ready"),
                                          Send(b"ag\x1bent agent-pw\r\n"),
                                          Expect("a BAD Control characters"))),
    Case("control_char_in_sasl_plain_user",
         (Send(b"a AUTHENTICATE PLAIN " + sasl("", "ag\x02ent", PASSWORD) + b"\r\n"),
          Expect("a BAD Invalid authentication data"))),
    Case("control_char_in_sasl_login_user",
         (Send(b"a AUTHENTICATE LOGIN\r\n"), Expect("+ "),
          Send(base64.b64encode(b"ag\x03ent") + b"\r\n"),
          Expect("a BAD Invalid authentication data"))),
    # -- limits -----------------------------------------------------------------------------
    Case("literal_too_large", (Send(b"a LOGIN {999999999}\r\n"), Expect("a BAD Literal too"),
                               Expect("* BYE")), end="closed"),
    Case("line_too_long", (Send(b"a LOGIN " + b"x" * 9000 + b"\r\n"),
                           Expect("* BYE Command line too long.")), end="closed"),
    Case("noop_flood", (Send(b"a NOOP\r\n" * 100), Expect("a OK NOOP", times=20),
                        Expect("* BYE Too many commands without logging in.")), end="closed"),
    Case("capability_flood", (Send(b"c CAPABILITY\r\n" * 30),
                              *[Expect(p) for _ in range(20) for p in ("* CAPABILITY", "c OK")],
                              Expect("* BYE Too many commands")), end="closed"),
    Case("id_flood", (Send(b'i ID ("name" "x")\r\n' * 30),
                      *[Expect(p) for _ in range(20) for p in ("* ID NIL", "i OK")],
                      Expect("* BYE Too many commands")), end="closed"),
    Case("invalid_command_flood", (Send(b"a FETCH 1 BODY[]\r\n" * 12),
                                   Expect("a BAD", times=10), Expect("* BYE Too many invalid")),
         end="closed"),
    Case("login_trickled_past_login_timeout",
         (Trickle(LOGIN, every=0.3, cut=True), Expect("* BYE Disconnected for inactivity.")),
         end="closed", opts={"login_timeout": 1.0}),
    Case("idle_past_login_timeout", (Expect("* BYE Disconnected for inactivity."),),
         end="closed", opts={"login_timeout": 0.5}),
    # -- TLS --------------------------------------------------------------------------------
    Case("login_before_starttls", (Send(LOGIN), Expect("a NO [PRIVACYREQUIRED]")),
         opts=STARTTLS),
    Case("starttls_then_garbage", (Send(b"a STARTTLS\r\n"), Expect("a OK Begin TLS"),
                                   Send(b"\x16\x03\x01\x00\x05hello" + b"x" * 100)),
         end="closed", opts=STARTTLS, log="TLS handshake with 127.0.0.1 failed"),
    Case("starttls_stalled", (Send(b"a STARTTLS\r\n"), Expect("a OK Begin TLS")),
         end="closed", opts={**STARTTLS, "tls_handshake_timeout": 0.5},
         log="did not finish within"),
    Case("starttls_injection_is_dropped", (Send(b"a STARTTLS\r\n" + LOGIN.replace(b"a ", b"b ")),
                                           Expect("a OK Begin TLS"), StartTls()),
         opts=STARTTLS),
    Case("starttls_twice", (Send(b"a STARTTLS\r\n"), Expect("a OK Begin TLS"), StartTls(),
                            Send(b"b STARTTLS\r\n"), Expect("b BAD TLS is already active.")),
         opts=STARTTLS),
    Case("implicit_tls_stalled", (Connect(),), end="closed", open_c=False,
         opts={"tls": "implicit", "tls_handshake_timeout": 0.5}, log="did not finish within"),
    Case("implicit_tls_garbage", (Connect(), Send(b"a LOGIN x y\r\n" * 50)), end="closed",
         open_c=False, opts={"tls": "implicit"}, log="TLS handshake with 127.0.0.1 failed"),
    # -- wrong passwords ----------------------------------------------------------------------
    Case("wrong_password_until_refused",
         (*[s for _ in range(4) for s in (Send(b"a LOGIN agent wrong\r\n"),
                                          Expect("a NO [AUTHENTICATIONFAILED]"))],
          Send(b"a LOGIN agent wrong\r\n"), Expect("a NO [UNAVAILABLE] Too many failed logins "
                                                   "from your address"), Expect("* BYE")),
         end="closed", opts={"account_fail_limit": 100}),
    Case("distributed_guess_refuses_the_account",
         (*[s for n in range(6) for s in (*guess(n, f"127.0.0.{n + 2}"), Expect(
             "a NO [AUTHENTICATIONFAILED]" if n < 5 else "a NO [UNAVAILABLE] Too many failed "
             "logins for this account", on=f"g{n}"))],
          *guess(9, "127.0.0.9", PASSWORD),
          Expect("a NO [UNAVAILABLE] Too many failed logins for this account", on="g9")),
         log='account "agent" reached 5 failed logins'),
    # -- the control: a good login does reach the provider ------------------------------------
    Case("good_login_reaches_the_provider", (Send(LOGIN), ExpectSome("*", then="a OK"),
                                             Send(b"z LOGOUT\r\n"), ExpectSome("*", "z OK")),
         end="closed", stored=1),
]

PROTOCOL = Protocol(kind="imap", greeting="* OK [CAPABILITY", refused="* BYE",
                    in_sync=(b"z NOOP\r\n", "z OK NOOP completed."))


@pytest.mark.fast
def test_the_catalogue_is_plenty() -> None:
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
async def test_hostile_imap(case: Case, proxy_relay: StartProxy,
                            errors: Callable[[], list[str]],
                            caplog: pytest.LogCaptureFixture) -> None:
    relay = await proxy_relay("imap", **case.opts)
    proto = Protocol(**{**PROTOCOL.__dict__, "tls": relay.tls})
    await run(play, case, relay.port, proto)
    assert relay.transport.connects == case.stored, "relay reached the provider"
    await until(lambda: relay.listener.session_count == 0)    # every session ended
    assert errors() == []
    assert not any(PASSWORD in r.getMessage() for r in caplog.records), "a password was logged"
    if case.log:
        await until(lambda: any(case.log in r.getMessage() for r in caplog.records))
