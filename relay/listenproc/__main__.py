"""Entry point of an SMTP listener process:
``python -m relay.listenproc FD LOG_LEVEL ADMISSIONS_FD [EVENT_LOOP]``.

Started only by the main relay process (``relay.listenproc.supervisor``), with FD and
ADMISSIONS_FD one end each of two private socketpairs (the second carries only connection
admissions, so that they never wait behind a stored message), and EVENT_LOOP the main
process's ``[relay] event_loop`` (asyncio's own loop when absent: a main process started
before an upgrade respawns its listener processes from the new code); not a command for
operators.
"""

from __future__ import annotations

import socket
import sys

from relay.config.schema import EVENT_LOOPS


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4) or not argv[0].isdigit() or not argv[2].isdigit() or \
            (argv[3:] and argv[3] not in EVENT_LOOPS):
        print("relay.listenproc is started by `relay run` (smtp_processes), not by hand",
              file=sys.stderr)
        return 2
    from relay.app.allocator import tune_allocator
    from relay.app.child import ListenerProcess
    from relay.app.collector import pace_collector
    from relay.app.eventloop import run as run_loop
    from relay.app.logs import setup_logging

    setup_logging(argv[1])
    pace_collector()
    tune_allocator()
    sock = socket.socket(fileno=int(argv[0]))
    admissions = socket.socket(fileno=int(argv[2]))

    async def run() -> int:
        return await ListenerProcess(sock, admissions).run()
    return run_loop(run(), argv[3] if len(argv) == 4 else "asyncio")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
