"""One worker thread for per-message CPU work that releases the GIL (DKIM's RSA).

``asyncio.to_thread`` hands each call to the loop's pool: up to six threads take turns
at the GIL with the event loop, and every result wakes the loop on its own. Signing
every message that way cost relay about 0.2 ms of CPU per message beyond the signature
itself (bench/smtp_bench.py --breakdown). A ``Worker`` is one thread per process that
takes calls in order, is woken only when it sleeps, and hands back each batch of
results with a single wakeup of the loop. The signature's RSA step releases the GIL, so
the thread still runs beside the event loop on another core.

Calls run one at a time, in order: use it for short CPU work, never for blocking I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_BATCH = 16                 # results handed back per wakeup of the loop, at most

_Item = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]
_Done = tuple["asyncio.Future[Any]", Any, Exception | None]


class Worker:
    """A lazily started daemon thread running submitted calls in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: deque[_Item] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._sleeping = False
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the worker thread; its result or exception, here."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._queue.append((loop, fut, fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self.name,
                                                daemon=True)
                self._thread.start()
            elif self._sleeping:
                self._wake.notify()
        return await fut

    def _main(self) -> None:
        done: dict[asyncio.AbstractEventLoop, list[_Done]] = {}
        while True:
            with self._lock:
                while not self._queue:
                    self._sleeping = True
                    self._wake.wait()
                self._sleeping = False
                loop, fut, fn = self._queue.popleft()
            try:
                outcome: _Done = (fut, fn(), None)
            except Exception as exc:         # handed to the caller
                outcome = (fut, None, exc)
            done.setdefault(loop, []).append(outcome)
            if self._queue and len(done[loop]) < _BATCH:
                continue                     # more to do: hand these back with the next
            for each, outcomes in done.items():
                with contextlib.suppress(RuntimeError):   # that loop closed: nobody waits
                    each.call_soon_threadsafe(_settle, outcomes)
            done = {}


def _settle(outcomes: list[_Done]) -> None:
    for fut, result, exc in outcomes:
        if fut.done():                       # the caller was cancelled
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
