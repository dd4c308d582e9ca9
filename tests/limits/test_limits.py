"""Provider profile limits at the boundary, and pacing that only ever delays."""

from __future__ import annotations

import heapq
import random

import pytest

from relay.checks.profile import (
    check_message,
    check_message_async,
    check_recipient,
    check_sender,
    decoded_header,
)
from relay.config.schema import ProfileConfig, QuotaConfig, UpstreamConfig
from relay.outbound.pacing import Claim, Cost, Limit, LocalQuotas, Ticket, edge_margin, limits_for
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
    """A clock that only moves when the test says (deterministic, no real waiting)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now


def claim(profile: ProfileConfig, *, recipients: int = 1, size: int = 0,
          key: str = "up/mbx") -> list[Claim]:
    limits = limits_for(UpstreamConfig(name="up", protocol="smtp"), profile)
    return [Claim(key, limits, Cost(1, recipients, size))]


async def send(q: LocalQuotas, claims: list[Claim]) -> float:
    """Reserve and, if it fits, settle at once (a delivery that took no time)."""
    verdict = await q.reserve(claims)
    if verdict.ticket is not None:
        await q.settle(verdict.ticket)
    return verdict.wait


async def test_messages_per_minute_delays_the_eleventh() -> None:
    t = FakeTime()
    q = LocalQuotas(clock=t.clock)
    for _ in range(10):
        assert await send(q, claim(ZENDESK, size=1000)) == 0.0
        t.now += 1.0                       # one message a second
    verdict = await q.reserve(claim(ZENDESK, size=1000))
    # the first went at 1000; the 11th is at 1010 and waits until 1060 (+ the edge margin)
    assert verdict.wait == pytest.approx(50.0 + edge_margin(60.0))
    assert verdict.limit is not None
    assert verdict.limit.describe() == "10/min of zendesk-exchange-connector"
    assert await send(q, claim(ZENDESK, key="up/other-mailbox")) == 0.0     # per mailbox


async def test_bytes_per_5_minutes() -> None:
    t = FakeTime()
    q = LocalQuotas(clock=t.clock)
    await send(q, claim(ZENDESK, size=30 * MB))
    t.now += 10
    assert await send(q, claim(ZENDESK, size=20 * MB)) == 0.0       # exactly 50 MB: fits
    t.now += 10
    verdict = await q.reserve(claim(ZENDESK, size=1))
    assert verdict.wait == pytest.approx(280.0 + edge_margin(300.0))  # until the first leaves
    assert verdict.limit is not None and verdict.limit.describe() == (
        "50 MB per 5 min of zendesk-exchange-connector")
    # a message bigger than the whole window waits until the window is empty, never refused
    t.now += 280
    verdict = await q.reserve(claim(ZENDESK, size=60 * MB))
    assert verdict.wait == pytest.approx(10.0 + edge_margin(300.0))
    t.now += verdict.wait
    assert await send(q, claim(ZENDESK, size=60 * MB)) == 0.0


async def test_recipients_per_day() -> None:
    t = FakeTime()
    q = LocalQuotas(clock=t.clock)
    await send(q, claim(EXCHANGE, recipients=9_999))
    t.now += 3600
    assert await send(q, claim(EXCHANGE, recipients=1)) == 0.0
    t.now += 60
    verdict = await q.reserve(claim(EXCHANGE, recipients=5))
    assert verdict.wait == pytest.approx(86400 - 3660 + edge_margin(86400.0))
    assert verdict.limit is not None
    assert verdict.limit.describe() == "10000 recipients/day of exchange-online"


async def test_a_send_counts_from_when_its_attempt_ended() -> None:
    """The provider counts at acceptance, after relay decided: a send in flight counts,
    and once it ends it counts again from that moment."""
    t = FakeTime()
    q = LocalQuotas(clock=t.clock)
    tight = ProfileConfig(name="p", messages_per_minute=2)
    first = await q.reserve(claim(tight))
    second = await q.reserve(claim(tight))
    assert first.ticket is not None and second.ticket is not None
    assert (await q.reserve(claim(tight))).wait > 0          # two in flight: full
    t.now += 30
    await q.settle(first.ticket)                             # took 30 s
    t.now += 10
    await q.settle(second.ticket)                            # took 40 s
    t.now += 40                                              # 80 s after they were reserved
    verdict = await q.reserve(claim(tight))
    assert verdict.wait == pytest.approx(1030 + 60 + edge_margin(60.0) - t.now)


async def test_upstream_quota_overrides_and_adds_to_the_profile() -> None:
    up = UpstreamConfig(name="o365", protocol="smtp", quotas=(
        QuotaConfig(window=60.0, messages=20),                       # replaces 30/min
        QuotaConfig(window=3600.0, scope="upstream", messages=500)))  # adds, every mailbox
    limits = limits_for(up, EXCHANGE)
    assert sorted((x.scope, x.dimension, x.amount, x.window) for x in limits) == [
        ("mailbox", "messages", 20, 60.0), ("mailbox", "recipients", 10_000, 86400.0),
        ("upstream", "messages", 500, 3600.0)]
    assert [x.describe() for x in limits if x.scope == "upstream"] == [
        "500/hour of upstream o365"]
    assert Limit("messages", 30, 60.0).shared(3).amount == 10      # a replica's local share
    assert Limit("messages", 2, 60.0).shared(3).amount == 1        # never zero


async def test_no_rate_limits_never_waits() -> None:
    t = FakeTime()
    q = LocalQuotas(clock=t.clock)
    for _ in range(100):
        assert await send(q, claim(GENESYS, recipients=1, size=MB)) == 0.0


async def test_idle_mailboxes_are_forgotten() -> None:
    t = FakeTime()
    q = LocalQuotas(clock=t.clock)
    for i in range(50):
        await send(q, claim(ZENDESK, key=f"up/m{i}"))
    t.now += 86400 + 1000
    await send(q, claim(ZENDESK, key="up/late"))
    assert list(q._keys) == ["up/late"]


def provider_peak(accepted: list[float], window: float) -> int:
    """The most acceptances the provider sees in any window of ``window`` seconds."""
    accepted = sorted(accepted)
    peak, start = 0, 0
    for end, ts in enumerate(accepted):
        while accepted[start] <= ts - window:
            start += 1
        peak = max(peak, end - start + 1)
    return peak


async def simulate(latencies: list[float], *, per_minute: int = 600) -> list[float]:
    """Send as fast as the quota allows; each delivery takes its latency, and the provider
    counts it just before relay sees the reply. Returns the provider's acceptance times."""
    t = FakeTime()
    q = LocalQuotas(clock=t.clock)
    profile = ProfileConfig(name="genesys", messages_per_minute=per_minute)
    running: list[tuple[float, int, Ticket]] = []        # (ends at, seq, ticket)
    accepted: list[float] = []
    todo = list(latencies)
    while todo or running:
        while running and running[0][0] <= t.now:
            await q.settle(heapq.heappop(running)[2])
        wait = 0.0
        while todo:
            verdict = await q.reserve(claim(profile))
            if verdict.ticket is None:
                wait = verdict.wait
                break
            latency = todo.pop(0)
            accepted.append(t.now + latency * 0.99)
            heapq.heappush(running, (t.now + latency, len(accepted), verdict.ticket))
        nxt = [t.now + wait] if todo and wait > 0 else []
        t.now = min([*nxt, *(r[0] for r in running[:1])] or [t.now])
    return accepted


@pytest.mark.parametrize("pattern", ["slow-then-fast", "random", "steady"])
async def test_the_provider_never_sees_more_than_the_quota_in_any_window(pattern: str) -> None:
    """600/min measured at the provider's side, with deliveries that take different times:
    slow first sends and fast later ones crowd acceptances together at a window's edge."""
    rng = random.Random(11)
    n = 3000
    latencies = {"slow-then-fast": [3.0 if (i // 600) % 2 == 0 else 0.01 for i in range(n)],
                 "random": [rng.uniform(0.005, 4.0) for _ in range(n)],
                 "steady": [0.2] * n}[pattern]
    accepted = await simulate(latencies)
    assert len(accepted) == n
    assert provider_peak(accepted, 60.0) <= 600
    # and as fast as the quota allows: 3000 at 600/min is 4 full windows after the first
    # 600, each window counted from when its oldest send ended
    worst = max(latencies)
    assert max(accepted) - min(accepted) < 4 * (60 + edge_margin(60.0) + worst) + worst


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
    assert (ex.max_message_bytes, ex.messages_per_minute, ex.recipients_per_day,
            ex.connections_per_mailbox) == (35 * MB, 30, 10_000, 3)
