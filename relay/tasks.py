"""Background tasks: spawned, kept, their failures logged with a traceback, awaited on close.

Every long-lived or fire-and-forget task relay starts (listener retirement, reloads,
deliverer closing, side jobs of the scheduler, QUITs of pooled sessions, requests on
the listener-process channel) goes through one ``Background``: nothing is left for the
garbage collector to cancel half-way, an exception is never lost to "Task exception was
never retrieved", and shutting down cancels what is left and waits for it to finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any


class Background:
    """A set of background tasks owned by one component."""

    def __init__(self, owner: str, log: logging.Logger) -> None:
        self.owner = owner
        self._log = log
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str = "") -> asyncio.Task[Any]:
        """Run ``coro`` in the background; a failure is logged with its traceback."""
        task = asyncio.get_running_loop().create_task(coro, name=name or None)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._log.error("%s: background task %s failed: %r", self.owner,
                            task.get_name(), exc, exc_info=exc)

    def pending(self) -> list[asyncio.Task[Any]]:
        """The tasks still running, except the caller's own."""
        me = asyncio.current_task()
        return [t for t in self._tasks if t is not me]

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for the running tasks to end by themselves; True if they all did."""
        pending = self.pending()
        if not pending:
            return True
        _, still = await asyncio.wait(pending, timeout=timeout)
        return not still

    async def close(self) -> None:
        """Cancel every task (but the caller's own) and wait until each has ended."""
        pending = self.pending()
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
