"""The event loop under ``relay run`` and its SMTP listener processes (``[relay] event_loop``).

``"uvloop"`` (the default) runs them on uvloop, libuv's event loop for asyncio; ``"asyncio"``
on the standard library's selector loop. Everything relay does goes through asyncio's
public loop and transport API, so the choice changes cost, not behaviour: the test suite
passes on both (its relay processes run on the default, its in-process tests on asyncio's
loop). Measured side by side (``bench/smtp_bench.py --only relay --reps 1 --breakdown``,
alternated pairs on a shared 2-core VM) uvloop took less CPU per 100 KB message in seven
pairs of nine (0.07-0.68 ms less; 0.04 and 0.36 more in the other two) and about the same
per 1 KB message (thirteen pairs, either way); ``bench/proxy_bench.py`` put relay's CPU
per 50 MB FETCH over TLS at 141 ms against 197 ms. ``"asyncio"`` is the way back should
a platform lack uvloop's wheels or an incompatibility show.

Other commands (``relay queue``, ``relay test``, ...) run briefly on asyncio's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from relay.config.schema import EVENT_LOOPS

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], kind: str) -> T:
    """``asyncio.run(main)`` on the event loop ``kind`` names (one of ``EVENT_LOOPS``)."""
    if kind == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    if kind != "asyncio":
        main.close()
        raise ValueError(f"unknown event loop {kind!r}: expected one of {EVENT_LOOPS}")
    return asyncio.run(main)


def running() -> str:
    """The kind of the running event loop, as the config names it."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
