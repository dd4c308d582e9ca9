"""Summing listener processes' metrics into the main process's /metrics."""

from __future__ import annotations

import pytest
from prometheus_client.exposition import generate_latest

from relay.listenproc.merge import MergedMetrics, snapshot
from relay.metrics import Metrics

pytestmark = pytest.mark.fast


def render(main: Metrics, merged: MergedMetrics) -> str:
    return generate_latest(merged.view(main.registry)).decode()  # type: ignore[arg-type]


def line(text: str, prefix: str) -> float:
    [value] = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix)]
    return value


def test_listener_families_are_summed_and_the_rest_is_the_main_process_own() -> None:
    main, one, two = Metrics(), Metrics(), Metrics()
    for m in (main, one, two):
        m.declare(listeners=["platform"])
    one.messages_received.labels("platform").inc(3)
    two.messages_received.labels("platform").inc(4)
    two.messages_refused.labels("platform", "relay_denied").inc()
    one.smtp_sessions.labels("platform").set(2)
    two.smtp_sessions.labels("platform").set(1)
    one.record_reload(success=True)          # never summed: the main process's alone
    main.record_reload(success=True)
    merged = MergedMetrics()
    merged.update(101, snapshot(one))
    merged.update(102, snapshot(two))
    text = render(main, merged)
    assert line(text, 'relay_messages_received_total{listener="platform"}') == 7
    refused = 'relay_messages_refused_total{listener="platform",reason="relay_denied"}'
    assert line(text, refused) == 1
    assert line(text, 'relay_smtp_sessions{listener="platform"}') == 3
    assert line(text, 'relay_config_reloads_total{result="success"}') == 1
    assert text.count("relay_build_info{") == 1
    assert text.count("# TYPE relay_messages_received_total counter") == 1


def test_a_dead_process_keeps_its_counts_but_not_its_sessions() -> None:
    main, child = Metrics(), Metrics()
    child.messages_received.labels("platform").inc(5)
    child.smtp_sessions.labels("platform").set(4)
    merged = MergedMetrics()
    merged.update(7, snapshot(child))
    merged.retire(7)
    replacement = Metrics()
    replacement.messages_received.labels("platform").inc(1)
    merged.update(8, snapshot(replacement))
    text = render(main, merged)
    assert line(text, 'relay_messages_received_total{listener="platform"}') == 6
    assert 'relay_smtp_sessions{listener="platform"} 4' not in text
