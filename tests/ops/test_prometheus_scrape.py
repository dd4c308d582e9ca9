"""A real Prometheus scrapes the metrics endpoint: relay's series, alert rules and dashboard.

Prometheus runs with deploy/prometheus/relay-rules.yml loaded; every query of
deploy/grafana/relay-dashboard.json is run against it and must return data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from relay.config.schema import HostPort
from relay.metrics import Metrics
from relay.ops.endpoint import MetricsServer
from tests.ops.deploy_support import DEPLOY
from tests.peers.prometheus import Prometheus, prometheus_server

RULES = DEPLOY / "prometheus" / "relay-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "relay-dashboard.json"


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
                stack.enter_context,
                prometheus_server(tmp_path / "prom", [target], rule_files=[RULES]))
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

            await asyncio.to_thread(check_dashboard_and_rules, prom)

            # A protected-header violation fires its alert at the next evaluation.
            metrics.protected_header_violations.inc()
            firing = await asyncio.to_thread(
                prom.wait_for, "RelayProtectedHeaderViolation firing",
                lambda: [a for a in prom.api("alerts")["alerts"]
                         if a["labels"]["alertname"] == "RelayProtectedHeaderViolation"
                         and a["state"] == "firing"])
            assert firing[0]["labels"]["instance"] == target

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


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) with Grafana's variables replaced as Grafana would."""
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for t in panel.get("targets", []):
            expr = (t["expr"].replace("$__rate_interval", "30s").replace("$job", "relay")
                    .replace("$instance", ".*").replace("$upstream", ".*"))
            out.append((panel["title"], expr))
    return out


def check_dashboard_and_rules(prom: Prometheus) -> None:
    """Every dashboard query returns data; every alert rule evaluates without error."""
    prom.wait_for("3 scrapes in 30s", lambda: prom.query(
        "count_over_time(relay_build_info[30s]) >= 3"))
    for title, expr in dashboard_queries():
        assert prom.query(expr), f"dashboard panel {title!r} has no data: {expr}"

    def evaluated() -> list[dict[str, Any]]:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        done = all(r["lastEvaluation"] > "1970" and not r["lastEvaluation"].startswith("0001")
                   for r in rules)
        return rules if rules and done else []

    rules = prom.wait_for("rules evaluated", evaluated)
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    assert len(rules) == RULES.read_text().count("- alert:")
    # A healthy relay: nothing pending or firing.
    assert prom.api("alerts")["alerts"] == []
