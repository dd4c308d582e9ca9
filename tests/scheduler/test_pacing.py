"""Pacing end to end: a real spool, the scheduler, and SMTP providers that enforce quotas.

Windows are shortened (1 s instead of a minute) so a burst of several times the quota
drains in seconds; the provider measures its own sliding window when it accepts DATA.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.config.loader import load_config
from relay.config.schema import QuotaConfig, RetryConfig
from relay.control.queue import QueueManager
from relay.outbound.throttle_table import ThrottleTable
from tests.delivery.helpers import sample, upstream
from tests.fakes.quota_provider import EXCHANGE_QUOTA, QuotaProvider
from tests.fakes.recording_upstream import RecordingUpstream
from tests.peers import free_port
from tests.scheduler.rig import Rig, until

CONF = Path(__file__).resolve().parents[2] / "conf"


def body(subject: str) -> bytes:
    return (f"From: a@example.com\r\nTo: b@example.net\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.com>\r\n\r\nhello\r\n").encode()


def quick_table(pause: float = 0.4) -> ThrottleTable:
    """The shipped table, with pauses shortened for tests."""
    rows = load_config(CONF / "relay.toml").throttle_replies
    return ThrottleTable([dataclasses.replace(r, pause=pause, max_pause=pause * 4)
                          for r in rows])


@pytest.fixture
async def providers() -> AsyncIterator[list[QuotaProvider | RecordingUpstream]]:
    started: list[QuotaProvider | RecordingUpstream] = []
    yield started
    for p in started:
        await p.stop()


async def provider(started: list[QuotaProvider | RecordingUpstream],
                   **kw: object) -> QuotaProvider:
    p = QuotaProvider(**kw)  # type: ignore[arg-type]
    await p.start()
    started.append(p)
    return p


async def rig(rigs: list[Rig], tmp_path: Path, *ups: object, **kw: object) -> Rig:
    r = Rig(tmp_path, *ups, **kw)  # type: ignore[arg-type]
    rigs.append(r)
    await r.start()
    return r


def per_second(n: int, **kw: object) -> tuple[QuotaConfig, ...]:
    return (QuotaConfig(window=1.0, messages=n, **kw),)  # type: ignore[arg-type]


async def test_a_burst_drains_at_the_quota_rate_without_one_throttle_reply(
        rigs: list[Rig], providers: list[QuotaProvider | RecordingUpstream],
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="relay.pacing")
    p = await provider(providers, limit=5, window=1.0)
    r = await rig(rigs, tmp_path, upstream(p.port, quotas=per_second(5)),
                  throttles=quick_table())
    for i in range(25):                                  # five times the quota
        await r.send(body(f"m{i:02d}"))
    await p.wait_total(25, timeout=30)
    await r.drained()
    assert p.throttled == []                              # not one throttling reply
    assert p.peak() <= 5                                  # the provider's own window
    times = p.accepted["alice@example.com"]
    # 25 at 5 per second: the last group leaves 4 windows after the first, not much later
    assert 3.9 < max(times) - min(times) < 4 * 1.25
    # in arrival order: each window's five are the next five (four connections at once
    # may finish in any order within a window)
    order = p.subjects["alice@example.com"]
    assert [sorted(order[k:k + 5]) for k in range(0, 25, 5)] == [
        [f"m{i:02d}" for i in range(k, k + 5)] for k in range(0, 25, 5)]
    assert r.lines("deferred") == [] and r.lines("bounced") == []
    assert sample(r.metrics, "relay_pacing_delay_seconds_count", upstream="up") == 25
    # one line when the mailbox started waiting, one when it stopped (again if the line
    # emptied while the burst was still being submitted, on a busy machine)
    waits = [m for m in caplog.messages if m.startswith("up: alice@example.com ")]
    assert waits and len(waits) % 2 == 0
    for start, stop in zip(waits[::2], waits[1::2], strict=True):
        assert " waits: waiting for quota: 5 per 1 s of upstream up for alice@example.com, " \
            "next at " in start
        assert re.search(r" no longer waits, after \d+ s \(line empty\)$", stop)


async def test_waiting_is_visible_and_logged_once(
        rigs: list[Rig], providers: list[QuotaProvider | RecordingUpstream], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="relay.pacing")
    p = await provider(providers)
    quota = (QuotaConfig(window=60.0, messages=2),)
    r = await rig(rigs, tmp_path, upstream(p.port, quotas=quota))
    ids = [await r.send(body(f"w{i}")) for i in range(5)]
    await until(lambda: p.total == 2 and all(r.scheduler.waiting(q) for q in ids[2:]))
    waits = [r.scheduler.waiting(q) for q in ids[2:]]
    assert waits[0] is not None and waits[0]["reason"] == "quota"
    assert waits[0]["text"].startswith(
        "waiting for quota: 2/min of upstream up for alice@example.com, next at ")
    assert waits[2] is not None and waits[2]["text"].endswith(
        "; 2 ahead of it in alice@example.com's line")
    r.scheduler.update_metrics()
    assert sample(r.metrics, "relay_messages_waiting", upstream="up", reason="quota") == 3
    listed = await QueueManager(r.spool, r.scheduler).list_messages()
    assert listed["counts"]["waiting"] == 3
    started = [m for m in caplog.messages if "alice@example.com waits: waiting for quota" in m]
    assert len(started) == 1 and "in its line)" in started[0]


async def test_two_mailboxes_a_campaign_does_not_delay_a_password_reset(
        rigs: list[Rig], providers: list[QuotaProvider | RecordingUpstream],
        tmp_path: Path) -> None:
    """One connection to the upstream, a 150-message campaign from one mailbox at 10 per
    window: a reset from another mailbox still leaves within one window."""
    p = await provider(providers, limit=10, window=1.0)
    r = await rig(rigs, tmp_path, upstream(p.port, quotas=per_second(10), max_connections=1))
    for i in range(150):
        await r.send(body(f"campaign{i}"), sender="news@example.com")
    await until(lambda: p.total >= 10)
    sent = time.monotonic()
    await r.send(body("reset"), sender="support@example.com")
    await until(lambda: p.accepted.get("support@example.com"), timeout=10)
    assert p.accepted["support@example.com"][0] - sent < 1.0      # within one window
    assert p.total < 40                                  # and the campaign was still going
    assert p.throttled == []


async def test_a_5xx_quota_reply_pauses_the_mailbox_and_bounces_nothing(
        rigs: list[Rig], providers: list[QuotaProvider | RecordingUpstream],
        tmp_path: Path) -> None:
    """relay is not told the quota: the provider's own Exchange reply pauses the mailbox."""
    p = await provider(providers, limit=3, window=1.0)
    r = await rig(rigs, tmp_path, upstream(p.port), throttles=quick_table(0.5))
    for i in range(6):
        await r.send(body(f"q{i}"))
    await until(lambda: p.throttled)
    assert p.throttled[0] == ("alice@example.com", EXCHANGE_QUOTA)
    await until(lambda: any((w := r.scheduler.waiting(q)) and w["reason"] == "paused"
                            for q in r.spool.queue_ids()))
    paused = [w for q in r.spool.queue_ids() if (w := r.scheduler.waiting(q))]
    assert paused[0]["text"].startswith("paused by provider until ")
    assert paused[0]["text"].endswith(f"({EXCHANGE_QUOTA})")
    other = await r.send(body("other"), sender="bob@example.com")      # not paused
    await until(lambda: p.accepted.get("bob@example.com"))
    assert other not in r.spool.queue_ids() or r.scheduler.waiting(other) is None
    await r.drained(timeout=30)
    assert len(p.accepted["alice@example.com"]) == 6          # every one, none bounced
    assert r.lines("bounced") == []
    assert sample(r.metrics, "relay_provider_pauses_total", upstream="up", scope="mailbox",
                  rule="exchange-submission-quota") >= 1
    assert sample(r.metrics, "relay_messages_bounced_total", upstream="up",
                  reply_class="5xx") == 0


