"""`relay queue list --spool DIR` with relay stopped shows what the live list showed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.operator.support import relay_cli
from tests.peers import free_port, wait_until
from tests.peers.relayproc import Relay, Sink, config, send


def states(result: dict[str, Any]) -> list[tuple[str, str, int, float]]:
    return [(m["id"], m["state"], m["attempts"], m["next_attempt"])
            for m in result["messages"]]


def test_the_stopped_list_shows_the_live_states(tmp_path: Path) -> None:
    port = free_port()
    # A provider that answers every RCPT with a 4xx: each message is tried once and
    # deferred (a refused connection would instead make the later ones wait for the
    # upstream's fail-fast window, a state only a running relay has).
    busy = Sink(tmp_path, "-r", "RCPT").start()
    text = config(spool=tmp_path / "spool", listen=port, sink=busy.port, retry_first="1h",
                  retry_max="2h")
    relay = Relay(tmp_path, text).start(port)
    try:
        ids = [send(port, subject=f"m{i}") for i in range(3)]
        cfg = str(relay.config)

        def live() -> dict[str, Any]:
            out = relay_cli("queue", "list", "--json", "-c", cfg)
            assert out.returncode == 0, out.stderr
            result: dict[str, Any] = json.loads(out.stdout)
            return result
        wait_until(lambda: [m["state"] for m in live()["messages"]] == ["deferred"] * 3)
        assert relay_cli("queue", "hold", ids[1], "-c", cfg).returncode == 0
        before = live()
        assert [s for _, s, _, _ in states(before)] == ["deferred", "held", "deferred"]
        assert before["counts"] == {"active": 0, "deferred": 2, "held": 1, "waiting": 0}
    finally:
        assert relay.stop() == 0
        busy.stop()
    out = relay_cli("queue", "list", "--json", "--spool", str(tmp_path / "spool"))
    assert out.returncode == 0, out.stderr
    stopped = json.loads(out.stdout)
    assert states(stopped) == states(before)
    assert stopped["counts"] == before["counts"]
    text_out = relay_cli("queue", "list", "--spool", str(tmp_path / "spool")).stdout
    assert text_out.rstrip().endswith("(0 active, 2 deferred, 1 held)")
