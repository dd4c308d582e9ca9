"""Entry point of an SMTP listener process: ``python -m relay.listenproc FD LOG_LEVEL``.

Started only by the main relay process (``relay.listenproc.supervisor``), with FD one end
of a private socketpair; not a command for operators.
"""

from __future__ import annotations

import asyncio
import socket
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0].isdigit():
        print("relay.listenproc is started by `relay run` (smtp_processes), not by hand",
              file=sys.stderr)
        return 2
    from relay.app.child import ListenerProcess
    from relay.app.logs import setup_logging

    setup_logging(argv[1])
    sock = socket.socket(fileno=int(argv[0]))

    async def run() -> int:
        return await ListenerProcess(sock).run()
    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
