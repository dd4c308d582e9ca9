"""Provider profile limits at the boundary, and pacing that only ever delays."""

from __future__ import annotations

import asyncio

import pytest

from relay.checks.profile import (
    check_message,
    check_message_async,
    check_recipient,
    check_sender,
    decoded_header,
)
from relay.config.schema import ProfileConfig
from relay.outbound.pacing import RateLimiter, margin
from relay.verdict import Refusal

pytestmark = pytest.mark.fast

MB = 1024 * 1024
GENESYS = ProfileConfig(name="genesys-agentless", max_recipients=1, max_subject_chars=400,
                        max_local_part=64, max_display_name=64, max_body_bytes=3 * MB,
                        allow_attachments=False)
EXCHANGE = ProfileConfig(name="exchange-online", max_message_bytes=35 * MB,
                         recipients_per_day=10_000, messages_per_minute=30)
ZENDESK = ProfileConfig(name="zendesk-exchange-connector", max_message_bytes=50 * MB,
                        messages_per_minute=10, bytes_per_5min=50 * MB,
                        recipients_per_day=10_000)


def message(subject: bytes = b"Hello", from_: bytes = b"Support <s@example.com>",
            body: bytes = b"Hi\r\n", extra: bytes = b"") -> bytes:
    return (b"From: " + from_ + b"\r\nTo: c@example.net\r\nSubject: " + subject + b"\r\n"
            + extra + b"\r\n" + body)


def refusal(fn: object, *args: object, **kw: object) -> Refusal:
    with pytest.raises(Refusal) as info:
        fn(*args, **kw)  # type: ignore[operator]
    return info.value


def test_exactly_one_recipient() -> None:
    check_recipient(GENESYS, "a@example.net", accepted=0)
    r = refusal(check_recipient, GENESYS, "b@example.net", accepted=1)
    assert (r.code, r.enhanced) == (452, "4.5.3")
    assert "genesys-agentless allows 1 per message" in r.text


def test_local_part_64_passes_65_refused() -> None:
    check_recipient(GENESYS, "a" * 64 + "@example.net", accepted=0)
    check_sender(GENESYS, "s" * 64 + "@example.com")
    r = refusal(check_recipient, GENESYS, "a" * 65 + "@example.net", accepted=0)
    assert r.reply == ("553 5.1.3 Recipient local part is 65 characters; "
                       "genesys-agentless allows 64")
    r = refusal(check_sender, GENESYS, "s" * 65 + "@example.com")
    assert (r.code, r.enhanced) == (553, "5.1.7")


def test_subject_400_passes_401_refused() -> None:
    check_message(GENESYS, message(subject=b"s" * 400))
    r = refusal(check_message, GENESYS, message(subject=b"s" * 401))
    assert r.reply == "552 5.3.4 Subject is 401 characters; genesys-agentless allows 400"
    r = refusal(check_message, GENESYS, message(subject=b"s" * 512))
    assert r.reply == "552 5.3.4 Subject is 512 characters; genesys-agentless allows 400"


def test_subject_counts_decoded_characters() -> None:
    # 400 "ü" as RFC 2047 encoded words (folded) is 400 characters, not ~2,500 bytes
    word = b"=?UTF-8?B?" + __import__("base64").b64encode("ü".encode() * 20) + b"?="
    encoded = b"\r\n ".join([word] * 20)
    check_message(GENESYS, message(subject=encoded))
    r = refusal(check_message, GENESYS, message(subject=encoded + b"\r\n x"))
    assert "Subject is 402 characters" in r.text     # the space before "x" is text
    # raw 8-bit UTF-8 (SMTPUTF8) counts characters too
    check_message(GENESYS, message(subject="ß".encode() * 400))
    assert "401" in refusal(check_message, GENESYS, message(subject="ß".encode() * 401)).text
    assert decoded_header("=?iso-8859-1?q?J=F6rg?= x") == "Jörg x"


def test_display_name_64_passes_65_refused() -> None:
    check_message(GENESYS, message(from_=b"\"" + b"D" * 64 + b"\" <s@example.com>"))
    enc = b"=?UTF-8?Q?" + b"=C3=A9" * 64 + b"?= <s@example.com>"
    check_message(GENESYS, message(from_=enc))
    r = refusal(check_message, GENESYS, message(from_=b"D" * 65 + b" <s@example.com>"))
    assert r.reply == ("552 5.3.4 From display name is 65 characters; "
                       "genesys-agentless allows 64")


