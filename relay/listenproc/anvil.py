"""Exact per-client limits when several SMTP listener processes serve one listener.

Each listener process accepts from the same listening socket, so a client's connections
land on any of them. Counted in each process alone, ``max_connections``,
``max_connections_per_client``, the reserve and ``max_connection_rate_per_client`` would
multiply by the number of processes, and so would the AUTH failure limit per client
network. As Postfix's smtpd processes ask its ``anvil`` service, a listener process asks
the main process instead, which keeps the one count:

- ``RemoteCounter`` (in a listener process) sends ``admit`` with a connection number of
  its own, the listener's name, the client's address and the limits in force; the
  session waits for the answer before its greeting (the number is unique in the process,
  whichever listener asks). ``release`` (a notice) gives the slot back when the
  connection ends, also for a connection that ended while its admission was still on the
  way (the main process handles the two in order).
- ``Anvil`` (in the main process) holds a ``ConnectionCounter`` per listener and which
  slots each process holds, so a process that dies gives all of its slots back.
- ``NetworkFailures`` (in the main process) counts each listener's failed logins per
  client network, reported by every process, and says when a network is locked out so
  that every process refuses it.

With ``smtp_processes = 1`` (or 0) nothing here is used: the one process counts alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import Callable
from typing import Any, Protocol

from relay.config.schema import ListenerConfig
from relay.connlimits import (
    RESERVED,
    TOO_MANY,
    TOO_MANY_FROM_CLIENT,
    UNAVAILABLE,
    ConnectionCounter,
    Limits,
)
from relay.metrics import Metrics
from relay.smtp.listener import client_network
from relay.throttle import FailureThrottle

log = logging.getLogger("relay.listenproc")

ADMIT_TIMEOUT = 10.0
# One numbering for every listener of a process: the main process keys a slot by (process,
# number), so two listeners (ports 25 and 587, or a listener rebuilt by a reload while its
# old sessions drain) numbering from 1 each would give back each other's slots and leak.
_SLOTS = itertools.count(1)


class Request(Protocol):
    """``Rpc.request``: a request answered through a bare future."""

    def __call__(self, kind: str, payload: object, *, timeout: float
                 ) -> asyncio.Future[Any]: ...


class RemoteCounter:
    """A listener process's view of one listener's connection counts (main keeps them)."""

    def __init__(self, listener: str, *, request: Request,
                 notify: Callable[[str, object], None]) -> None:
        self.listener = listener
        self._request = request
        self._notify = notify

    def ask(self, addr: str, limits: Limits) -> tuple[int, asyncio.Future[str | None]]:
        """Ask for a slot: (the slot to ``release`` in any case, the refusal or None).
        Futures and callbacks only: one admission per connection, no task."""
        slot = next(_SLOTS)
        answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        asked = self._request("admit", (slot, self.listener, addr, limits),
                              timeout=ADMIT_TIMEOUT)

        def settle(done: asyncio.Future[object]) -> None:
            if answer.done():                  # the session is gone (cancelled)
                return
            exc = None if done.cancelled() else done.exception()
            if done.cancelled() or exc is not None:
                log.warning("listener %s: no admission from the main relay process (%s); "
                            "refusing %s with 421\n  hint: the main process is stopping, "
                            "gone or too busy to answer within %.0f s; see its log lines "
                            "and `relay status`", self.listener,
                            "cancelled" if exc is None else str(exc) or type(exc).__name__,
                            addr, ADMIT_TIMEOUT)
                answer.set_result(UNAVAILABLE)
                return
            refused = done.result()
            answer.set_result(None if refused is None else str(refused))
        asked.add_done_callback(settle)
        return slot, answer

    def release(self, slot: int) -> None:
        """Give ``slot`` back (whether it was admitted or not)."""
        with contextlib.suppress(ConnectionError):   # main is gone: its counts too
            self._notify("release", slot)


class Anvil:
    """The main process's connection counts for listeners served by several processes."""

    def __init__(self) -> None:
        self._counters: dict[str, ConnectionCounter] = {}
        self._held: dict[tuple[int, int], tuple[str, str]] = {}    # (pid, slot) → counted

    def admit(self, pid: int, payload: tuple[int, str, str, Limits]) -> str | None:
        slot, listener, addr, limits = payload
        counter = self._counters.get(listener)
        if counter is None:
            counter = self._counters[listener] = ConnectionCounter()
        refused, key = counter.admit(addr, limits)
        if refused is None:
            self._held[(pid, slot)] = (listener, key)
        return refused

    def release(self, pid: int, slot: int) -> None:
        held = self._held.pop((pid, slot), None)
        if held is not None:
            self._counters[held[0]].release(held[1])

    def forget(self, pid: int) -> int:
        """Give back every slot process ``pid`` held (it exited); how many there were."""
        mine = [k for k in self._held if k[0] == pid]
        for k in mine:
            self.release(*k)
        return len(mine)

    def holding(self, listener: str) -> int:
        """Connections of ``listener`` open in all processes."""
        counter = self._counters.get(listener)
        return 0 if counter is None else counter.total


