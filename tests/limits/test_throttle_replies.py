"""The shipped throttle-reply table: which provider reply pauses what, for how long (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config.loader import load_config
from relay.config.schema import ThrottleReplyConfig
from relay.outbound.throttle_table import ThrottleTable, enhanced_status, named_pause

pytestmark = pytest.mark.fast

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def table() -> ThrottleTable:
    return ThrottleTable(load_config(CONF / "relay.toml").throttle_replies)


# (reply as the provider sends it, rule that must match, action, pause in seconds)
CASES = [
    ("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to "
     "process message due to a permanent exception with message Cannot submit message.",
     "exchange-submission-quota", "pause-mailbox", 60.0),
    ("550 5.1.90 Your message can't be sent because you've reached your daily limit for "
     "message recipients", "exchange-daily-recipients", "pause-mailbox", 3600.0),
    ("554 5.2.2 mailbox full; submission quota exceeded", "exchange-submission-quota-legacy",
     "pause-mailbox", 60.0),
    ("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
     "exchange-sender-thread-limit", "pause-mailbox", 10.0),
    ("451 4.7.500 Server busy. Please try again later from [192.0.2.7]. (S77714) "
     "[DM6NAM12FT035.eop-nam12.prod.protection.outlook.com]", "exchange-server-busy",
     "pause-upstream", 60.0),
    ("550 5.4.5 Daily sending quota exceeded. Learn more at https://support.google.com/mail",
     "gmail-daily-quota", "pause-mailbox", 3600.0),
    ("550 5.4.5 Daily user sending quota exceeded.", "gmail-daily-quota", "pause-mailbox",
     3600.0),
    ("550 5.4.5 Daily SMTP relay sending limit exceeded for customer", "gmail-relay-limit",
     "pause-upstream", 3600.0),
    ("421 4.7.0 Try again later, closing connection. (EHLO) gsmtp", "gmail-rate",
     "pause-upstream", 60.0),
    ("421 4.7.28 Our system has detected an unusual rate of unsolicited mail originating "
     "from your IP address", "gmail-rate", "pause-upstream", 60.0),
    ("454 4.7.0 Too many login attempts, please try again later.", "gmail-login-rate",
     "pause-mailbox", 300.0),
    ("452 4.5.3 Too many recipients", "too-many-recipients", "pause-mailbox", 30.0),
    ("451 4.7.1 Rate limited, please slow down", "rate-limited", "pause-mailbox", 60.0),
    ("450 4.2.1 The user you are trying to contact is receiving mail at a rate that "
     "prevents additional messages from being delivered: throttled", "rate-limited",
     "pause-mailbox", 60.0),
    ("421 4.7.0 Service refused", "policy-421", "pause-upstream", 60.0),
    ("451 4.3.2 System not accepting network messages", "system-not-accepting",
     "pause-upstream", 60.0),
]


@pytest.mark.parametrize(("reply", "rule", "action", "seconds"), CASES)
def test_each_throttle_reply_makes_its_pause(table: ThrottleTable, reply: str, rule: str,
                                             action: str, seconds: float) -> None:
    throttle = table.throttle(reply)
    assert throttle is not None, reply
    assert (throttle.rule.name, throttle.rule.action, throttle.seconds) == (rule, action,
                                                                             seconds)


def test_every_shipped_row_has_a_case(table: ThrottleTable) -> None:
    assert {r.name for r in table.rows} == {c[1] for c in CASES}


@pytest.mark.parametrize("reply", [
    "550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown",
    "452 4.2.2 The email account that you tried to reach is over quota",   # recipient's box
    "451 4.3.0 Mail server temporarily rejected message",
    "554 5.7.1 Message rejected as spam by Content Filtering",
    "250 2.0.0 OK queued as 42",
    "connect to 127.0.0.1:25 failed: Connect call failed",
])
def test_ordinary_replies_are_not_throttles(table: ThrottleTable, reply: str) -> None:
    assert table.match(reply) is None


def test_repeats_double_up_to_the_maximum(table: ThrottleTable) -> None:
    reply = CASES[0][0]
    assert [table.throttle(reply, repeat=n).seconds for n in (1, 2, 3, 7, 8)] == [  # type: ignore[union-attr]
        60.0, 120.0, 240.0, 3600.0, 3600.0]


def test_a_reply_that_names_its_time_is_believed(table: ThrottleTable) -> None:
    throttle = table.throttle("421 4.7.0 Too many messages, try again in 5 minutes")
    assert throttle is not None and throttle.seconds == 300.0
    assert named_pause("452 4.5.3 retry after 30 seconds") == 30.0
    assert named_pause("451 4.7.500 Server busy, please try again later") is None
    assert table.throttle("554 5.2.0 SubmissionQuotaExceededException; try again in "
                          "3 hours").seconds == 3600.0   # type: ignore[union-attr]  # capped


def test_enhanced_status_and_code_parsing() -> None:
    assert enhanced_status("451-4.7.500 Server busy") == "4.7.500"
    assert enhanced_status("421 Service not available") == ""
    t = ThrottleTable([ThrottleReplyConfig(name="x", action="pause-mailbox", status="4.7")])
    assert t.match("451 4.7.500 busy") is not None
    assert t.match("451 4.70.1 nope") is None           # a prefix is a whole component
    assert t.match("busy", code=451) is None            # no status: no match on status