def test_body_3mb_passes_one_more_byte_refused() -> None:
    check_message(GENESYS, message(body=b"x" * (3 * MB)))
    r = refusal(check_message, GENESYS, message(body=b"x" * (3 * MB + 1)))
    assert r.reply == (f"552 5.3.4 Body is {3 * MB + 1} bytes; genesys-agentless allows 3 MB")


def test_message_size() -> None:
    small = ProfileConfig(name="p", max_message_bytes=1000)
    m = message(body=b"x" * 900)
    check_message(small, m + b"x" * (1000 - len(m)))
    r = refusal(check_message, small, m + b"x" * (1001 - len(m)))
    assert r.reply == "552 5.3.4 Message is 1001 bytes; p allows 1000 bytes"


ATTACHED = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n", (
    b"--XX\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
    b"--XX\r\nContent-Type: application/pdf\r\n{disp}\r\n\r\nJVBERi0=\r\n--XX--\r\n"))


@pytest.mark.parametrize("disp", [
    b"Content-Disposition: attachment; filename=\"invoice.pdf\"",
    b"Content-Disposition: attachment",
    b"Content-Disposition: inline; filename=\"invoice.pdf\"",
    b"Content-Transfer-Encoding: base64; x=1\r\nContent-Disposition: inline;\r\n"
    b" filename*=UTF-8''rechnung%C3%BC.pdf",
])
def test_attachments_refused(disp: bytes) -> None:
    extra, body = ATTACHED
    r = refusal(check_message, GENESYS, message(extra=extra, body=body.replace(b"{disp}", disp)))
    assert (r.code, r.enhanced) == (554, "5.6.1")
    assert "Attachments are not allowed by genesys-agentless" in r.text
    check_message(EXCHANGE, message(extra=extra, body=body.replace(b"{disp}", disp)))


def test_multipart_alternative_without_attachment_passes() -> None:
    extra = b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=B\r\n"
    body = (b"--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n--B\r\nContent-Type: text/html\r\n"
            b"Content-Disposition: inline\r\n\r\n<p>hi</p>\r\n--B--\r\n")
    check_message(GENESYS, message(extra=extra, body=body))


async def test_async_check_runs_off_loop() -> None:
    with pytest.raises(Refusal):
        await check_message_async(GENESYS, message(subject=b"s" * 401))


def test_no_limits_no_refusal() -> None:
    open_profile = ProfileConfig(name="open")
    check_message(open_profile, message(subject=b"s" * 10_000, body=b"x" * (5 * MB)))
    check_recipient(open_profile, "a" * 200 + "@x", accepted=10_000)


