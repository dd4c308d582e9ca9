"""Complete provider profiles in a real session: header addresses, named refusals, the size
a profile carries into EHLO, the checks it turns on; and the config-side warnings."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from relay.checks.message import MessageChecks
from relay.config.loader import load_config
from relay.config.schema import HostPort, ListenerConfig, ProfileConfig
from relay.maillog import MailLog
from relay.smtp.listener import SmtpListener
from tests.limits.test_session import GENESYS, Recorder
from tests.smtp.conftest import RawClient, run

Start = Callable[..., Any]
LOCAL65 = "l" * 65


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    listeners: list[SmtpListener] = []

    async def go(profile: ProfileConfig | None, **options: Any) -> tuple[int, Recorder]:
        fields: dict[str, Any] = dict(name="inbound", protocol="smtp",
                                      listen=HostPort("127.0.0.1", 0), auth="none",
                                      relay_domains=("example.net",))
        fields.update(options)
        cfg = ListenerConfig(**fields)
        rec = Recorder()
        checks = MessageChecks(profile=profile,
                               structure_checks=options.get("structure_checks", ()))
        listener = SmtpListener(cfg, hostname="relay.test", accept=rec, maillog=MailLog(),
                                checks=checks)
        await listener.start()
        listeners.append(listener)
        return listener.addresses[0][1], rec

    yield go
    for listener in listeners:
        await listener.stop_accepting()
        await listener.wait_closed(1.0)


def session(port: int, commands: list[str], data: bytes | None = None) -> list[str]:
    """Replies to ``commands`` (after EHLO), then to ``data`` if every command got 2xx/3xx."""
    c = RawClient(port)
    c.reply()
    out = [c.cmd("EHLO mx.example.org")]
    for command in commands:
        out.append(c.cmd(command))
    if data is not None and all(r[0] in "23" for r in out):
        out.append(c.cmd("DATA"))
        c.send(data + b".\r\n")
        out.append(c.reply())
    c.close()
    return out[1:]


def message(to: str = "c@example.net", sender: str = "news@example.org",
            extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\n{extra}Subject: hi\r\n\r\nHello\r\n").encode()


@pytest.mark.parametrize(("data", "reply"), [
    (message(to="c@example.net, d@example.net"),
     "550 5.5.3 To:, Cc: and Bcc: name 2 addresses; genesys-agentless allows 1 recipient "
     "per message"),
    (message(extra="Cc: d@example.net\r\n"),
     "550 5.5.3 To:, Cc: and Bcc: name 2 addresses; genesys-agentless allows 1 recipient "
     "per message"),
    (message(to=f"{LOCAL65}@example.net"),
     "550 5.1.3 To: address local part is 65 characters; genesys-agentless allows 64"),
    (message(sender=f"{LOCAL65}@example.org"),
     "550 5.1.7 From: address local part is 65 characters; genesys-agentless allows 64"),
    (message(), "250 2.0.0 Ok: queued as Q1"),
])
async def test_genesys_limits_apply_to_header_addresses(start: Start, data: bytes,
                                                        reply: str) -> None:
    port, rec = await start(GENESYS)
    out = await run(session, port, ["MAIL FROM:<news@example.org>", "RCPT TO:<c@example.net>"],
                    data)
    assert out[-1] == reply
    assert len(rec.messages) == (1 if reply.startswith("250") else 0)


async def test_local_part_refusals_name_the_profile(start: Start) -> None:
    port, _ = await start(GENESYS)
    out = await run(session, port, [f"MAIL FROM:<{LOCAL65}@example.org>", "RSET",
                                    "MAIL FROM:<news@example.org>",
                                    f"RCPT TO:<{LOCAL65}@example.net>"])
    assert out[0] == ("553 5.1.7 Sender local part is 65 characters; genesys-agentless "
                      "allows 64")
    assert out[3] == ("553 5.1.3 Recipient local part is 65 characters; genesys-agentless "
                      "allows 64")


async def test_without_a_profile_rfc_5321_still_limits_the_local_part(start: Start) -> None:
    port, _ = await start(None)
    out = await run(session, port, [f"MAIL FROM:<{LOCAL65}@example.org>",
                                    "MAIL FROM:<news@example.org>",
                                    f"RCPT TO:<{LOCAL65}@example.net>"])
    assert out[0] == ("501 5.1.3 Bad sender address syntax: local part longer than 64 "
                      "characters")
    assert out[2] == ("501 5.1.3 Bad recipient address syntax: local part longer than 64 "
                      "characters")


SMALL = ProfileConfig(name="small-provider", max_message_bytes=128 * 1024)
BIG_BODY = b"From: a@example.org\r\nTo: c@example.net\r\n\r\n" + (b"x" * 998 + b"\r\n") * 160


@pytest.mark.parametrize(("listener_size", "size", "by"), [
    (256 * 1024, 128 * 1024, "small-provider allows 128 KB"),
    (64 * 1024, 64 * 1024, "listener inbound allows 64 KB"),
])
async def test_profile_size_carries_into_ehlo_and_refusals(start: Start, listener_size: int,
                                                           size: int, by: str) -> None:
    port, rec = await start(SMALL, max_message_size=listener_size)

    def go() -> list[str]:
        c = RawClient(port)
        c.reply()
        ehlo = c.cmd("EHLO mx.example.org")
        out = [line for line in ehlo.splitlines() if "SIZE" in line]
        out.append(c.cmd(f"MAIL FROM:<a@example.org> SIZE={size + 1}"))
        out.append(c.cmd(f"MAIL FROM:<a@example.org> SIZE={size}"))
        c.cmd("RCPT TO:<c@example.net>")
        c.cmd("DATA")
        c.send(BIG_BODY + b".\r\n")
        out.append(c.reply())
        c.close()
        return out

    too_big = f"552 5.3.4 Message size exceeds fixed maximum message size: {by}"
    assert await run(go) == [f"250-SIZE {size}", too_big, "250 2.1.0 Ok", too_big]
    assert rec.messages == []


async def test_a_profile_turns_on_the_checks_its_provider_needs(start: Start) -> None:
    needs_to = dataclasses.replace(SMALL, structure_checks=("to",))
    port, rec = await start(needs_to)
    no_to = b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    out = await run(session, port, ["MAIL FROM:<a@example.org>", "RCPT TO:<c@example.net>"],
                    no_to)
    assert out[-1] == "550 5.6.0 message has no To: header field"
    assert rec.messages == []


def test_profile_bigger_than_its_listener_is_warned_about(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    conf = tmp_path / "relay.toml"
    conf.write_text("""[relay]
