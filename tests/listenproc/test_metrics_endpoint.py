"""/metrics of a relay with listener processes: refreshed asynchronously, summed, linted."""

from __future__ import annotations

import asyncio

from relay.config.schema import HostPort
from relay.listenproc.merge import MergedMetrics, snapshot
from relay.metrics import Metrics
from relay.ops.endpoint import MetricsServer
from tests.ops.support import get, http
from tests.peers.prometheus import check_metrics
from tests.peers.relayproc import sample


async def test_refresh_is_awaited_and_the_view_sums_listener_processes() -> None:
    main, child = Metrics(), Metrics()
    main.declare(listeners=["platform"])
    merged = MergedMetrics()
    refreshed: list[int] = []

    async def refresh() -> None:               # what ListenerProcesses.refresh_metrics does
        await asyncio.sleep(0)
        child.messages_received.labels("platform").inc()
        merged.update(42, snapshot(child))
        refreshed.append(1)

    async with MetricsServer(metrics=main, listen=HostPort("127.0.0.1", 0), refresh=refresh,
                             view=merged.view) as server:
        port = server.addresses[0].port
        for expected in (1, 2):
            status, _, body = await http(port, get("/metrics"))
            assert status == 200
            text = body.decode()
            assert sample(text, "relay_messages_received_total", listener="platform") == expected
        assert len(refreshed) == 2
        lint = await asyncio.to_thread(check_metrics, body)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        _, _, body = await http(port, get("/metrics?name[]=relay_messages_received_total"))
        assert b"relay_build_info" not in body
        assert sample(body.decode(), "relay_messages_received_total", listener="platform") == 3
        assert (await http(port, get("/healthz")))[0] == 200
        assert len(refreshed) == 3             # only /metrics refreshes


async def test_a_failing_refresh_still_serves_the_main_process_metrics() -> None:
    async def refresh() -> None:
        raise RuntimeError("listener process channel broken")

    async with MetricsServer(metrics=Metrics(), listen=HostPort("127.0.0.1", 0),
                             refresh=refresh, view=MergedMetrics().view) as server:
        status, _, body = await http(server.addresses[0].port, get("/metrics"))
        assert status == 200 and b"relay_build_info" in body