async def test_a_421_pauses_the_whole_upstream(
        rigs: list[Rig], providers: list[QuotaProvider | RecordingUpstream],
        tmp_path: Path) -> None:
    p = RecordingUpstream(script={"DATA": ["421 4.7.0 Try again later, closing connection."]})
    await p.start()
    providers.append(p)
    r = await rig(rigs, tmp_path, upstream(p.port), throttles=quick_table(1.0))
    first = await r.send(body("first"))
    await until(lambda: r.spool.load(first).state.attempts == 1)
    other = await r.send(body("other"), sender="bob@example.com")
    await until(lambda: (w := r.scheduler.waiting(other)) is not None
                and w["reason"] == "paused")
    assert r.spool.load(other).state.attempts == 0          # waiting, not failing
    await r.drained(timeout=20)
    assert sorted(m.mail_from for m in p.received) == ["alice@example.com", "bob@example.com"]
    assert sample(r.metrics, "relay_provider_pauses_total", upstream="up", scope="upstream",
                  rule="gmail-rate") == 1


async def test_connections_per_mailbox(rigs: list[Rig],
                                       providers: list[QuotaProvider | RecordingUpstream],
                                       tmp_path: Path) -> None:
    """Exchange allows 3 connections per mailbox; relay keeps to the cap it is given."""
    p = await provider(providers, connections=2, latency=lambda _m: 0.15)
    r = await rig(rigs, tmp_path, upstream(p.port, max_connections=8,
                                           connections_per_mailbox=2))
    for i in range(8):
        await r.send(body(f"a{i}"))
        await r.send(body(f"b{i}"), sender="bob@example.com")
    await p.wait_total(16, timeout=30)
    assert p.throttled == []
    assert p.max_busy["alice@example.com"] == 2 and p.max_busy["bob@example.com"] == 2


