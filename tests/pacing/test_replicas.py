"""Two real relay processes and a real redis-server: one quota for the fleet, a local share
while Redis is stopped, shared again when it is back, and what an operator sees of it."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

from tests.fakes.quota_provider import QuotaProvider, provider_thread
from tests.peers import free_port, wait_until
from tests.peers.redis import redis_server
from tests.peers.relayproc import Relay, config, sample, scrape

WINDOW = 2.0
QUOTA = 10


def relay_config(work: Path, *, listen: int, metrics: int, provider: int, redis: str) -> str:
    return config(spool=work / "spool", listen=listen, sink=provider, metrics=metrics,
                  extra=f"""
[[upstream.quota]]
window = "{WINDOW:g}s"
messages = {QUOTA}

[pacing]
backend = "redis"
redis_url = "{redis}"
replicas = 2
timeout = "300ms"
retry_interval = "500ms"
""")


def submit(port: int, n: int, tag: str) -> None:
    """``n`` messages from one mailbox over one SMTP session."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        for i in range(n):
            msg = (f"From: agent@example.com\r\nTo: c@example.net\r\nSubject: {tag}{i}\r\n"
                   f"Message-ID: <{tag}{i}.{time.time_ns()}@test>\r\n\r\nhi\r\n")
            s.sendmail("agent@example.com", ["c@example.net"], msg.encode())


def wait_total(p: QuotaProvider, n: int, timeout: float = 60.0) -> None:
    wait_until(lambda: p.total >= n, timeout=timeout)


def test_two_relays_share_one_quota_and_survive_redis_going_away(tmp_path: Path) -> None:
    with redis_server(tmp_path) as redis, \
            provider_thread(limit=QUOTA, window=WINDOW) as provider:
        relays: list[tuple[Relay, int, int]] = []
        try:
            for name in ("a", "b"):
                work = tmp_path / name
                work.mkdir()
                listen, metrics = free_port(), free_port()
                text = relay_config(work, listen=listen, metrics=metrics,
                                    provider=provider.port, redis=redis.url)
                relays.append((Relay(work, text).start(listen), listen, metrics))
            (a, a_port, a_metrics), (b, b_port, b_metrics) = relays

            # 1. shared: 40 messages, half through each relay, at 10 per window in all
            submit(a_port, 20, "a")
            submit(b_port, 20, "b")
            wait_total(provider, 40)
            assert provider.throttled == [] and provider.peak() <= QUOTA
            times = provider.accepted["agent@example.com"]
            assert max(times) - min(times) >= 3 * WINDOW         # the fleet was paced
            assert sample(scrape(a_metrics), "relay_pacing_shared") == 1

            # 2. Redis goes away: each relay delivers within its share (5 per window)
            redis.stop()
            submit(a_port, 10, "c")
            submit(b_port, 10, "d")
            wait_total(provider, 60)
            assert provider.throttled == [] and provider.peak() <= QUOTA
            for relay, port in ((a, a_metrics), (b, b_metrics)):
                relay.wait_log("is unreachable")
                text = scrape(port)
                assert sample(text, "relay_pacing_shared") == 0
                assert sample(text, "relay_pacing_fallbacks_total") == 1
            assert "local share of each quota (1/2)" in a.log_text()

            # 3. Redis is back (empty, as after a crash): shared accounting resumes
            redis.start()
            time.sleep(0.6)              # past retry_interval, so the next send asks Redis
            submit(a_port, 10, "e")
            submit(b_port, 10, "f")
            wait_total(provider, 80)
            for relay, port in ((a, a_metrics), (b, b_metrics)):
                relay.wait_log("answers again")
                wait_until(lambda port=port: sample(scrape(port), "relay_pacing_shared") == 1,
                           timeout=10)
            assert provider.throttled == [] and provider.peak() <= QUOTA
            # nothing was lost or sent twice
            subjects = sorted(provider.subjects["agent@example.com"])
            assert len(subjects) == len(set(subjects)) == 80
        finally:
            for relay, _, _ in relays:
                relay.stop()
