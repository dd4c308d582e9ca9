"""Hostile POP3 clients before login: exact bytes in, the exact response out, and nothing
reaches the provider.

One table, one runner, as in ``test_smtp.py``; ``Case.stored`` counts connections relay
made to the provider (Dovecot). In sync means a ``NOOP`` still gets exactly the pre-login
``-ERR Command not allowed before login.``
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
LOGIN = f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode()
CLIENT_HELLO = b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + bytes(range(32))
STLS = {"tls": "starttls"}


def line_of(total: int) -> bytes:
    """A USER command line of exactly ``total`` octets, CRLF included."""
    return b"USER " + b"u" * (total - 7) + b"\r\n"


def guess(n: int, source: str, password: str = "wrong") -> tuple[Open | Send | Expect, ...]:
    name = f"g{n}"
    return (Open(name, source), Send(f"USER {USER}\r\n".encode(), to=name),
            Expect("+OK", on=name), Send(f"PASS {password}\r\n".encode(), to=name))


CASES = [
    # -- not POP3 at all ------------------------------------------------------------------
    Case("http_get", (Send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
                      Expect("-ERR This is a POP3 server.")), end="closed"),
    Case("tls_client_hello_on_plaintext", (Send(CLIENT_HELLO), Expect("-ERR This is a POP3")),
         end="closed"),
    Case("leading_space", (Send(b" USER agent\r\n"), Expect("-ERR This is a POP3")),
         end="closed"),
    Case("digits_first", (Send(b"123\r\n"), Expect("-ERR This is a POP3")), end="closed"),
    # -- malformed, answered in sync -------------------------------------------------------
    Case("command_not_allowed_before_login", (Send(b"RETR 1\r\n"),
                                              Expect("-ERR Command not allowed before login."))),
    Case("pass_before_user", (Send(b"PASS agent-pw\r\n"), Expect("-ERR No user name given."))),
    Case("empty_line", (Send(b"\r\n"), Expect("-ERR Command not allowed"))),
    Case("unknown_sasl_mechanism", (Send(b"AUTH CRAM-MD5\r\n"), Expect("-ERR Unsupported"))),
    Case("sasl_cancelled", (Send(b"AUTH LOGIN\r\n"), Expect("+ "), Send(b"*\r\n"),
                            Expect("-ERR Authentication canceled."))),
    Case("sasl_bad_base64", (Send(b"AUTH PLAIN !!!\r\n"), Expect("-ERR Invalid authentication"))),
    # -- user names with control characters never reach the provider -----------------------
    Case("user_with_soh", (Send(b"USER a\x01b\r\n"), Expect("-ERR Invalid user name."))),
    Case("user_with_escape", (Send(b"USER agent\x1b[2J\r\n"), Expect("-ERR Invalid user name."))),
    Case("user_with_del", (Send(b"USER agent\x7f\r\n"), Expect("-ERR Invalid user name."))),
    Case("user_with_c1_control", (Send("USER agent\u0085\r\n".encode()),
                                  Expect("-ERR Invalid user name."))),
    Case("user_with_nul", (Send(b"USER ag\x00ent\r\n"), Expect("-ERR Invalid credentials"))),
    Case("sasl_plain_user_with_control", (Send(b"AUTH PLAIN " + base64.b64encode(
        b"\0ag\x02ent\0" + PASSWORD.encode()) + b"\r\n"), Expect("-ERR Empty or invalid"))),
    Case("sasl_login_user_with_control", (Send(b"AUTH LOGIN\r\n"), Expect("+ "),
                                          Send(base64.b64encode(b"a\x01b") + b"\r\n"),
                                          Expect("-ERR Invalid authentication data"))),
    # -- RFC 2449: 255 octets a command line -------------------------------------------------
    Case("command_line_of_255_octets", (Send(line_of(255)), Expect("+OK"))),
    Case("command_line_of_256_octets", (Send(line_of(256)), Expect("-ERR Line too long.")),
         end="closed"),
    Case("command_line_far_too_long", (Send(b"USER " + b"x" * 9000 + b"\r\n"),
                                       Expect("-ERR Line too long.")), end="closed"),
    Case("unterminated_line_over_the_limit", (Send(b"USER " + b"x" * 400),
                                              Expect("-ERR Line too long.")), end="closed"),
    Case("long_sasl_initial_response_is_allowed",
         (Send(b"AUTH PLAIN " + base64.b64encode(b"\0agent\0" + b"p" * 600) + b"\r\n"),
          Expect("-ERR [AUTH] Authentication failed."))),
    # -- floods and slowness ------------------------------------------------------------------
    Case("invalid_command_flood", (Send(b"STAT\r\n" * 12), Expect("-ERR Command not", times=9),
                                   Expect("-ERR Command not allowed before login. Too many")),
         end="closed"),
    Case("auth_listing_flood", (Send(b"AUTH\r\n" * 30),
                                ExpectSome("", then="-ERR Too many commands without logging")),
         end="closed"),
    Case("capa_flood", (Send(b"CAPA\r\n" * 30),
                        ExpectSome("", then="-ERR Too many commands without logging")),
         end="closed"),
    Case("login_trickled_past_login_timeout",
         (Trickle(LOGIN, every=0.3, cut=True), Expect("-ERR Disconnected for inactivity.")),
         end="closed",
         opts={"login_timeout": 1.5}),
    # -- TLS --------------------------------------------------------------------------------
    Case("user_before_stls", (Send(b"USER agent\r\n"), Expect("-ERR [AUTH] Plaintext")),
         opts=STLS),
    Case("stls_then_garbage", (Send(b"STLS\r\n"), Expect("+OK Begin TLS"),
                               Send(b"\x16\x03\x01\x00\x05hello" + b"x" * 100)),
         end="closed", opts=STLS, log="TLS handshake with 127.0.0.1 failed"),
    Case("stls_stalled", (Send(b"STLS\r\n"), Expect("+OK Begin TLS")), end="closed",
         opts={**STLS, "tls_handshake_timeout": 0.5},
         log="did not finish within"),
    Case("stls_injection_is_dropped", (Send(b"STLS\r\n" + LOGIN), Expect("+OK Begin TLS"),
                                       StartTls()), opts=STLS),
    Case("implicit_tls_stalled", (Connect(),), end="closed", open_c=False,
         opts={"tls": "implicit", "tls_handshake_timeout": 0.5}, log="did not finish within"),
    Case("implicit_tls_garbage", (Connect(), Send(b"a LOGIN x y\r\n" * 50)), end="closed",
         open_c=False, opts={"tls": "implicit"}, log="TLS handshake with 127.0.0.1 failed"),
    # -- wrong passwords ----------------------------------------------------------------------
    Case("wrong_password_until_refused",
         (*[s for _ in range(4) for s in (Send(b"USER agent\r\nPASS wrong\r\n"), Expect("+OK"),
                                          Expect("-ERR [AUTH] Authentication failed."))],
          Send(b"USER agent\r\nPASS wrong\r\n"), Expect("+OK"),
          Expect("-ERR [SYS/TEMP] Too many failed logins from your address")),
         end="closed", opts={"account_fail_limit": 100}),
    Case("distributed_guess_refuses_the_account",
         (*[s for n in range(6) for s in (*guess(n, f"127.0.0.{n + 2}"), Expect(
             "-ERR [AUTH]" if n < 5 else "-ERR [SYS/TEMP] Too many failed logins for this "
             "account", on=f"g{n}"))],
          *guess(9, "127.0.0.9", PASSWORD),
          Expect("-ERR [SYS/TEMP] Too many failed logins for this account", on="g9")),
         log='account "agent" reached 5 failed logins'),
    # -- the control: a good login does reach the provider ------------------------------------
    Case("good_login_reaches_the_provider", (Send(LOGIN), Expect("+OK"), Expect("+OK Logged in"),
                                             Send(b"QUIT\r\n"), Expect("+OK")),
         end="closed", stored=1),
]

PROTOCOL = Protocol(kind="pop3", greeting="+OK relay ready.", refused="-ERR",
                    in_sync=(b"NOOP\r\n", "-ERR Command not allowed before login."))


@pytest.mark.fast
def test_the_catalogue_is_plenty() -> None:
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
async def test_hostile_pop3(case: Case, proxy_relay: StartProxy,
                            errors: Callable[[], list[str]],
                            caplog: pytest.LogCaptureFixture) -> None:
    relay = await proxy_relay("pop3", **case.opts)
    proto = Protocol(**{**PROTOCOL.__dict__, "tls": relay.tls})
    await run(play, case, relay.port, proto)
    assert relay.transport.connects == case.stored, "relay reached the provider"
    await until(lambda: relay.listener.session_count == 0)    # every session ended
    assert errors() == []
    assert not any(PASSWORD in r.getMessage() for r in caplog.records), "a password was logged"
    if case.log:
        await until(lambda: any(case.log in r.getMessage() for r in caplog.records))