default_upstream = "out"
spool = "spool"

[[listener]]
name = "platform"
protocol = "smtp"
listen = "127.0.0.1:2525"
auth = "none"
allow = ["127.0.0.0/8"]
profile = "zendesk-exchange-connector"

[[upstream]]
name = "out"
protocol = "outbox"
path = "outbox"
""")
    with caplog.at_level(logging.WARNING, logger="relay.config"):
        load_config(conf)
    assert [r.getMessage() for r in caplog.records] == [
        f'{conf}:11: listener[0].profile: profile "zendesk-exchange-connector" allows 50 MB '
        "per message, but listener platform takes at most 35 MB (max_message_size): larger "
        "messages are refused with 552 5.3.4; raise max_message_size if the platform sends "
        "them"]


@pytest.mark.fast
def test_extends_changes_only_the_keys_given(tmp_path: Path) -> None:
    conf = tmp_path / "relay.toml"
    conf.write_text("""[relay]
default_upstream = "out"
spool = "spool"

[[upstream]]
name = "out"
protocol = "outbox"
path = "outbox"
profile = "genesys-campaign"

[[profile]]
name = "genesys-campaign"
extends = "genesys-agentless"
messages_per_minute = 9000
max_subject_chars = 200
""")
    c = load_config(conf)
    campaign, base = c.profile("genesys-campaign"), c.profile("genesys-agentless")
    assert (campaign.messages_per_minute, campaign.max_subject_chars) == (9000, 200)
    assert dataclasses.replace(campaign, name=base.name, messages_per_minute=600,
                               max_subject_chars=400, line=base.line) == base
