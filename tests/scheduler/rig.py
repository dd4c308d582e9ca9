"""A scheduler wired to a real spool in a temporary directory, with a captured mail log."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay.config.schema import RetryConfig, RouteConfig, UpstreamConfig
from relay.envelope import Envelope
from relay.maillog import MailLog
from relay.metrics import Metrics
from relay.outbound.dsn import Bouncer
from relay.outbound.scheduler import Scheduler
from relay.outbound.throttle_table import ThrottleTable
from relay.routing import Router
from relay.spool.handovers import Handovers
from relay.spool.store import Spool
from tests.delivery.helpers import deliverer
from tests.peers import need

FAST = RetryConfig(first=0.05, max=0.2, jitter=0.1, lifetime=3600.0)
_ids = itertools.count()


def sink_argv(port: int, *options: str) -> list[str]:
    """Postfix's smtp-sink on 127.0.0.1:port (``-u nobody`` when run as root, as it requires)."""
    argv = [need("smtp-sink")]
    if os.geteuid() == 0:
        argv += ["-u", "nobody"]
    return [*argv, *options, f"127.0.0.1:{port}", "100"]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def until(cond: Callable[[], object], timeout: float = 20.0) -> None:
    """Wait for a condition on the loop (polling; never a fixed sleep)."""
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 (a bounded condition poll)
            await asyncio.sleep(0.01)


class Rig:
    def __init__(self, root: Path, *ups: UpstreamConfig, retry: RetryConfig = FAST,
                 routes: tuple[RouteConfig, ...] = (), default: str | None = "up",
                 throttles: ThrottleTable | None = None, clock: Callable[[], float] = time.time,
                 handovers: Handovers | None = None, **deliverer_kw: Any) -> None:
        self.metrics = Metrics()
        self.spool = Spool(root / "spool", fsync=False, metrics=self.metrics)
        self.deliverer = deliverer(*ups, metrics=self.metrics, handovers=handovers,
                                   **deliverer_kw)
        self.router = Router(routes, default)
        self._handler = _Lines()
        logger = logging.getLogger(f"test.mail.{next(_ids)}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self._handler)
        self.bouncer = Bouncer(spool=self.spool, hostname="relay.test")
        self.scheduler = Scheduler(spool=self.spool, router=self.router,
                                   deliverer=self.deliverer, retry=retry,
                                   maillog=MailLog(logger), bouncer=self.bouncer,
                                   metrics=self.metrics, throttles=throttles,
                                   clock=clock, handovers=handovers)

    @property
    def log(self) -> list[str]:
        return self._handler.lines

    def lines(self, verb: str) -> list[str]:
        return [line for line in self.log if f": {verb} " in line]

    async def start(self) -> None:
        recovered = self.spool.recover()
        self.spool.add_listener(self.scheduler.enqueue)
        await self.scheduler.start(recovered)

    async def send(self, data: bytes, *, sender: str = "alice@example.com",
                   rcpts: tuple[str, ...] = ("bob@example.net",), **env: Any) -> str:
        envelope = Envelope(sender=sender, recipients=rcpts, received_at=time.time(), **env)
        return await self.spool.store(envelope, data)

    async def drained(self, timeout: float = 20.0) -> None:
        await until(lambda: not self.spool.queue_ids(), timeout)

    async def stop(self) -> None:
        await self.scheduler.stop(grace=5.0)
        await self.deliverer.close()
        self.spool.close()
