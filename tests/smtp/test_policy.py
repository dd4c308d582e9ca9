"""Relay policy: never an open relay, strict addresses, recipient limits, check hooks."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

import pytest

from relay.envelope import Envelope
from relay.smtp.policy import parse_command
from relay.verdict import BaseChecks, Refusal, SessionInfo
from tests.smtp.conftest import RawClient, StartRelay, run

ALLOW = (ipaddress.ip_network("127.0.0.0/8"),)


def session(relay_port: int, commands: list[str]) -> list[str]:
    c = RawClient(relay_port)
    c.reply()
    c.cmd("EHLO client.test")
    out = [c.cmd(cmd) for cmd in commands]
    c.close()
    return out


@pytest.mark.parametrize(("options", "mail", "rcpt", "reason"), [
    ({"auth": "required"}, "530 5.7.0 Authentication required", None, "auth_required"),
    ({"auth": "none", "users": False, "allow": (ipaddress.ip_network("10.0.0.0/8"),)},
     "550 5.7.1 Relaying denied", None, "relay_denied"),
    ({"auth": "required", "relay_domains": ("inbound.example",)}, "250 2.1.0 Ok",
     "530 5.7.0 Authentication required", "auth_required"),
    ({"auth": "none", "users": False, "relay_domains": ("inbound.example",)}, "250 2.1.0 Ok",
     "550 5.7.1 Relaying denied", "relay_denied"),
])
async def test_open_relay_attempts_are_refused(start_relay: StartRelay, options: dict[str, object],
                                               mail: str, rcpt: str | None,
                                               reason: str) -> None:
    relay = await start_relay(**options)
    cmds = ["MAIL FROM:<spammer@example.org>", "RCPT TO:<victim@elsewhere.example>",
            "RCPT TO:<victim%elsewhere.example@inbound.example>", "DATA"]
    out = await run(session, relay.port, cmds)
    assert out[0] == mail
    if rcpt is not None:
        assert out[1] == rcpt
        assert out[2].startswith("553 5.1.3 ")          # percent hack through an inbound domain
        assert out[3] == "503 5.5.1 Error: need RCPT command"
    else:
        assert out[1] == "503 5.5.1 Error: need MAIL command"
    assert relay.recorder.messages == []
    assert relay.refused(reason) >= 1
    assert any("rejected" in r and f"reason={reason}" in r and "spammer@example.org" in r
               for r in relay.maillog_records)


async def test_inbound_domain_accepts_anyone(start_relay: StartRelay) -> None:
    relay = await start_relay(auth="required", relay_domains=("inbound.example",))
    out = await run(session, relay.port, [
        "MAIL FROM:<someone@internet.example>", "RCPT TO:<support@INBOUND.example>",
        "DATA", "Subject: hi\r\n\r\nhello\r\n."])
    assert out == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>",
                   "250 2.0.0 Ok: queued as TESTQ0001"]
    env = relay.recorder.messages[0][0]
    assert not env.trusted and env.auth_user == ""


@pytest.mark.parametrize(("command", "reply"), [
    ("RCPT TO:<user%other.example@example.net>", "553 5.1.3 "),
    ("RCPT TO:<other.example!user@example.net>", "553 5.1.3 "),
    ('RCPT TO:<"user@other.example"@example.net>', "553 5.1.3 "),
    ('RCPT TO:<"a\\"b"@example.net>', "553 5.1.3 "),
    ("RCPT TO:<@hop1.example,@hop2.example:user@example.net>", "553 5.1.3 "),
    ("RCPT TO:<user\x00x@example.net>", "501 5.1.3 "),
    ("RCPT TO:<user\x7f@example.net>", "501 5.1.3 "),
    ("RCPT TO:<user@example.net.>", "501 5.1.3 "),
    ("RCPT TO:<user@-bad.example>", "501 5.1.3 "),
    ("RCPT TO:<user@exa_mple.net>", "501 5.1.3 "),
    ("RCPT TO:<a..b@example.net>", "501 5.1.3 "),
    ("RCPT TO:<postmaster>", "501 5.1.3 "),
    ("RCPT TO:<>", "501 5.1.3 "),
    ("RCPT TO:<ü@example.net>", "553 5.6.7 "),
    ("RCPT TO:<" + "l" * 65 + "@example.net>", "501 5.1.3 "),
    ("RCPT TO:<b@example.net> NOTIFY=NEVER", "555 5.5.4 "),
    ("RCPT TO:b@example.net", "250 2.1.5 "),
    ('RCPT TO:<"john smith"@example.net>', "250 2.1.5 "),
    ("RCPT TO:<b@[192.0.2.1]>", "250 2.1.5 "),
    ("RCPT TO:<b@[IPv6:2001:db8::1]>", "250 2.1.5 "),
    ("RCPT TO:<b@[300.0.0.1]>", "501 5.1.3 "),
])
async def test_recipient_address_policy(start_relay: StartRelay, command: str,
                                        reply: str) -> None:
    relay = await start_relay(allow=ALLOW)
    out = await run(session, relay.port, ["MAIL FROM:<a@example.com>", command, "NOOP"])
    assert out[1].startswith(reply), out
    assert out[2] == "250 2.0.0 OK"          # the session carries on


@pytest.mark.fast
@pytest.mark.parametrize(("arg", "utf8", "ok"), [
    ("FROM:<>", False, True),
    ("FROM:<a@example.com> BODY=8BITMIME SIZE=10", False, True),
    ("FROM:<ü@exämple.com> SMTPUTF8", True, True),
    ("FROM:<ü@example.com>", False, False),
    ("FROM:<a%b@example.com>", False, False),
    ("FROM:<a@example.com>junk", False, False),
    ("FROM:<a@example.com", False, False),
    ("FROM:<a@example.com> SIZE=", False, False),
    ("TO:<a@example.com>", False, False),
])
def test_parse_mail_from_table(arg: str, utf8: bool, ok: bool) -> None:
    if ok:
        parsed = parse_command(arg, "FROM:", what="sender", null_ok=True)
        assert ("SMTPUTF8" in parsed.params) == utf8
    else:
        with pytest.raises(Refusal):
            parse_command(arg, "FROM:", what="sender", null_ok=True)


async def test_sender_policy_and_mail_parameters(start_relay: StartRelay) -> None:
    relay = await start_relay(allow=ALLOW)
    out = await run(session, relay.port, [
        "MAIL FROM:<a!b@example.com>", "MAIL FROM:<a@example.com> RET=HDRS",
        "MAIL FROM:<a@example.com> BODY=BINARYMIME", "MAIL FROM:<ü@example.com> SMTPUTF8",
        "MAIL FROM:<a@example.com>"])
    assert out[0].startswith("553 5.1.3 ")
    assert out[1].startswith("555 5.5.4 ")
    assert out[2].startswith("501 5.5.4 ")
    assert out[3] == "250 2.1.0 Ok"
    assert out[4] == "503 5.5.1 Error: nested MAIL command"


async def test_too_many_recipients(start_relay: StartRelay) -> None:
    relay = await start_relay(allow=ALLOW, max_recipients=2)
    out = await run(session, relay.port, [
        "MAIL FROM:<a@example.com>", "RCPT TO:<r1@example.net>", "RCPT TO:<r2@example.net>",
        "RCPT TO:<r3@example.net>", "DATA", "Subject: x\r\n\r\ny\r\n."])
    assert out[3] == "452 4.5.3 Error: too many recipients"
    assert out[5] == "250 2.0.0 Ok: queued as TESTQ0001"
    assert relay.recorder.messages[0][0].recipients == ("r1@example.net", "r2@example.net")
    assert relay.refused("too_many_rcpts") == 1


class Refuser(BaseChecks):
    """Checks as the SPF and profile engineers write them."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, SessionInfo]] = []

    async def check_sender(self, session: SessionInfo, sender: str,
                           params: Mapping[str, str | None]) -> None:
        self.seen.append(("MAIL", session))
        if sender.endswith("@spf-fail.example"):
            raise Refusal(550, "5.7.23", "SPF validation failed", reason="spf")
        if sender.endswith("@dns-down.example"):
            raise Refusal(451, "4.4.3", "SPF lookup failed; try again later", reason="spf")

    async def check_recipient(self, session: SessionInfo, sender: str, recipient: str,
                              accepted: Sequence[str]) -> None:
        if accepted:
            raise Refusal(550, "5.5.3", "genesys-agentless allows exactly 1 recipient",
                          reason="profile")

    async def check_message(self, session: SessionInfo, envelope: Envelope,
                            data: bytes) -> bytes:
        if b"Subject: " + b"s" * 401 in data:
            raise Refusal(552, "5.3.4",
                          "Subject is 401 characters; genesys-agentless allows 400",
                          reason="profile")
        return b"Received-SPF: pass\r\n" + data


