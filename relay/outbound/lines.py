"""A line per mailbox: arrival order, waiting made visible, fair turns at the connections.

A message that is due joins the line of the mailbox that sends it (upstream and mailbox:
``Deliverer.mailbox``). Each line is served by one small task, in priority then arrival
order: the head waits while the provider paused the mailbox or upstream, while relay's
own fail-fast window after a connection failure runs, while the mailbox has as many
attempts in flight as it may (``connections_per_mailbox``), for a connection to the
upstream, and for its quota; then it leaves and the next one becomes the head. Waiting
is never an attempt. Connections to an upstream are handed out in turn to the lines
that wait for one (``Slots``), so a campaign's long line gets one turn like any other
mailbox's short one.

What a line waits for is a ``Wait`` with the operator's wording, shown by ``relay queue
list``, counted in ``relay_messages_waiting{upstream,reason}``, and logged at info level
once when a mailbox starts waiting and once when it stops.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from relay.metrics import WAIT_REASONS, Metrics
from relay.outbound.pacing import Ticket

log = logging.getLogger("relay.pacing")

LineKey = tuple[str, str]        # (upstream, mailbox)


@dataclass(frozen=True, slots=True)
class Wait:
    """What a line's head waits for: ``reason`` (a metrics label), until when, and why."""

    reason: str                  # quota | paused | suspended | connections
    until: float                 # wall clock; 0: until something ends (a connection)
    text: str                    # "waiting for quota: 10/min of ... for X, next at 14:03:10"

    @property
    def seconds(self) -> float:
        return max(0.0, self.until - time.time()) if self.until else 0.0


