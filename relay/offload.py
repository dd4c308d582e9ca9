"""Work beside the event loop: one thread for CPU work that releases the GIL (DKIM's
RSA), a small pool of threads for blocking file I/O (the spool's writes and syncs).

``asyncio.to_thread`` and ``run_in_executor`` hand each call to the loop's
``ThreadPoolExecutor``: a ``concurrent.futures.Future`` chained to an asyncio one, a
condition variable per result, and a write to the loop's self-pipe for every result.
Signing every message that way cost relay about 0.2 ms of CPU per message beyond the
signature itself (bench/smtp_bench.py --breakdown). Both kinds here take a call as one
tuple on a queue and hand results back in batches: a single wakeup of the loop for all
the results that finished while it was busy.

- ``Worker``: one thread per process that takes calls in order and is woken only when
  it sleeps. The signature's RSA step releases the GIL, so the thread still runs beside
  the event loop on another core. Use it for short CPU work, never for blocking I/O.
- ``Pool``: a fixed number of threads taking calls from one queue, for blocking calls
  that must overlap (each spool write waits for the disk). Measured with 10 coroutines
  each awaiting a small file write in turn (1,000 bytes, /dev/shm, 6 threads): 177-181
  us of CPU per call through the loop's executor, 96-126 us through a ``Pool``.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
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


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class Pool:
    """``threads`` daemon threads, started on first use, running blocking calls side by
    side; the results that finish while the loop is busy reach it in one wakeup."""

    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self.threads = threads
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: dict[asyncio.AbstractEventLoop, list[_Done]] = {}
        self._started = False

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """A future for ``fn(*args)`` on one of the pool's threads. A caller cancelled
        while it waits does not stop the call; nobody is told its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if not self._started:
            self._start()
        self._jobs.put((loop, fut, fn, args))
        return fut

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            for i in range(self.threads):
                threading.Thread(target=self._main, name=f"{self.name}-{i}",
                                 daemon=True).start()
            self._started = True

    def _main(self) -> None:
        while True:
            self._one(*self._jobs.get())     # (its locals, a result among them, die here)

    def _one(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any],
             fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            outcome: _Done = (fut, fn(*args), None)
        except Exception as exc:             # handed to the caller
            outcome = (fut, None, exc)
        with self._lock:
            batch = self._done.setdefault(loop, [])
            batch.append(outcome)
            first = len(batch) == 1
        if first:                            # later ones ride on this wakeup
            try:
                loop.call_soon_threadsafe(self._settle, loop)
            except RuntimeError:             # that loop closed: nobody waits
                with self._lock:
                    self._done.pop(loop, None)

    def _settle(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            outcomes = self._done.pop(loop, [])
        _settle(outcomes)
