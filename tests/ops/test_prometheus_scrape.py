"""A real Prometheus server scrapes the metrics endpoint; its HTTP API shows relay's series."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from relay.config.schema import HostPort
from relay.metrics import Metrics
from relay.metrics_server import MetricsServer
from tests.peers.prometheus import prometheus_server


def _up(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in targets if t["health"] == "up"]


async def test_prometheus_scrapes_relay(metrics: Metrics, tmp_path: Path) -> None:
    ready: list[str | None] = ["starting"]
    async with MetricsServer(metrics=metrics, listen=HostPort("127.0.0.1", 0),
                             readiness=lambda: ready[0]) as server:
        target = str(server.addresses[0])
        with contextlib.ExitStack() as stack:
            # Prometheus is started and polled from threads: the loop keeps serving scrapes.
            prom = await asyncio.to_thread(
                stack.enter_context, prometheus_server(tmp_path / "prom", [target]))
            up = await asyncio.to_thread(prom.wait_for, "target up",
                                         lambda: _up(prom.targets()))
            assert up[0]["labels"]["instance"] == target
            assert up[0]["lastError"] == ""
            # A scrape in OpenMetrics carries no *_created gauges into the TSDB.
            assert up[0]["scrapeUrl"] == f"http://{target}/metrics"

            result = await asyncio.to_thread(
                prom.wait_for, "relay_build_info", lambda: prom.query("relay_build_info"))
            assert result[0]["metric"]["version"]
            for expr, expected in [
                ('relay_messages_received_total{listener="platform"}', "3"),
                ('relay_slow_deliveries_total{upstream="office365",stage="connect"}', "1"),
                ('relay_slow_deliveries_total{upstream="office365",stage="data"}', "0"),
                ('relay_queue_messages{state="deferred"}', "4"),
                ("relay_queue_oldest_message_age_seconds", "600"),
                ("relay_protected_header_violations_total", "0"),
                ('relay_config_reloads_total{result="failure"}', "0"),
                ('relay_tls_certificate_expiry_timestamp_seconds{listener="platform"}',
                 "2000000000"),
                ('relay_oauth_token_expiry_seconds{source="o365"}', "3000"),
                ('relay_delivery_stage_seconds_count{upstream="office365",stage="connect"}',
                 "2"),
                ('relay_delivery_stage_seconds_bucket{upstream="office365",stage="connect",'
                 'le="10.0"}', "1"),
            ]:
                series = await asyncio.to_thread(prom.query, expr)
                assert [s["value"][1] for s in series] == [expected], expr
            created = await asyncio.to_thread(prom.query, '{__name__=~"relay_.*_created"}')
            assert created == []

            # A value changed in relay shows up at the next scrape.
            metrics.upstream_failures.labels("office365", "connect_timeout").inc(7)
            await asyncio.to_thread(
                prom.wait_for, "a new failure reason",
                lambda: prom.query('relay_upstream_connection_failures_total'
                                   '{reason="connect_timeout"} == 7'))

            # The server went away: Prometheus marks the target down.
            await server.stop()
            await asyncio.to_thread(
                prom.wait_for, "target down",
                lambda: [t for t in prom.targets() if t["health"] == "down"])