async def test_check_hooks_refuse_with_their_own_replies(start_relay: StartRelay) -> None:
    checks = Refuser()
    relay = await start_relay(allow=ALLOW, checks=checks)
    out = await run(session, relay.port, [
        "MAIL FROM:<x@spf-fail.example>", "MAIL FROM:<x@dns-down.example>",
        "MAIL FROM:<x@ok.example>", "RCPT TO:<one@example.net>", "RCPT TO:<two@example.net>",
        "DATA", "Subject: " + "s" * 401 + "\r\n\r\nbody\r\n.",
        "MAIL FROM:<x@ok.example>", "RCPT TO:<one@example.net>", "DATA",
        "Subject: fine\r\n\r\nbody\r\n."])
    assert out[0] == "550 5.7.23 SPF validation failed"
    assert out[1] == "451 4.4.3 SPF lookup failed; try again later"
    assert out[4] == "550 5.5.3 genesys-agentless allows exactly 1 recipient"
    assert out[6] == "552 5.3.4 Subject is 401 characters; genesys-agentless allows 400"
    assert out[10] == "250 2.0.0 Ok: queued as TESTQ0001"
    [(_env, data)] = relay.recorder.messages
    assert data.startswith(b"Received-SPF: pass\r\nReceived: from client.test")
    assert checks.seen[0][1].allowlisted and checks.seen[0][1].helo == "client.test"
    assert relay.refused("spf") == 2 and relay.refused("profile") == 2