async def test_priority_goes_first_within_a_mailbox(
        rigs: list[Rig], providers: list[QuotaProvider | RecordingUpstream],
        tmp_path: Path) -> None:
    p = await provider(providers)
    r = await rig(rigs, tmp_path, upstream(p.port, quotas=per_second(2), max_connections=1),
                  priorities={"transactional": 10})
    for i in range(6):
        await r.send(body(f"bulk{i}"), listener="bulk")
    await r.send(body("reset"), listener="transactional")
    await p.wait_total(7, timeout=20)
    order = p.subjects["alice@example.com"]
    assert order.index("reset") <= 3                     # ahead of the bulk still waiting
    assert [s for s in order if s != "reset"] == [f"bulk{i}" for i in range(6)]


async def test_retries_inside_the_suspension_window_wait_and_retry_all_tries_now(
        rigs: list[Rig], providers: list[QuotaProvider | RecordingUpstream],
        tmp_path: Path) -> None:
    """The provider is down: one attempt, then the others wait for the window's end
    without spending attempts; after the fix, retry --all delivers at once."""
    port = free_port()
    r = await rig(rigs, tmp_path, upstream(port), suspend_for=30.0,
                  retry=RetryConfig(first=0.05, max=0.2, jitter=0.0, lifetime=3600))
    first = await r.send(body("first"))
    await until(lambda: r.spool.load(first).state.attempts == 1)
    ids = [first] + [await r.send(body(f"n{i}")) for i in range(10)]
    # the first one's retries (every 0.05 s) and the new ones all wait for the window
    await until(lambda: all((w := r.scheduler.waiting(q)) is not None
                            and w["reason"] == "suspended" for q in ids))
    assert [r.spool.load(q).state.attempts for q in ids] == [1] + [0] * 10
    text = r.scheduler.waiting(ids[1])
    assert text is not None and text["text"].startswith(
        f"waiting for up to recover after: connect to 127.0.0.1:{port} failed")
    p = RecordingUpstream()
    await p.start(port)
    providers.append(p)
    fixed = time.monotonic()
    result = await QueueManager(r.spool, r.scheduler).retry(None, every=True)
    assert result["retried"][0] == first        # the rest may be delivered meanwhile
    await r.drained(timeout=10)
    assert time.monotonic() - fixed < 10                  # not after the 30 s window
    assert len(p.received) == 11
    assert len(r.lines("deferred")) == 1                  # only the one real attempt failed


