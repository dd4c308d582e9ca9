"""The event loop under ``relay run`` and its SMTP listener processes (``relay.app.eventloop``).

On the shipped default both processes run on uvloop and mail goes through; with
``event_loop = "asyncio"`` neither loads uvloop; a reload cannot switch loops (the process
keeps its own and says why). The rest of the end-to-end suite runs on the default, so every
relay process it starts exercises uvloop's transports.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from relay.app.eventloop import run, running
from relay.listenproc.__main__ import main as listener_main
from tests.peers import free_port, wait_until
from tests.peers.relayproc import Relay, Sink, config, send


def loads_uvloop(pid: int) -> bool:
    """uvloop's extension is mapped into the process: it runs on uvloop (relay imports it
    only to run on it)."""
    return "/uvloop/" in Path(f"/proc/{pid}/maps").read_text()


async def _kind() -> str:
    await asyncio.sleep(0)
    return running()


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_run_runs_the_coroutine_on_the_loop_named(kind: str) -> None:
    assert run(_kind(), kind) == kind


def test_an_unknown_loop_is_refused_and_the_coroutine_closed() -> None:
    coro = _kind()
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        run(coro, "trio")
    assert coro.cr_frame is None                 # closed: no "never awaited" warning


def test_a_listener_process_refuses_a_loop_it_does_not_know(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert listener_main(["2147483000", "info", "2147483001", "trio"]) == 2
    assert "started by `relay run`" in capsys.readouterr().err


@pytest.mark.parametrize(("setting", "kind"), [("", "uvloop"), ("asyncio", "asyncio")],
                         ids=["default", "asyncio"])
def test_relay_and_its_listener_processes_run_on_the_configured_loop(
        tmp_path: Path, setting: str, kind: str) -> None:
    sink = Sink(tmp_path).start()
    port = free_port()
    text = config(spool=tmp_path / "spool", listen=port, sink=sink.port, smtp_processes=1)
    line = f'event_loop = "{setting}"\n' if setting else ""
    relay = Relay(tmp_path, text.replace("smtp_processes = 1\n",
                                         f"smtp_processes = 1\n{line}")).start(port)
    try:
        assert relay.proc is not None
        out = relay.cli("status", "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        [child] = [int(p) for p in json.loads(out.stdout)["listener_processes"]]
        assert f"event loop {kind})" in relay.log_text()
        assert loads_uvloop(relay.proc.pid) is (kind == "uvloop")
        assert loads_uvloop(child) is (kind == "uvloop")
        for i in range(5):
            assert send(port, subject=f"on-{kind}-{i}")
        wait_until(lambda: len(sink.messages()) == 5)

        other = "asyncio" if kind == "uvloop" else "uvloop"
        relay.config.write_text(text.replace(
            "smtp_processes = 1\n", f'smtp_processes = 1\nevent_loop = "{other}"\n'))
        out = relay.cli("reload")
        assert out.returncode == 1
        assert "event_loop cannot change on reload" in out.stdout + out.stderr
        assert send(port, subject="after-reload")
        wait_until(lambda: b"Subject: after-reload\n" in b"".join(sink.messages()))
        assert relay.stop() == 0
    finally:
        relay.stop()
        sink.stop()
