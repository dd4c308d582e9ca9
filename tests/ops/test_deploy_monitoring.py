"""deploy/prometheus and deploy/grafana: rules pass promtool, and refer to real metrics."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import yaml

from tests.ops.deploy_support import DEPLOY, METRIC_REF, exposed_names, family_names
from tests.peers import need

RULES = DEPLOY / "prometheus" / "relay-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "relay-dashboard.json"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need("promtool"), *args], capture_output=True, text=True,
                          timeout=120, check=False, cwd=DEPLOY / "prometheus")


def test_rules_check() -> None:
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_unit_tests() -> None:
    proc = promtool("test", "rules", "relay-rules.test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_sample_prometheus_config() -> None:
    proc = promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


@pytest.mark.fast
def test_rules_cover_the_issue_and_use_real_metrics() -> None:
    rules = alert_rules()
    names = exposed_names()
    used: set[str] = set()
    for rule in rules:
        refs = set(METRIC_REF.findall(rule["expr"]))
        assert refs <= names, f"{rule['alert']}: unknown metrics {refs - names}"
        used |= refs
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    for needed in ("relay_slow_deliveries_total", "relay_queue_messages",
                   "relay_queue_oldest_message_age_seconds",
                   "relay_upstream_connection_failures_total",
                   "relay_oauth_token_expiry_seconds", "relay_config_reloads_total",
                   "relay_tls_certificate_expiry_timestamp_seconds",
                   "relay_protected_header_violations_total"):
        assert needed in used, f"no alert uses {needed}"
    tested = {t["alertname"] for test in yaml.safe_load(
        (DEPLOY / "prometheus" / "relay-rules.test.yml").read_text())["tests"]
        for t in test["alert_rule_test"]}
    assert {r["alert"] for r in rules} <= tested, "every alert has a promtool unit test"


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


@pytest.mark.fast
def test_dashboard_is_valid_and_covers_every_metric() -> None:
    doc = dashboard()
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 30
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    names = exposed_names()
    used: set[str] = set()
    for p in doc["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            refs = set(METRIC_REF.findall(t["expr"]))
            assert refs <= names, f"{p['title']}: unknown metrics {refs - names}"
            used |= refs
    families = family_names()
    shown = {f for f in families if any(u == f or u.startswith(f + "_") for u in used)}
    assert shown == families, f"not on the dashboard: {sorted(families - shown)}"
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "job", "instance", "upstream"} <= variables


@pytest.mark.fast
def test_dashboard_shows_delivery_time_per_upstream_and_stage() -> None:
    exprs = dashboard_exprs()
    by_stage = [e for e in exprs if "relay_delivery_stage_seconds" in e and "stage" in e]
    assert any("histogram_quantile" in e and "upstream" in e for e in by_stage)
    assert any("_sum" in e for e in by_stage), "mean seconds per stage (stacked)"
    assert any("relay_slow_deliveries_total" in e and "stage" in e for e in exprs)


@pytest.mark.fast
def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard()["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