class FakeTime:
    """A clock that only moves when the limiter sleeps (deterministic, no real waiting)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def test_messages_per_minute_delays_the_eleventh() -> None:
    t = FakeTime()
    rl = RateLimiter(ZENDESK, clock=t.clock, sleep=t.sleep)
    for _ in range(10):
        assert await rl.acquire("mbx", size=1000) == 0.0
        t.now += 1.0                       # one message a second
    waited = await rl.acquire("mbx", size=1000)
    # the first went at 1000; the 11th is at 1010 and must wait until 1060, plus the
    # safety margin of a minute window (3 s)
    assert waited == pytest.approx(53.0)
    assert t.now == pytest.approx(1063.0)
    assert await rl.acquire("other-mailbox") == 0.0     # per mailbox


async def test_bytes_per_5_minutes() -> None:
    t = FakeTime()
    rl = RateLimiter(ZENDESK, clock=t.clock, sleep=t.sleep)
    await rl.acquire("m", size=30 * MB)
    t.now += 10
    assert await rl.acquire("m", size=20 * MB) == 0.0          # exactly 50 MB: fits
    t.now += 10
    waited = await rl.acquire("m", size=1)
    assert waited == pytest.approx(290.0)             # until the first leaves (+10 s margin)
    # a message bigger than the whole window is delayed until the window is empty, not refused
    waited = await rl.acquire("m", size=60 * MB)
    assert waited == pytest.approx(310.0) and t.now == pytest.approx(1620.0)  # 1-byte one left


async def test_recipients_per_day() -> None:
    t = FakeTime()
    rl = RateLimiter(EXCHANGE, clock=t.clock, sleep=t.sleep)
    await rl.acquire("m", recipients=9_999)
    t.now += 3600
    assert await rl.acquire("m", recipients=1) == 0.0
    t.now += 60
    waited = await rl.acquire("m", recipients=5)
    assert waited == pytest.approx(86400 + 10 - 3660)


async def test_concurrent_acquirers_are_served_in_order() -> None:
    t = FakeTime()
    rl = RateLimiter(ProfileConfig(name="p", messages_per_minute=2), clock=t.clock,
                     sleep=t.sleep)
    order: list[int] = []

    async def send(i: int) -> None:
        await rl.acquire("m")
        order.append(i)

    await asyncio.wait_for(asyncio.gather(*(send(i) for i in range(6))), timeout=10)
    assert order == list(range(6))
    assert t.now == pytest.approx(1126.0)      # 2 now, 2 after 63 s, 2 after 126 s


@pytest.mark.parametrize("seed", range(5))
async def test_no_provider_minute_sees_more_than_the_limit(seed: int) -> None:
    """600/min: the provider counts arrivals, each up to 2.9 s after relay started it.

    The worst case is a burst at a window edge: the first 600 arrive late, the next 600
    on time. Without the margin the provider would count up to 1,200 in one minute.
    """
    import random

    rnd = random.Random(seed)
    t = FakeTime()
    rl = RateLimiter(ProfileConfig(name="genesys-agentless", messages_per_minute=600),
                     clock=t.clock, sleep=t.sleep)
    arrivals = []
    for i in range(1800):                              # bounded: three minutes' worth
        await rl.acquire("notify@example.com")
        late = 2.9 if (i // 600) % 2 == 0 else 0.0     # within the 3 s margin of a minute
        arrivals.append(t.now + late * rnd.uniform(0.9, 1.0))
        t.now += rnd.uniform(0.0, 0.01)
    arrivals.sort()
    j = 0
    busiest = 0
    for i, at in enumerate(arrivals):                  # every 60 s window starting at one
        while j < len(arrivals) and arrivals[j] < at + 60.0:
            j += 1
        busiest = max(busiest, j - i)
    assert busiest <= 600
    assert busiest >= 590              # and the limiter still uses (nearly) all of it


async def test_no_rate_limits_never_waits() -> None:
    t = FakeTime()
    rl = RateLimiter(GENESYS, clock=t.clock, sleep=t.sleep)
    for _ in range(100):
        assert await rl.acquire("m", recipients=1, size=MB) == 0.0
    assert t.slept == []


async def test_forget_idle_bounds_memory() -> None:
    t = FakeTime()
    rl = RateLimiter(ZENDESK, clock=t.clock, sleep=t.sleep)
    for i in range(50):
        await rl.acquire(f"m{i}")
    t.now += 86400 + margin(86400) + 1
    rl.forget_idle()
    assert rl._boxes == {}


def test_shipped_profiles_match_the_field_documents() -> None:
    from pathlib import Path

    from relay.config.loader import load_config

    conf = load_config(Path(__file__).parents[2] / "conf" / "relay.toml")
    genesys = conf.profile("genesys-agentless")
    assert (genesys.max_recipients, genesys.max_subject_chars, genesys.max_local_part,
            genesys.max_display_name, genesys.max_body_bytes, genesys.allow_attachments) == (
        1, 400, 64, 64, 3 * MB, False)
    check_message(genesys, message(subject=b"s" * 400, body=b"x" * (3 * MB)))
    assert refusal(check_message, genesys, message(subject=b"s" * 512)).reply == (
        "552 5.3.4 Subject is 512 characters; genesys-agentless allows 400")
    zd = conf.profile("zendesk-exchange-connector")
    assert (zd.messages_per_minute, zd.bytes_per_5min, zd.recipients_per_day,
            zd.max_message_bytes) == (10, 50 * MB, 10_000, 50 * MB)
    ex = conf.profile("exchange-online")
    assert (ex.max_message_bytes, ex.messages_per_minute, ex.recipients_per_day) == (
        35 * MB, 30, 10_000)
