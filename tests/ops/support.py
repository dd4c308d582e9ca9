"""Helpers for the operations tests: a populated Metrics and a raw HTTP/1.1 client."""

from __future__ import annotations

import asyncio

from relay.metrics import STAGES, Metrics


def populate(m: Metrics) -> None:
    """Give every metric family at least one sample, as a busy relay would."""
    m.declare(listeners=["platform"], upstreams=["office365"])
    m.messages_received.labels("platform").inc(3)
    m.messages_refused.labels("platform", "relay_denied").inc()
    m.smtp_sessions.labels("platform").set(2)
    m.auth_failures.labels("platform", "smtp").inc()
    m.messages_delivered.labels("office365", "2xx").inc(2)
    m.messages_deferred.labels("office365", "4xx").inc()
    m.messages_bounced.labels("office365", "5xx").inc()
    for i, stage in enumerate(STAGES):
        m.delivery_stage_seconds.labels("office365", stage).observe(0.05 * (i + 1))
    m.delivery_stage_seconds.labels("office365", "connect").observe(11.0)
    m.delivery_seconds.labels("office365").observe(12.0)
    m.slow_deliveries.labels("office365", "connect").inc()
    m.upstream_failures.labels("office365", "proxy_unreachable").inc()
    m.update_queue({"active": 1, "deferred": 4}, oldest_received=1000.0, now=1600.0)
    m.proxy_sessions.labels("imap").set(1)
    m.proxy_sessions_total.labels("imap").inc()
    m.proxy_login_failures.labels("imap", "bad_credentials").inc()
    m.proxy_bytes.labels("imap", "upstream").inc(1234)
    m.proxy_splices.labels("imap", "kernel").inc()
    m.proxy_connect_seconds.labels("o365-imap", "connect").observe(0.3)
    m.proxy_upstream_change.labels("imap", "reconnected").inc()
    m.dkim_signatures.labels("example.com", "signed").inc()
    m.spf_results.labels("inbound", "pass").inc()
    m.oauth_token_expiry.labels("o365").set(3000)
    m.tls_cert_expiry.labels("platform").set(2e9)
    m.record_reload(success=True, now=1700000000.0)
    m.messages_waiting.labels("office365", "quota").set(37)
    m.pacing_delay.labels("office365").observe(42.0)
    m.provider_pauses.labels("office365", "mailbox", "exchange-submission-quota").inc()
    m.pacing_fallbacks.inc()
    m.declare_hostile("platform", "smtp")
    m.connections_refused.labels("platform", "reserve").inc()
    m.sessions_closed.labels("platform", "junk").inc()
    m.auth_lockouts.labels("smtp", "account").inc()
    m.accept_errors.labels("platform", "descriptors").inc()
    m.tls_handshake_failures.labels("platform", "timeout").inc()


async def http(port: int, request: bytes, *, host: str = "127.0.0.1",
               timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes; return (status, lower-cased headers, body) of the reply."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def get(path: str, *extra: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *extra, "", ""]
    return "\r\n".join(lines).encode()
