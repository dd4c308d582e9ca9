"""The metrics endpoint on a real loopback socket: scrapes, probes, errors, promtool lint."""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.config.schema import HostPort
from relay.envelope import Envelope
from relay.errors import RelayError
from relay.metrics import Metrics
from relay.ops.endpoint import MAX_HEAD, MetricsServer
from relay.spool.store import Spool
from tests.ops.support import get, http
from tests.peers.prometheus import check_metrics

TEXT_004 = "text/plain; version=0.0.4; charset=utf-8"


class Probes:
    def __init__(self) -> None:
        self.ready: str | None = "starting"
        self.health: str | None = None
        self.scrapes = 0

    def before_scrape(self) -> None:
        self.scrapes += 1


@pytest.fixture
async def served(metrics: Metrics) -> AsyncIterator[tuple[int, Probes, Metrics]]:
    probes = Probes()
    server = MetricsServer(metrics=metrics, listen=HostPort("127.0.0.1", 0),
                           readiness=lambda: probes.ready, health=lambda: probes.health,
                           before_scrape=probes.before_scrape)
    async with server:
        yield server.addresses[0].port, probes, metrics


async def test_scrape_is_text_format_and_passes_promtool(served: tuple[int, Probes, Metrics]
                                                         ) -> None:
    port, probes, _ = served
    status, headers, body = await http(port, get("/metrics"))
    assert status == 200
    assert headers["content-type"] == TEXT_004
    assert headers["content-length"] == str(len(body))
    assert "content-encoding" not in headers
    assert probes.scrapes == 1
    result = await asyncio.to_thread(check_metrics, body)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""
    assert b"_created" not in body
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ("relay_messages_received", "relay_delivery_stage_seconds",
                 "relay_slow_deliveries", "relay_queue_messages",
                 "relay_queue_oldest_message_age_seconds", "relay_build_info",
                 "relay_protected_header_violations", "relay_config_reloads",
                 "relay_tls_certificate_expiry_timestamp_seconds",
                 "relay_oauth_token_expiry_seconds"):
        assert name in families, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("relay_queue_oldest_message_age_seconds", ())] == 600.0
    assert samples[("relay_queue_messages", (("state", "held"),))] == 0.0
    assert samples[("relay_config_reloads_total", (("result", "failure"),))] == 0.0
    assert samples[("relay_slow_deliveries_total",
                    (("stage", "connect"), ("upstream", "office365")))] == 1.0
    assert samples[("relay_slow_deliveries_total",
                    (("stage", "data"), ("upstream", "office365")))] == 0.0


async def test_scrape_gzip_openmetrics_and_filter(served: tuple[int, Probes, Metrics]) -> None:
    port, _, _ = served
    status, headers, body = await http(port, get("/metrics", "Accept-Encoding: gzip"))
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert b"relay_build_info" in gzip.decompress(body)

    status, headers, _ = await http(port, get("/metrics", "Accept-Encoding: gzip;q=0"))
    assert status == 200 and "content-encoding" not in headers

    accept = ("Accept: application/openmetrics-text;version=1.0.0,"
              "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    status, headers, body = await http(port, get("/metrics", accept))
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")

    status, _, body = await http(port, get("/metrics?name[]=relay_queue_messages"))
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert status == 200 and names == {"relay_queue_messages"}


async def test_head_has_headers_and_no_body(served: tuple[int, Probes, Metrics]) -> None:
    port, _, _ = served
    status, headers, body = await http(port, get("/metrics", method="HEAD"))
    assert status == 200 and body == b""
    assert int(headers["content-length"]) > 1000
    assert headers["connection"] == "close"


async def test_probes_follow_the_app(served: tuple[int, Probes, Metrics]) -> None:
    port, probes, _ = served
    status, _, body = await http(port, get("/readyz"))
    assert (status, body) == (503, b"not ready: starting\n")
    probes.ready = None
    status, _, body = await http(port, get("/readyz"))
    assert (status, body) == (200, b"ready\n")
    probes.ready = "draining"
    status, _, body = await http(port, get("/readyz"))
    assert (status, body) == (503, b"not ready: draining\n")

    status, headers, body = await http(port, get("/healthz"))
    assert (status, body) == (200, b"ok\n")
    assert headers["cache-control"] == "no-store"
    probes.health = "spool directory unwritable"
    status, _, body = await http(port, get("/healthz"))
    assert (status, body) == (503, b"not ok: spool directory unwritable\n")


async def test_probe_that_raises_is_not_ready(metrics: Metrics) -> None:
    def broken() -> str | None:
        raise RuntimeError("boom")

    async with MetricsServer(metrics=metrics, listen=HostPort("127.0.0.1", 0),
                             readiness=broken) as server:
        port = server.addresses[0].port
        status, _, body = await http(port, get("/readyz"))
        assert status == 503 and b"readiness probe failed: boom" in body
        # No probes given: healthy and ready.
    async with MetricsServer(metrics=metrics, listen=HostPort("127.0.0.1", 0)) as server:
        port = server.addresses[0].port
        assert (await http(port, get("/readyz")))[0] == 200
        assert (await http(port, get("/healthz")))[0] == 200


async def test_failing_before_scrape_still_serves(metrics: Metrics) -> None:
    def hook() -> None:
        raise RuntimeError("queue stats unavailable")

    async with MetricsServer(metrics=metrics, listen=HostPort("127.0.0.1", 0),
                             before_scrape=hook) as server:
        status, _, body = await http(server.addresses[0].port, get("/metrics"))
        assert status == 200 and b"relay_build_info" in body


@pytest.mark.parametrize(("request_bytes", "status", "extra"), [
    (get("/nope"), 404, {}),
    (get("/metrics", method="POST"), 405, {"allow": "GET, HEAD"}),
    (get("/healthz", method="DELETE"), 405, {"allow": "GET, HEAD"}),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505, {}),
    (b"garbage\r\n\r\n", 400, {}),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", 400, {}),         # head never completed
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n", 431, {}),
])
async def test_error_statuses(served: tuple[int, Probes, Metrics], request_bytes: bytes,
                              status: int, extra: dict[str, str]) -> None:
    port, _, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes)
    await writer.drain()
    if not request_bytes.endswith(b"\r\n\r\n"):
        writer.write_eof()                                 # client gives up mid-head
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert raw.startswith(f"HTTP/1.1 {status} ".encode()), raw[:200]
    for k, v in extra.items():
        assert f"{k}: {v}".lower().encode() in raw.lower()


