"""Entry point of an SMTP listener process:
``python -m relay.listenproc FD LOG_LEVEL ADMISSIONS_FD``.

Started only by the main relay process (``relay.listenproc.supervisor``), with FD and
ADMISSIONS_FD one end each of two private socketpairs (the second carries only connection
admissions, so that they never wait behind a stored message); not a command for operators.
"""

from __future__ import annotations

import asyncio
import socket
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[0].isdigit() or not argv[2].isdigit():
        print("relay.listenproc is started by `relay run` (smtp_processes), not by hand",
              file=sys.stderr)
        return 2
    from relay.app.allocator import tune_allocator
    from relay.app.child import ListenerProcess
    from relay.app.collector import pace_collector
    from relay.app.logs import setup_logging

    setup_logging(argv[1])
    pace_collector()
    tune_allocator()
    sock = socket.socket(fileno=int(argv[0]))
    admissions = socket.socket(fileno=int(argv[2]))

    async def run() -> int:
        return await ListenerProcess(sock, admissions).run()
    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
