"""Measure the listener's CPU per message against stock aiosmtpd (not a test; run by hand).

    python -m tests.smtp.measure_data_path [--size 102400] [--messages 2000] [--sessions 20]

Postfix's smtp-source sends the messages; the server runs in this process, so
``getrusage(RUSAGE_SELF)`` is the server's CPU alone. accept() returns at once (no spool),
so the figure is the SMTP path: session, DATA reading, smuggling checks, replies.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import resource
import time
from typing import Any

from aiosmtpd.smtp import SMTP

from relay.config.schema import HostPort, ListenerConfig
from relay.envelope import Envelope
from relay.maillog import MailLog
from relay.smtp.listener import SmtpListener
from tests.peers import need


class _Stock:
    count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        _Stock.count += 1
        return "250 OK"


async def _run(kind: str, size: int, messages: int, sessions: int,
               reuse: bool = False) -> tuple[float, float, int]:
    count = 0

    async def accept(envelope: Envelope, data: bytes) -> str:
        nonlocal count
        count += 1
        return f"Q{count}"

    loop = asyncio.get_running_loop()
    if kind == "relay":
        cfg = ListenerConfig(name="bench", protocol="smtp", listen=HostPort("127.0.0.1", 0),
                             tls="none", auth="none", max_connections=1000,
                             max_connections_per_client=1000,
                             allow=(ipaddress.ip_network("127.0.0.0/8"),))
        listener = SmtpListener(cfg, hostname="bench", accept=accept, maillog=MailLog())
        await listener.start()
        port = listener.addresses[0][1]
    else:
        server = await loop.create_server(
            lambda: SMTP(_Stock(), data_size_limit=64 << 20, enable_SMTPUTF8=True,
                         hostname="bench"), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        need("smtp-source"), *(["-d"] if reuse else []), "-s", str(sessions),
        "-l", str(size), "-m", str(messages),
        "-f", "bench@example.com", "-t", "sink@example.net", f"127.0.0.1:{port}")
    await proc.wait()
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if kind == "relay":
        await listener.stop_accepting()
        await listener.wait_closed(5)
        done = count
    else:
        server.close()
        done = _Stock.count
    return cpu, wall, done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=102400)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--kind", choices=["relay", "aiosmtpd", "both"], default="both")
    parser.add_argument("--reuse", action="store_true",
                        help="many messages per connection (smtp-source -d)")
    a = parser.parse_args()
    kinds = ["aiosmtpd", "relay"] if a.kind == "both" else [a.kind]
    for kind in kinds:
        cpu, wall, done = asyncio.run(_run(kind, a.size, a.messages, a.sessions, a.reuse))
        print(f"{kind:9s} {a.size:7d} B x {done:5d}: {cpu / done * 1e3:6.3f} ms CPU/message, "
              f"{done / wall:7.0f} msg/s")


if __name__ == "__main__":
    main()
