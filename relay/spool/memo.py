"""In-memory helpers of the spool: the fresh-bytes cache and per-message async locks."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator

FRESH_CACHE_BYTES = 64 * 1024 * 1024


class FreshCache:
    """Bytes of freshly stored messages, for their first delivery attempt (bounded, FIFO).

    The disk copy stays the truth: a message evicted here is simply read back.
    """

    def __init__(self, limit: int = FRESH_CACHE_BYTES) -> None:
        self._limit = limit
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def put(self, queue_id: str, data: bytes) -> None:
        if len(data) > self._limit // 4:
            return
        self._data[queue_id] = data
        self._bytes += len(data)
        while self._bytes > self._limit:
            _, old = self._data.popitem(last=False)
            self._bytes -= len(old)

    def pop(self, queue_id: str) -> bytes | None:
        data = self._data.pop(queue_id, None)
        if data is not None:
            self._bytes -= len(data)
        return data


class KeyedLocks:
    """One asyncio.Lock per key while anyone uses it (serialises work on one message)."""

    def __init__(self) -> None:
        self._busy: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._busy.get(key) or (asyncio.Lock(), 0)
        self._busy[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._busy[key]
            if users == 1:
                del self._busy[key]
            else:
                self._busy[key] = (lock, users - 1)
