"""Sender ownership through real STARTTLS + AUTH sessions: envelope, From: and Sender:."""

from __future__ import annotations

import ipaddress
import logging
import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest

from relay.checks.message import MessageChecks
from relay.checks.ownership import Ownership, owns
from relay.config.schema import STRUCTURE_LEVELS, AccountConfig
from relay.users import UserDB, read_users, write_users
from tests.smtp.conftest import PASSWORD, Relay, StartRelay, run

ALICE_OWNS = ("alice@example.com", "sales.example.com", "*.example.net")
BOB = AccountConfig(upstream="o365", user="bob", username="bob@example.org",
                    owns=("bob@example.org",))


async def start(start_relay: StartRelay, users_file: Path, *, mode: str = "enforce",
                **options: Any) -> Relay:
    write_users(users_file, read_users(users_file), {"alice": ALICE_OWNS})
    users = UserDB.load(users_file)
    ownership = Ownership(users=users, accounts=[BOB], mode=mode,  # type: ignore[arg-type]
                          listener="platform")
    checks = MessageChecks(structure_checks=STRUCTURE_LEVELS["strict"], ownership=ownership)
    return await start_relay(checks=checks, **options)


def submit(relay: Relay, user: str | None, password: str, sender: str, header_from: str,
           extra: str = "") -> tuple[str, str]:
    """(reply to MAIL, reply to DATA or "") over STARTTLS, logged in as ``user``."""
    ctx = ssl.create_default_context()
    relay.ca.configure_trust(ctx)
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="platform.test",
                      timeout=10) as s:
        s.starttls(context=ctx)
        s.ehlo()
        if user is not None:
            s.login(user, password)
        code, text = s.mail(sender)
        mail = f"{code} {text.decode()}"
        if code != 250:
            return mail, ""
        s.rcpt("customer@example.org")
        msg = (f"From: {header_from}\r\nTo: customer@example.org\r\n{extra}Subject: t\r\n\r\n"
               "hello\r\n")
        try:
            code, text = s.data(msg.encode())
        except smtplib.SMTPDataError as exc:
            code, text = exc.smtp_code, exc.smtp_error
        return mail, f"{code} {text.decode()}"


@pytest.mark.parametrize(("user", "sender", "header_from", "extra", "mail", "data"), [
    ("alice", "alice@example.com", "Alice <alice@example.com>", "", "250", "250"),
    ("alice", "Alice@EXAMPLE.com", "alice@example.com", "", "250", "250"),
    ("alice", "team@sales.example.com", "team@sales.example.com", "", "250", "250"),
    ("alice", "a@deep.sub.example.net", "a@deep.sub.example.net", "", "250", "250"),
    ("alice", "", "alice@example.com", "", "250", "250"),            # bounces: <>
    ("bob", "bob@example.org", "bob@example.org", "", "250", "250"),  # from [[account]]
    ("alice", "mallory@evil.test", "alice@example.com", "", "553 5.7.1 <mallory@evil.test> "
     "not owned by user alice", ""),
    ("alice", "a@example.net", "a@example.net", "", "553 5.7.1 <a@example.net> not owned by "
     "user alice", ""),                                # *.example.net: subdomains only
    ("bob", "alice@example.com", "alice@example.com", "", "553 5.7.1 <alice@example.com> not "
     "owned by user bob", ""),
    ("alice", "alice@example.com", "CEO <ceo@evil.test>", "", "250",
     "553 5.7.1 <ceo@evil.test> not owned by user alice"),
    ("alice", "alice@example.com", "alice@example.com, ceo@evil.test",
     "Sender: alice@example.com\r\n", "250", "553 5.7.1 <ceo@evil.test> not owned by user alice"),
    ("alice", "alice@example.com", "alice@example.com", "Sender: x@evil.test\r\n", "250",
     "553 5.7.1 <x@evil.test> not owned by user alice"),
])
async def test_authenticated_user_sends_only_as_what_it_owns(
        start_relay: StartRelay, users_file: Path, user: str, sender: str, header_from: str,
        extra: str, mail: str, data: str) -> None:
    relay = await start(start_relay, users_file)
    password = PASSWORD if user == "alice" else "bobpw"
    got_mail, got_data = await run(submit, relay, user, password, sender, header_from, extra)
    assert got_mail.startswith(mail)
    assert got_data.startswith(data) if data else got_data == ""
    refused = mail != "250" or data != "250"
    assert relay.recorder.messages == [] if refused else len(relay.recorder.messages) == 1
    assert relay.refused("ownership") == (1 if refused else 0)
    if refused:
        [line] = [r for r in relay.maillog_records if "rejected" in r]
        stage = "MAIL" if mail != "250" else "DATA"
        assert line.startswith(f"NOQUEUE: rejected client=127.0.0.1[platform] stage={stage} "
                               f"reason=ownership reply=")
        assert f"user={user}" in line


async def test_an_unreadable_from_is_not_a_way_around(start_relay: StartRelay,
                                                      users_file: Path) -> None:
    """With structure checks off, a From: that does not parse cannot pass unchecked."""
    write_users(users_file, read_users(users_file), {"alice": ALICE_OWNS})
    ownership = Ownership(users=UserDB.load(users_file), listener="platform")
    relay = await start_relay(checks=MessageChecks(structure_checks=(), ownership=ownership))
    got = await run(submit, relay, "alice", PASSWORD, "alice@example.com", "ceo@evil.test>>")
    assert got == ("250 2.1.0 Ok", "553 5.7.1 From: header cannot be read as addresses, so it "
                   "cannot be checked against what user alice owns")
    assert relay.recorder.messages == []


async def test_allow_listed_clients_without_login_are_not_checked(
        start_relay: StartRelay, users_file: Path) -> None:
    relay = await start(start_relay, users_file, allow=(ipaddress.ip_network("127.0.0.0/8"),))
    got = await run(submit, relay, None, "", "anyone@anywhere.test", "anyone@anywhere.test")
    assert got == ("250 2.1.0 Ok", "250 2.0.0 Ok: queued as TESTQ0001")


async def test_log_mode_accepts_and_logs(start_relay: StartRelay, users_file: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    relay = await start(start_relay, users_file, mode="log")
    with caplog.at_level(logging.WARNING, logger="relay.smtp"):
        got = await run(submit, relay, "alice", PASSWORD, "mallory@evil.test", "ceo@evil.test")
    assert got[0].startswith("250") and got[1].startswith("250")
    assert len(relay.recorder.messages) == 1
    warnings = [r.getMessage() for r in caplog.records if "not own" in r.getMessage()]
    assert warnings == [
        'platform: user alice sent as <mallory@evil.test> (envelope sender), which it does '
        'not own; accepted because sender_ownership = "log"',
        'platform: user alice sent as <ceo@evil.test> (From: header), which it does not own; '
        'accepted because sender_ownership = "log"']
    assert PASSWORD not in caplog.text


@pytest.mark.fast
@pytest.mark.parametrize(("patterns", "address", "expected"), [
    (("alice@example.com",), "ALICE@example.COM", True),
    (("example.com",), "x@example.com", True),
    (("example.com",), "x@sub.example.com", False),
    (("*.example.com",), "x@sub.example.com", True),
    (("*.example.com",), "x@example.com", False),
    (("*.example.com",), "x@badexample.com", False),
    ((), "x@example.com", False),
])
def test_owns(patterns: tuple[str, ...], address: str, expected: bool) -> None:
    assert owns(patterns, address) is expected