# A refusal for a count (not the rate) is held this long, once, for releases on the way:
# a client that closed without QUIT and reconnected at once, to another process, may be
# counted before that process has even read its EOF.
LATE_GRACE = 0.2
MAX_LATE = 64                      # refusals held at once; beyond, they are not held
_COUNTS = frozenset({TOO_MANY, TOO_MANY_FROM_CLIENT, RESERVED})

_Waiting = tuple[int, tuple[int, str, str, Limits], "asyncio.Future[str | None]"]


class Admissions:
    """The main process's answers to ``admit`` and ``release`` from listener processes.

    An admission is answered at once; a refusal waits for the end of the loop's turn and
    what the processes have written meanwhile (a slot given back before its client read
    the 221, and reconnected, must count, though the release came over another process's
    channel), then, for a count, up to ``LATE_GRACE`` more for releases still on the way.
    """

    def __init__(self, anvil: Anvil, *, read_pending: Callable[[], None],
                 live: Callable[[], set[int]]) -> None:
        self.anvil = anvil
        self._read_pending = read_pending
        self._live = live
        self._waiting: list[_Waiting] = []       # until the end of this turn
        self._late: list[_Waiting] = []          # until LATE_GRACE has passed

    def admit(self, pid: int, payload: tuple[int, str, str, Limits]
              ) -> str | asyncio.Future[str | None] | None:
        refused = self.anvil.admit(pid, payload)
        if refused is None:
            return None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str | None] = loop.create_future()
        self._waiting.append((pid, payload, fut))
        if len(self._waiting) == 1:
            loop.call_soon(self._settle)
        return fut

    def release(self, pid: int, slot: int) -> None:
        for asker, payload, fut in (*self._waiting, *self._late):
            if asker == pid and payload[0] == slot and not fut.done():
                fut.set_result(UNAVAILABLE)      # gone while its admission waited
        self.anvil.release(pid, slot)

    def _settle(self) -> None:
        self._read_pending()           # releases read here still find what they cancel
        waiting, self._waiting = self._waiting, []
        self._decide(waiting, hold=True)

    def _settle_late(self) -> None:
        self._read_pending()
        late, self._late = self._late, []
        self._decide(late, hold=False)

    def _decide(self, asked: list[_Waiting], *, hold: bool) -> None:
        """Answer each admission still wanted; ``hold`` a count refusal for LATE_GRACE."""
        live = self._live()
        for pid, payload, fut in asked:
            if fut.done():                       # the connection ended meanwhile
                continue
            refused = self.anvil.admit(pid, payload) if pid in live else UNAVAILABLE
            if hold and refused in _COUNTS and len(self._late) < MAX_LATE:
                self._late.append((pid, payload, fut))
                if len(self._late) == 1:
                    asyncio.get_running_loop().call_later(LATE_GRACE, self._settle_late)
            else:
                fut.set_result(refused)


class NetworkFailures:
    """Failed SMTP logins per listener and client network, from every listener process."""

    def __init__(self, *, metrics: Metrics | None,
                 on_lock: Callable[[str, str, float], None]) -> None:
        self._metrics = metrics
        self._on_lock = on_lock
        self._throttles: dict[str, FailureThrottle] = {}

    def configure(self, listeners: list[ListenerConfig]) -> None:
        """The SMTP listeners of the config in force (a reload keeps what was counted for
        a listener it keeps, and forgets a removed one's: its name may come back later
        for another port or other clients)."""
        names = {cfg.name for cfg in listeners}
        for gone in [name for name in self._throttles if name not in names]:
            del self._throttles[gone]
        for cfg in listeners:
            throttle = self._throttles.get(cfg.name)
            if throttle is None:
                self._throttles[cfg.name] = FailureThrottle(
                    limit=cfg.auth_fail_limit, window=cfg.auth_fail_window,
                    key=client_network(cfg), metrics=self._metrics,
                    on_lock=functools.partial(self._on_lock, cfg.name))
            else:
                throttle.configure(limit=cfg.auth_fail_limit, window=cfg.auth_fail_window,
                                   key=client_network(cfg))

    def failed(self, payload: tuple[str, str, str, str]) -> None:
        """A process saw a failed login from ``addr`` on ``listener``; a lockout that is in
        force (now or already) is told to every process."""
        addr, client, listener, protocol = payload
        throttle = self._throttles.get(listener)
        if throttle is None:
            return
        _, locked = throttle.failed_elsewhere(addr, client, listener, protocol)
        left = throttle.remaining(addr)
        if left and not locked:                # locked before this process knew it
            self._on_lock(listener, addr, left)