def at(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


class Slots:
    """Connections to each upstream, handed out in turn to the lines waiting for one."""

    def __init__(self) -> None:
        self.busy: collections.Counter[str] = collections.Counter()
        self._waiting: dict[str, collections.deque[Line]] = {}

    def take(self, upstream: str, cap: int, line: Line) -> bool:
        """A connection for ``line`` now (its turn came, or one is free and nobody waits);
        else ``line`` queues for one and is woken with it when its turn comes."""
        if line.granted[upstream] > 0:
            line.granted[upstream] -= 1
            return True
        queue = self._waiting.get(upstream)
        if self.busy[upstream] < cap and not queue:
            self.busy[upstream] += 1
            return True
        queue = self._waiting.setdefault(upstream, collections.deque())
        if line not in queue:
            queue.append(line)
        return False

    def give_back(self, upstream: str) -> None:
        """An attempt ended (or a line did not use its turn): the next waiting line's turn."""
        queue = self._waiting.get(upstream)
        while queue:
            line = queue.popleft()
            if line.closed:
                continue
            line.granted[upstream] += 1        # the connection passes on, still busy
            line.wake.set()
            return
        self.busy[upstream] -= 1
        if self.busy[upstream] <= 0:
            del self.busy[upstream]

    def leave(self, line: Line) -> None:
        """``line`` stops waiting (empty, closed): return what it was handed."""
        for upstream, queue in list(self._waiting.items()):
            with contextlib.suppress(ValueError):
                queue.remove(line)
            if not queue:
                del self._waiting[upstream]
        for upstream, n in list(line.granted.items()):
            for _ in range(n):
                self.give_back(upstream)
        line.granted.clear()


@dataclass(eq=False)
class Line:
    """One mailbox's queued mail in sending order, and what its head waits for."""

    upstream: str
    mailbox: str
    heap: list[tuple[int, str, str]] = field(default_factory=list)   # (-prio, id, id)
    members: dict[str, float] = field(default_factory=dict)          # id -> joined (wall)
    inflight: int = 0
    wait: Wait | None = None
    waiting_since: float = 0.0          # when "waits" was logged (0: not waiting)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    granted: collections.Counter[str] = field(default_factory=collections.Counter)
    task: asyncio.Task[None] | None = None
    closed: bool = False
    _ranks: dict[str, int] = field(default_factory=dict)    # position cache (queue tools)
    _ranked: int = -1                                       # ... valid for this version
    version: int = 0                                        # bumped when members change

    def head(self) -> str | None:
        while self.heap and self.heap[0][2] not in self.members:
            heapq.heappop(self.heap)
        return self.heap[0][2] if self.heap else None

    def position(self, qid: str) -> int:
        """How many messages are ahead of ``qid`` in this line (listing a long line asks
        for every position: computed once per change of the line)."""
        if self._ranked != self.version:
            ahead = sorted(e for e in self.heap if e[2] in self.members)
            self._ranks = {e[2]: i for i, e in enumerate(ahead)}
            self._ranked = self.version
        return self._ranks.get(qid, 0)

    async def sleep(self, seconds: float | None) -> None:
        """Until woken (a change in the line, a connection handed over) or ``seconds``."""
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.wake.wait()


class Gate(Protocol):
    """What a line needs of the scheduler to let its head go (``serve_line``)."""

    async def admit(self, line: Line, qid: str) -> Wait | None:
        """Start an attempt for ``qid`` (None), or say what it must wait for."""
        ...


class LineBook:
    """Every mailbox's line, the tasks serving them, their waits for tools and metrics."""

    def __init__(self, gate: Gate, *, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._gate = gate
        self._metrics = metrics
        self._clock = clock
        self.lines: dict[LineKey, Line] = {}
        self._where: dict[str, Line] = {}           # queue id -> its line
        self._seq = itertools.count()
        self.slots = Slots()
        self.tickets: dict[str, Ticket] = {}       # queue id -> its quota reservation

    def join(self, key: LineKey, qid: str, priority: int = 0) -> None:
        """``qid`` is due: it takes its place in its mailbox's line."""
        old = self._where.get(qid)
        if old is not None and (old.upstream, old.mailbox) != key:
            self.leave(qid)
        line = self.lines.get(key)
        if line is None:
            line = self.lines[key] = Line(*key)
        line.closed = False
        if qid not in line.members:
            line.members[qid] = self._clock()
            line.version += 1
            heapq.heappush(line.heap, (-priority, qid, qid))
        self._where[qid] = line
        line.wake.set()
        if line.task is None or line.task.done():
            line.task = asyncio.get_running_loop().create_task(
                self._serve(line), name=f"line {key[0]}/{key[1]}")

    def leave(self, qid: str) -> float | None:
        """``qid`` leaves its line (sent, held, deleted); when it had joined (wall)."""
        line = self._where.pop(qid, None)
        if line is None:
            return None
        joined = line.members.pop(qid, None)
        line.version += 1
        line.wake.set()
        return joined

    def line_of(self, qid: str) -> Line | None:
        return self._where.get(qid)

    def waiting(self, qid: str) -> Wait | None:
        """What ``qid`` waits for, as the operator reads it (None: not waiting)."""
        line = self._where.get(qid)
        if line is None or line.wait is None or qid not in line.members:
            return None
        ahead = line.position(qid)
        if not ahead:
            return line.wait
        text = f"{line.wait.text}; {ahead} ahead of it in {line.mailbox}'s line"
        return Wait(line.wait.reason, line.wait.until, text)

    def wake(self, upstream: str | None = None, mailbox: str | None = None) -> None:
        """Let lines look again (a reload, a pause cleared, an attempt ended)."""
        for (up, mbx), line in self.lines.items():
            if (upstream is None or up == upstream) and (mailbox is None or mbx == mailbox):
                line.wake.set()

    async def _serve(self, line: Line) -> None:
        try:
            while (qid := line.head()) is not None:
                wait = await self._gate.admit(line, qid)
                if wait is None:
                    if line.wait is not None and line.wait.reason == "connections":
                        line.wait = None            # a brief wait, never logged
                    continue
                self._waits(line, wait)
                await line.sleep(wait.seconds if wait.until else None)
            self._waits(line, None)                 # the line is empty
        finally:
            line.wait = None                        # (stopping: nothing to log)
            self.slots.leave(line)
            self._tidy(line)

    def ended(self, line: Line) -> None:
        """An attempt of ``line`` ended: it may start another (connections per mailbox)."""
        line.inflight -= 1
        line.wake.set()
        self._tidy(line)

    def _tidy(self, line: Line) -> None:
        key = (line.upstream, line.mailbox)
        if (not line.members and line.inflight <= 0 and (line.task is None or line.task.done()
                                                          or line.task is asyncio.current_task())
                and self.lines.get(key) is line):
            del self.lines[key]
            line.closed = True

    def _waits(self, line: Line, wait: Wait | None) -> None:
        """Record what the line waits for; one info line when it starts and when it stops
        (waits for a connection are too brief to log)."""
        line.wait = wait
        if wait is not None and wait.reason != "connections" and not line.waiting_since:
            line.waiting_since = self._clock()
            log.info("%s: %s waits: %s (%d message%s in its line)", line.upstream,
                     line.mailbox, wait.text, len(line.members),
                     "" if len(line.members) == 1 else "s")
        elif wait is None and line.waiting_since:
            log.info("%s: %s no longer waits, after %.0f s (%s)", line.upstream, line.mailbox,
                     self._clock() - line.waiting_since,
                     f"{len(line.members)} in its line" if line.members else "line empty")
            line.waiting_since = 0.0

    def update_metrics(self, upstreams: list[str]) -> None:
        """relay_messages_waiting{upstream,reason} from the lines (before a scrape)."""
        if self._metrics is None:
            return
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for line in self.lines.values():
            if line.wait is not None:
                counts[(line.upstream, line.wait.reason)] += len(line.members)
        for up in {*upstreams, *(u for u, _ in counts)}:
            for reason in WAIT_REASONS:
                self._metrics.messages_waiting.labels(up, reason).set(counts[(up, reason)])

    async def close(self) -> None:
        tasks = [line.task for line in self.lines.values() if line.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