async def test_retry_of_one_message_ends_the_window_for_it(
        rigs: list[Rig], providers: list[QuotaProvider | RecordingUpstream],
        tmp_path: Path) -> None:
    port = free_port()
    r = await rig(rigs, tmp_path, upstream(port), suspend_for=30.0)
    qid = await r.send(body("one"))
    await until(lambda: (w := r.scheduler.waiting(qid)) is not None
                and w["reason"] == "suspended")
    p = RecordingUpstream()
    await p.start(port)
    providers.append(p)
    await QueueManager(r.spool, r.scheduler).retry(qid)
    await r.drained(timeout=5)
    assert len(p.received) == 1


async def test_a_changed_upstream_is_tried_now(
        rigs: list[Rig], providers: list[QuotaProvider | RecordingUpstream],
        tmp_path: Path) -> None:
    """A reload that changes the upstream (here: its port) reschedules its deferred mail."""
    dead = free_port()
    r = await rig(rigs, tmp_path, upstream(dead), suspend_for=30.0,
                  retry=RetryConfig(first=3600, max=3600, jitter=0.0, lifetime=86400))
    qid = await r.send(body("one"))
    await until(lambda: r.spool.load(qid).state.attempts == 1)
    assert r.scheduler.scheduled()[qid] - time.time() > 3000     # a long backoff
    p = RecordingUpstream()
    await p.start()
    providers.append(p)
    from tests.delivery.helpers import deliverer
    new = deliverer(upstream(p.port), metrics=r.metrics)
    r.scheduler.reconfigure(router=r.router, deliverer=new, retry=FASTER, changed=["up"])
    await r.drained(timeout=5)
    assert len(p.received) == 1
    await new.close()


FASTER = RetryConfig(first=0.05, max=0.2, jitter=0.0, lifetime=3600)


async def test_lifetime_still_bounces_paused_mail(
        rigs: list[Rig], providers: list[QuotaProvider | RecordingUpstream],
        tmp_path: Path) -> None:
    """Pausing never bounces, but a message past its lifetime still ends with a DSN."""
    p = await provider(providers, limit=1, window=60.0)
    r = await rig(rigs, tmp_path, upstream(p.port), throttles=quick_table(0.2),
                  retry=RetryConfig(first=0.05, max=0.1, jitter=0.0, lifetime=1.0))
    ids = [await r.send(body("one")), await r.send(body("two"))]
    await r.drained(timeout=20)
    assert len(p.accepted["alice@example.com"]) == 1      # the other one was throttled ...
    [bounced] = [line for line in r.lines("bounced") if any(q in line for q in ids)]
    assert "SubmissionQuotaExceededException" in bounced and "gave up after" in bounced


async def test_waiting_for_quota_outlives_a_reload(
        rigs: list[Rig], providers: list[QuotaProvider | RecordingUpstream],
        tmp_path: Path) -> None:
    """Quota usage is the provider's memory, not the config's: a reload keeps counting."""
    p = await provider(providers, limit=2, window=60.0)
    up = upstream(p.port, quotas=(QuotaConfig(window=60.0, messages=2),))
    r = await rig(rigs, tmp_path, up)
    ids = [await r.send(body(f"r{i}")) for i in range(3)]
    await until(lambda: p.total == 2 and r.scheduler.waiting(ids[2]) is not None)
    from tests.delivery.helpers import deliverer
    new = deliverer(up, metrics=r.metrics)
    r.scheduler.reconfigure(router=r.router, deliverer=new, retry=FASTER)
    await until(lambda: (w := r.scheduler.waiting(ids[2])) is not None
                and w["reason"] == "quota")
    assert p.total == 2 and p.throttled == []
    await new.close()


async def test_a_paused_mailbox_holds_no_connection(
        rigs: list[Rig], providers: list[QuotaProvider | RecordingUpstream],
        tmp_path: Path) -> None:
    """One connection to the upstream; a mailbox the provider paused must not keep it from
    the others while it waits."""
    p = await provider(providers, limit=1, window=30.0)
    r = await rig(rigs, tmp_path, upstream(p.port, max_connections=1),
                  throttles=quick_table(20.0))
    for i in range(3):
        await r.send(body(f"p{i}"))                          # the 2nd is throttled: paused
    await until(lambda: p.throttled)
    for i in range(5):
        await r.send(body(f"o{i}"), sender=f"other{i}@example.com")
    await until(lambda: sum(len(p.accepted.get(f"other{i}@example.com", []))
                            for i in range(5)) == 5, timeout=10)
