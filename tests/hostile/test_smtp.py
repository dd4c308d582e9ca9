"""Hostile SMTP clients: exact bytes in, the exact reply class out, and nothing stored.

One table, one runner. To add a case, append a ``Case`` to ``CASES``: the bytes the client
sends, the replies it must get (``Expect`` prefixes), how the session must end (in sync:
a NOOP still gets its own 250; or closed on purpose) and any listener settings it needs.
Every case also checks that relay stored nothing (unless ``stored`` says otherwise) and
logged no error or traceback.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable

import pytest

from tests.hostile.conftest import PASSWORD, StartSmtp
from tests.hostile.harness import (
    Admitted,
    Case,
    Connect,
    Expect,
    ExpectSome,
    Flood,
    Open,
    Protocol,
    Send,
    StartTls,
    Trickle,
    ids,
    play,
)
from tests.smtp.conftest import run


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


EHLO = (Send(b"EHLO client.example\r\n"), Expect("250"))
ENVELOPE = (*EHLO, Send(b"MAIL FROM:<agent@example.com>\r\n"), Expect("250"),
            Send(b"RCPT TO:<customer@example.net>\r\n"), Expect("250"))
DATA = (*ENVELOPE, Send(b"DATA\r\n"), Expect("354"))
MESSAGE = (*DATA, Send(b"Subject: fine\r\n\r\nhello\r\n.\r\n"),
           Expect("250 2.0.0 Ok: queued"))
PLAINTEXT_AUTH = {"tls": "none", "allow_plaintext_auth": True, "allow": ()}
CLIENT_HELLO = (b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + bytes(range(32)) +
                b"\x00\x00\x02\x13\x01\x01\x00")
NOOPS = b"NOOP\r\n" * 10_000


def guess(n: int, source: str, password: str = "wrong") -> tuple[Open | Send | Expect, ...]:
    """Client ``g<n>`` from ``source`` tries one AUTH PLAIN for alice."""
    name = f"g{n}"
    return (Open(name, source), Send(b"EHLO x\r\n", to=name), Expect("250", on=name),
            Send(b"AUTH PLAIN " + plain("alice", password) + b"\r\n", to=name))


CASES = [
    # -- not SMTP at all: closed at once, nothing answered line by line -----------------
    Case("http_get", (Send(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n"),
                      Expect("221 2.7.0")), end="closed"),
    Case("http_post_after_ehlo", (*EHLO, Send(b"POST /submit HTTP/1.0\r\n\r\n"),
                                  Expect("221 2.7.0")), end="closed"),
    Case("http_connect_proxy_probe", (Send(b"CONNECT mail.example.com:25 HTTP/1.1\r\n\r\n"),
                                      Expect("221 2.7.0")), end="closed"),
    Case("http_version_on_any_verb", (Send(b"FETCH /x HTTP/1.1\r\n"),
                                      Expect("221 2.7.0")), end="closed"),
    Case("tls_client_hello_on_plaintext", (Send(CLIENT_HELLO), Expect("221 2.7.0")),
         end="closed"),
    Case("tls_client_hello_after_ehlo", (*EHLO, Send(CLIENT_HELLO), Expect("221 2.7.0")),
         end="closed"),
    Case("sslv2_hello", (Send(b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10"),
                         Expect("221 2.7.0")), end="closed"),
    Case("nul_bytes_line", (Send(b"\x00\x00\x00\r\n"), Expect("221 2.7.0")), end="closed"),
    Case("leading_space", (Send(b" EHLO x\r\n"), Expect("221 2.7.0")), end="closed"),
    Case("control_character_in_verb", (*EHLO, Send(b"EH\x01LO x\r\n"), Expect("221 2.7.0")),
         end="closed"),
    # -- malformed but SMTP-shaped: answered, the session stays in sync -------------------
    Case("empty_line", (Send(b"\r\n"), Expect("500"))),
    Case("unknown_verb", (Send(b"XYZZY plugh\r\n"), Expect("500 5.5.2"))),
    Case("verb_with_digit", (Send(b"EHLO1 x\r\n"), Expect("500 5.5.2"))),
    Case("punctuation_verb", (*EHLO, Send(b"MAIL:FROM<a@b.example>\r\n"), Expect("500 5.5.2"))),
    Case("lowercase_is_fine", (Send(b"ehlo x\r\n"), Expect("250"))),
    Case("non_ascii_verb", (Send(b"EHL\xc3\x96 x\r\n"), Expect("500"))),
    Case("line_over_32k", (*EHLO, Send(b"NOOP " + b"x" * 40_000 + b"\r\n"), Expect("500"))),
    Case("mail_before_ehlo", (Send(b"MAIL FROM:<a@example.com>\r\n"), Expect("503 5.5.1"))),
    Case("rcpt_before_mail", (*EHLO, Send(b"RCPT TO:<b@example.net>\r\n"),
                              Expect("503 5.5.1"))),
    Case("data_before_rcpt", (*EHLO, Send(b"MAIL FROM:<a@example.com>\r\n"), Expect("250"),
                              Send(b"DATA\r\n"), Expect("503 5.5.1"))),
    Case("nested_mail", (*ENVELOPE, Send(b"MAIL FROM:<a@example.com>\r\n"),
                         Expect("503 5.5.1"))),
    Case("nul_in_address", (*EHLO, Send(b"MAIL FROM:<a\x00b@example.com>\r\n"),
                            Expect("501 5.1.3"))),
    Case("percent_hack", (*EHLO, Send(b"MAIL FROM:<a@example.com>\r\n"), Expect("250"),
                          Send(b"RCPT TO:<victim%other.example@example.net>\r\n"),
                          Expect("553 5.1.3"))),
    Case("source_route", (*EHLO, Send(b"MAIL FROM:<@evil.example:a@example.com>\r\n"),
                          Expect("553 5.1.3"))),
    Case("data_with_argument", (*ENVELOPE, Send(b"DATA now\r\n"), Expect("501"))),
    Case("unknown_mail_parameter", (*EHLO, Send(b"MAIL FROM:<a@example.com> EVIL=1\r\n"),
                                    Expect("555 5.5.4"))),
    Case("relay_from_outside_needs_auth", (*EHLO, Send(b"MAIL FROM:<a@example.com>\r\n"),
                                           Expect("530 5.7.0")), opts={"allow": ()}),
    # -- DATA that must not become a message ----------------------------------------------
    Case("bare_lf_smuggling", (*DATA, Send(b"Subject: x\r\n\r\none\n.\nMAIL FROM:<e@x>\r\n"
                                           b"\r\n.\r\n"), Expect("550 5.5.2"))),
    Case("bare_cr_header_injection", (*DATA, Send(b"Subject: hi\rBcc: x@evil.example\r\n"
                                                  b"\r\nbody\r\n.\r\n"), Expect("550 5.5.2"))),
    Case("too_big", (*DATA, Send(b"x" * 3000 + b"\r\n.\r\n"), Expect("552 5.3.4")),
         opts={"max_message_size": 1024}),
    Case("data_idle_timeout", (*DATA, Send(b"Subject: half\r\n\r\nno end"),
                               Expect("421 4.4.2")), end="closed", opts={"data_timeout": 0.5}),
    Case("data_trickled_past_the_deadline",
         (*DATA, Trickle(b"Subject: slow\r\n\r\n" + b"x" * 200, every=0.25, cut=True),
          Expect("421 4.4.2 relay.test Error: message data arrived too slowly")), end="closed",
         opts={"data_timeout": 5.0, "data_deadline": 1.0}),
    Case("steady_sender_outlives_the_base_deadline",
         (*DATA, Trickle(b"Subject: steady\r\n\r\n" + b"x" * 6000 + b"\r\n.\r\n",
                         every=0.3, size=1000), Expect("250 2.0.0 Ok: queued")), stored=1,
         opts={"data_deadline": 0.5, "min_data_rate": 1000}),
    Case("same_sender_without_the_rate_extension_is_cut",
         (*DATA, Trickle(b"Subject: steady\r\n\r\n" + b"x" * 6000 + b"\r\n.\r\n",
                         every=0.3, size=1000, cut=True), Expect("421 4.4.2")), end="closed",
         opts={"data_deadline": 0.5, "min_data_rate": 0}),
    # -- junk: capped, and never a reason to keep a session ---------------------------------
    Case("ten_thousand_noops", (Send(NOOPS), Expect("250", times=20), Expect("421 4.7.0")),
         end="closed"),
    Case("rset_flood", (*EHLO, Send(b"RSET\r\n" * 100), Expect("250", times=20),
                        Expect("421 4.7.0")), end="closed"),
    Case("vrfy_flood", (Send(b"VRFY root\r\n" * 30), Expect("252", times=20),
                        Expect("421 4.7.0")), end="closed"),
    Case("unknown_verb_flood", (Send(b"BOGUS\r\n" * 30), Expect("500", times=20),
                                Expect("421 4.7.0")), end="closed"),
    Case("empty_line_flood", (Send(b"\r\n" * 30), Expect("500", times=20),
                              Expect("421 4.7.0")), end="closed"),
    Case("mixed_junk", (Send(b"NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\nEXPN x\r\nWHAT\r\n" * 5),
                        Expect("", times=20), Expect("421 4.7.0")), end="closed"),
    Case("junk_limit_is_configurable", (Send(b"NOOP\r\n" * 5), Expect("250", times=3),
                                        Expect("421 4.7.0")), end="closed",
         opts={"max_junk_commands": 3}),
    Case("junk_count_restarts_after_a_message",
         (Send(b"NOOP\r\n" * 15), Expect("250", times=15), *MESSAGE,
          Send(b"NOOP\r\n" * 15), Expect("250", times=15)), stored=1),
    Case("noops_do_not_extend_the_command_deadline",
         (*EHLO, Trickle(b"NOOP\r\n" * 20, every=0.05, cut=True),
          ExpectSome("250", then="421 4.4.2")),
         end="closed",
         opts={"command_timeout": 1.0, "max_junk_commands": 1000}),
    Case("command_line_trickled_past_the_deadline",
         (Trickle(b"EHLO a-very-slow-client.example\r\n", every=0.2, cut=True),
          Expect("421 4.4.2")),
         end="closed", opts={"command_timeout": 1.0}),
    # -- AUTH ---------------------------------------------------------------------------------
    Case("auth_before_starttls", (*EHLO, Send(b"AUTH PLAIN " + plain("alice", PASSWORD) +
                                              b"\r\n"), Expect("538 5.7.11"))),
    Case("auth_bad_base64", (*EHLO, Send(b"AUTH PLAIN !!!notbase64\r\n"), Expect("501 5.5.2")),
         opts=PLAINTEXT_AUTH),
    Case("auth_unknown_mechanism", (*EHLO, Send(b"AUTH CRAM-MD5\r\n"), Expect("504")),
         opts=PLAINTEXT_AUTH),
    Case("auth_cancelled", (*EHLO, Send(b"AUTH LOGIN\r\n"), Expect("334"), Send(b"*\r\n"),
                            Expect("501 5.7.0")), opts=PLAINTEXT_AUTH),
    Case("auth_response_too_long", (*EHLO, Send(b"AUTH PLAIN\r\n"), Expect("334"),
                                    Send(b"A" * 20_000 + b"\r\n"), Expect("500 5.5.6")),
         opts=PLAINTEXT_AUTH),
    Case("auth_wrong_password_until_refused",
         (*EHLO, *[s for _ in range(4) for s in (
             Send(b"AUTH PLAIN " + plain("alice", "wrong") + b"\r\n"), Expect("535 5.7.8"))],
          Send(b"AUTH PLAIN " + plain("alice", "wrong") + b"\r\n"), Expect("421 4.7.0")),
         end="closed", opts={**PLAINTEXT_AUTH, "account_fail_limit": 100}),
    Case("distributed_guess_refuses_the_account",
         (*[s for n in range(6) for s in (*guess(n, f"127.0.0.{n + 2}"),
                                          Expect("535" if n < 5 else "454", on=f"g{n}"))],
          *guess(9, "127.0.0.9", PASSWORD), Expect("454 4.7.0", on="g9"),
          Send(b"AUTH PLAIN " + plain("bob", "bobpw") + b"\r\n", to="g9"),
          Expect("235", on="g9")),
         opts=PLAINTEXT_AUTH, log='account "alice" reached 5 failed logins'),
    # -- TLS ------------------------------------------------------------------------------------
    Case("starttls_then_garbage", (*EHLO, Send(b"STARTTLS\r\n"), Expect("220"),
                                   Send(b"\x16\x03\x01\x00\x05hello" + b"x" * 100)),
         end="closed", log="TLS handshake with 127.0.0.1 failed"),
    Case("starttls_stalled_past_the_handshake_deadline",
         (*EHLO, Send(b"STARTTLS\r\n"), Expect("220")), end="closed",
         opts={"tls_handshake_timeout": 0.5}, log="did not finish within"),
    Case("starttls_injection_is_dropped", (*EHLO, Send(b"STARTTLS\r\nRSET\r\n"), Expect("220"),
                                           StartTls(), Send(b"EHLO x\r\n"), Expect("250"))),
    Case("implicit_tls_stalled", (Connect(),), end="closed", open_c=False,
         opts={"tls": "implicit", "tls_handshake_timeout": 0.5}, log="did not finish within"),
    Case("implicit_tls_garbage", (Connect(), Send(b"EHLO x\r\n" * 50)), end="closed",
         open_c=False, opts={"tls": "implicit"}, log="TLS handshake with 127.0.0.1 failed"),
    Case("starttls_twice", (*EHLO, Send(b"STARTTLS\r\n"), Expect("220"), StartTls(), *EHLO,
                            Send(b"STARTTLS\r\n"), Expect("503 5.5.1"))),
    # -- connection slots ---------------------------------------------------------------------
    Case("slow_sessions_from_ten_addresses_leave_room",
         (Flood(tuple(f"127.0.1.{i}" for i in range(1, 11)), each=22),
          Admitted(181, refused="421 4.7.0"), Open("legit", "127.0.2.1"),
          Send(b"EHLO legit.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
               b"DATA\r\n", to="legit"), Expect("250", on="legit", times=3),
          Expect("354", on="legit"), Send(b"Subject: ok\r\n\r\nin\r\n.\r\n", to="legit"),
          Expect("250 2.0.0 Ok: queued", on="legit")), stored=1, open_c=False,
         end="closed", opts={"max_connections": 200, "max_connections_per_client": 20}),
    Case("connection_rate_per_network",
         (Flood(("127.0.3.1", "127.0.3.2"), each=3), Admitted(4, refused="421 4.7.0"),
          Open("other", "127.0.4.1")), open_c=False, end="closed",
         opts={"max_connection_rate_per_client": 2}),
    Case("ipv4_prefix_counts_a_whole_network",
         (Flood(("127.0.5.1", "127.0.5.2", "127.0.5.3"), each=1),
          Admitted(2, refused="421 4.7.0")), open_c=False, end="closed",
         opts={"max_connections_per_client": 2, "client_ipv4_prefix": 24}),
]


def protocol(tls: Callable[[], object] | None = None) -> Protocol:
    return Protocol(kind="smtp", greeting="220 relay.test", refused="421",
                    in_sync=(b"NOOP\r\n", "250 2.0.0 OK"), tls=tls)  # type: ignore[arg-type]


@pytest.mark.fast
def test_the_catalogue_is_plenty() -> None:
    assert len(CASES) >= 45 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
async def test_hostile_smtp(case: Case, smtp_relay: StartSmtp,
                            errors: Callable[[], list[str]],
                            caplog: pytest.LogCaptureFixture) -> None:
    relay = await smtp_relay(**case.opts)
    if case.name.startswith("slow_sessions") or case.name.startswith("connection_rate"):
        assert os.sysconf("SC_OPEN_MAX") > 1000
    await run(play, case, relay.port, protocol(relay.tls))
    assert len(relay.recorder.messages) == case.stored, "relay stored what it must not"
    assert errors() == []
    assert not any(PASSWORD in r.getMessage() for r in caplog.records), "a password was logged"
    if case.log:
        await run(lambda: _wait_log(caplog, case.log))
    if case.end == "closed" and not case.name.startswith(("slow_sessions", "connection_rate",
                                                          "ipv4_prefix")):
        # a session closed on purpose gives its slot back
        await run(lambda: _wait_gauge(relay, 0.0))


def _wait_log(caplog: pytest.LogCaptureFixture, text: str) -> None:
    from tests.peers import wait_until
    wait_until(lambda: any(text in r.getMessage() for r in caplog.records), timeout=10)


def _wait_gauge(relay: object, value: float) -> None:
    from tests.peers import wait_until
    wait_until(lambda: relay.sample("relay_smtp_sessions",  # type: ignore[attr-defined]
                                    listener="platform") == value, timeout=10)