async def test_connect_and_leave_is_harmless(served: tuple[int, Probes, Metrics]) -> None:
    port, _, _ = served
    for _ in range(5):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()
    assert (await http(port, get("/healthz")))[0] == 200


async def test_slow_client_does_not_block_others(served: tuple[int, Probes, Metrics]) -> None:
    port, _, _ = served
    _, idle = await asyncio.open_connection("127.0.0.1", port)
    idle.write(b"GET /metrics HTTP/1.1\r\n")            # and then nothing
    await idle.drain()
    status, _, _ = await asyncio.wait_for(http(port, get("/healthz")), 5)
    assert status == 200
    idle.close()


async def test_bind_conflict_has_a_hint(metrics: Metrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(metrics=metrics, listen=HostPort("127.0.0.1", port))
        with pytest.raises(RelayError) as info:
            await server.start()
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "[metrics] listen" in info.value.hint


async def test_stop_closes_listener_and_open_connections(metrics: Metrics) -> None:
    server = MetricsServer(metrics=metrics, listen=HostPort("127.0.0.1", 0))
    await server.start()
    port = server.addresses[0].port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\n")             # incomplete: handler waits
    await writer.drain()
    await asyncio.wait_for(server.stop(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    assert server.addresses == []


async def test_request_head_timeout_is_408(metrics: Metrics) -> None:
    async with MetricsServer(metrics=metrics, listen=HostPort("127.0.0.1", 0),
                             read_timeout=0.2) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.addresses[0].port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert raw.startswith(b"HTTP/1.1 408 ")


async def test_queue_gauges_are_computed_at_scrape_time(tmp_path: Path) -> None:
    """The app's wiring: before_scrape=spool.update_metrics keeps the oldest age current."""
    m = Metrics()
    spool = Spool(tmp_path / "spool", fsync=False, metrics=m)
    spool.recover()
    received = time.time() - 120
    await spool.store(Envelope(sender="a@example.com", recipients=("b@example.net",),
                               received_at=received), b"Subject: x\r\n\r\nbody\r\n")
    async with MetricsServer(metrics=m, listen=HostPort("127.0.0.1", 0),
                             before_scrape=spool.update_metrics) as server:
        _, _, body = await http(server.addresses[0].port, get("/metrics"))
    samples = {(s.name, tuple(s.labels.values())): s.value
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert samples[("relay_queue_messages", ("active",))] == 1.0
    assert samples[("relay_queue_messages", ("deferred",))] == 0.0
    assert 120 <= samples[("relay_queue_oldest_message_age_seconds", ())] < 180
    spool.close()
