"""Connection limits, timeouts, line limits, reload and drain of a running listener."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import subprocess
import time
from pathlib import Path

from relay.users import UserDB
from tests.peers import need, wait_until
from tests.smtp.conftest import PASSWORD, RawClient, StartRelay, run

ALLOW = (ipaddress.ip_network("127.0.0.0/8"),)


async def test_connection_limits_total_and_per_client(start_relay: StartRelay) -> None:
    relay = await start_relay(allow=ALLOW, max_connections=3, max_connections_per_client=2)

    keep: list[RawClient] = []

    def go() -> list[str]:
        a = RawClient(relay.port, source="127.0.0.1")
        b = RawClient(relay.port, source="127.0.0.1")
        out = [a.reply(), b.reply()]
        c = RawClient(relay.port, source="127.0.0.1")
        out.append(c.reply())
        assert c.closed()
        d = RawClient(relay.port, source="127.0.0.2")
        out.append(d.reply())
        e = RawClient(relay.port, source="127.0.0.3")
        out.append(e.reply())
        assert e.closed()
        a.cmd("QUIT")
        a.close()
        keep.extend((b, d))
        return out

    out = await run(go)
    assert out[0].startswith("220 relay.test ESMTP") and out[1].startswith("220 ")
    assert out[2] == "421 4.7.0 Error: too many connections from your address"
    assert out[3].startswith("220 ")
    assert out[4] == "421 4.7.0 Error: too many connections; try again later"
    assert relay.refused("too_many_connections") == 2

    def gauge() -> float | None:
        return relay.metrics.registry.get_sample_value(
            "relay_smtp_sessions", {"listener": "platform"})

    await run(lambda: wait_until(lambda: gauge() == 2, timeout=5))  # b, d open; a quit
    for client in keep:
        client.close()
    await run(lambda: wait_until(lambda: gauge() == 0, timeout=5))


async def test_command_timeout(start_relay: StartRelay) -> None:
    relay = await start_relay(allow=ALLOW, command_timeout=0.3)

    def go() -> tuple[str, float, bool]:
        c = RawClient(relay.port)
        c.reply()
        start = time.monotonic()
        reply = c.reply()                        # say nothing: the server times out
        return reply, time.monotonic() - start, c.closed()

    reply, elapsed, closed = await run(go)
    assert reply == "421 4.4.2 relay.test Error: timeout exceeded"
    assert 0.25 < elapsed < 3 and closed


async def test_data_timeout_queues_nothing(start_relay: StartRelay) -> None:
    relay = await start_relay(allow=ALLOW, data_timeout=0.3, command_timeout=30)

    def go() -> tuple[str, bool]:
        c = RawClient(relay.port)
        c.reply()
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@example.com>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        c.send(b"Subject: partial\r\n\r\nno end")
        return c.reply(), c.closed()

    assert await run(go) == ("421 4.4.2 relay.test Error: timeout exceeded", True)
    assert relay.recorder.messages == []


async def test_long_command_line(start_relay: StartRelay) -> None:
    relay = await start_relay(allow=ALLOW)
    out = await run(lambda: _session(relay.port, ["NOOP " + "x" * 600,
                                                   "MAIL FROM:<" + "a" * 2000 + "@x.example>",
                                                   "NOOP"]))
    assert out[0].startswith("500 5.5.2 ")
    assert out[1].startswith("500 5.5.2 ")
    assert out[2] == "250 2.0.0 OK"


def _session(port: int, commands: list[str]) -> list[str]:
    c = RawClient(port)
    c.reply()
    c.cmd("EHLO x")
    out = [c.cmd(cmd) for cmd in commands]
    c.close()
    return out


async def test_reconfigure_applies_to_new_sessions_only(start_relay: StartRelay) -> None:
    relay = await start_relay(allow=ALLOW, max_recipients=5)

    def go() -> tuple[list[str], list[str]]:
        old = RawClient(relay.port)
        old.reply()
        old.cmd("EHLO x")
        relay_loop.call_soon_threadsafe(reconfigure)
        reconfigured.wait(5)
        new = RawClient(relay.port)
        new.reply()
        new.cmd("EHLO x")
        cmds = ["MAIL FROM:<a@example.com>", "RCPT TO:<r1@example.net>",
                "RCPT TO:<r2@example.net>"]
        return [old.cmd(c) for c in cmds], [new.cmd(c) for c in cmds]

    import threading
    reconfigured = threading.Event()
    relay_loop = asyncio.get_running_loop()

    def reconfigure() -> None:
        cfg = dataclasses.replace(relay.listener.config, max_recipients=1)
        relay.listener.reconfigure(cfg, users=None)
        reconfigured.set()

    old, new = await run(go)
    assert old[2] == "250 2.1.5 Ok"
    assert new[2] == "452 4.5.3 Error: too many recipients"


async def test_drain_lets_sessions_finish_then_closes_with_421(start_relay: StartRelay) -> None:
    relay = await start_relay(allow=ALLOW)
    c = await run(RawClient, relay.port)
    await run(c.reply)
    await relay.listener.stop_accepting()
    started = time.monotonic()
    await relay.listener.wait_closed(0.3)
    assert time.monotonic() - started >= 0.3
    assert await run(c.reply) == "421 4.3.2 Service shutting down; try again later"
    assert relay.listener.sessions == 0


async def test_swaks_starttls_auth_submission(start_relay: StartRelay, tmp_path: Path,
                                              users_file: Path) -> None:
    relay = await start_relay()
    swaks = need("swaks")
    proc = await asyncio.create_subprocess_exec(
        swaks, "--server", "127.0.0.1", "--port", str(relay.port), "--tls",
        "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", PASSWORD,
        "--from", "agent@example.com", "--to", "customer@example.net",
        "--header", "Subject: via swaks", "--body", "hello from swaks",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "250 2.0.0 Ok: queued as TESTQ0001" in text
    assert PASSWORD not in "\n".join(relay.maillog_records)
    env, data = relay.recorder.messages[0]
    assert env.auth_user == "alice" and b"Subject: via swaks" in data
    assert UserDB.load(users_file).names() == ["alice", "bob"]


async def test_drain_waits_for_a_message_being_stored(start_relay: StartRelay) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_accept(envelope: object, data: bytes) -> str:
        started.set()
        await release.wait()
        return "SLOWQ1"

    relay = await start_relay(allow=ALLOW, accept=slow_accept)

    def client() -> list[str]:
        c = RawClient(relay.port)
        c.reply()
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@example.com>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        out = [c.cmd("Subject: x\r\n\r\nbody\r\n."), c.reply()]
        c.close()
        return out

    replies = asyncio.ensure_future(run(client))
    await asyncio.wait_for(started.wait(), 10)
    await relay.listener.stop_accepting()
    drained = asyncio.ensure_future(relay.listener.wait_closed(0.05))
    # the drain timeout passes while the message is being stored: that session is
    # asked to close after its reply instead of at once
    await run(lambda: wait_until(
        lambda: any(s._closing for s in relay.listener._sessions), timeout=10))
    assert not drained.done()
    release.set()
    await asyncio.wait_for(drained, 10)
    assert await replies == ["250 2.0.0 Ok: queued as SLOWQ1",
                             "421 4.3.2 Service shutting down; try again later"]


async def test_failed_implicit_tls_handshake_leaves_no_session(start_relay: StartRelay) -> None:
    relay = await start_relay(tls="implicit")

    def go() -> bool:
        c = RawClient(relay.port)
        c.send(b"EHLO plaintext-client\r\n")       # not a TLS ClientHello
        closed = c.closed()
        c.close()
        return closed

    assert await run(go)
    ok = RawClient(relay.port)                     # the listener still serves
    await run(ok.close)
    assert relay.listener.sessions == 0
    started = time.monotonic()
    await relay.listener.stop_accepting()
    await relay.listener.wait_closed(5)
    assert time.monotonic() - started < 1


async def test_no_admission_from_the_main_process_is_not_logged_as_a_full_client(
        start_relay: StartRelay) -> None:
    """When the main process does not answer an admission (listener processes), the client
    gets 421 4.3.2 and the mail log and metrics say "unavailable", not that the client
    had too many connections: the operator looks at the main process, not the platform."""
    from typing import Any

    from relay.listenproc.anvil import RemoteCounter

    def silent(kind: str, payload: object, *, timeout: float) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_exception(TimeoutError("no answer"))
        return fut

    relay = await start_relay(allow=ALLOW, connections=RemoteCounter(
        "platform", request=silent, notify=lambda kind, payload: None))

    def go() -> str:
        c = RawClient(relay.port, source="127.0.0.1")
        try:
            return c.reply()
        finally:
            c.close()

    assert await run(go) == "421 4.3.2 Service not available; try again later"
    await run(lambda: wait_until(lambda: relay.refused("unavailable") == 1, timeout=5))
    assert relay.refused("too_many_connections") == 0
    assert any("reason=unavailable" in r and "stage=CONNECT" in r for r in relay.maillog_records)
