"""The queue tools' logic: list, show, retry, hold, release, delete queued messages.

One ``QueueManager`` serves both ways the tools run: inside the relay (behind the
control socket, with the live scheduler as its hook) and from ``relay queue`` acting on
the spool files directly when no relay runs (no hook). Every result is a JSON-able dict;
``relay.cli.queue`` renders it for people, ``--json`` prints it as is.

An operator's change never races a delivery attempt: hold and delete first take the
message off the schedule, wait for an attempt in flight to end (it saves its own state),
and only then write; retry and release write, then ask the scheduler to re-read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from relay.control.select import Selection, matches
from relay.errors import ControlError, SpoolError
from relay.maillog import MailLog
from relay.spool.layout import is_queue_id, state_name
from relay.spool.records import QueuedMessage, RcptStatus
from relay.spool.store import Spool

log = logging.getLogger("relay.queue")

HEADER_LIMIT = 64 * 1024        # `show` prints at most this much of the message's header
COMMANDS = ("list", "show", "retry", "hold", "release", "delete", "select")
BATCH = ("retry", "hold", "release", "delete")


class SchedulerHook(Protocol):
    """What the queue tools need from the running scheduler (``relay.outbound.scheduler``)."""

    def reschedule(self, queue_id: str) -> None: ...
    def retry_now(self, queue_id: str) -> None: ...      # reschedule, past pauses
    def forget(self, queue_id: str) -> None: ...
    def in_flight(self, queue_id: str) -> bool: ...
    async def wait_idle(self, queue_id: str) -> None: ...
    def waiting(self, queue_id: str) -> dict[str, Any] | None: ...   # why a due one waits


def check_id(queue_id: object) -> str:
    """A well-formed queue id (upper-cased) or ControlError; never a path."""
    if isinstance(queue_id, str) and is_queue_id(queue_id.strip().upper()):
        return queue_id.strip().upper()
    raise ControlError(f"{queue_id!r} is not a queue id", code="bad_request",
                       hint="queue ids are 17 letters and digits, like 1K0RQX3XEZND829SP; "
                            "`relay queue list` shows them")


def _not_found(queue_id: str) -> ControlError:
    return ControlError(f"message {queue_id} is not in the queue", code="not_found",
                        hint="it may have been delivered, bounced or deleted meanwhile; "
                             "`relay queue list` shows what is queued")


class QueueManager:
    """Queue operations on ``spool``, coordinated with ``scheduler`` when relay runs."""

    def __init__(self, spool: Spool, scheduler: SchedulerHook | None = None, *,
                 maillog: MailLog | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._spool = spool
        self._scheduler = scheduler
        self._maillog = maillog or MailLog()
        self._clock = clock

    async def handle(self, command: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Run one command by name (the control socket's entry point)."""
        if command in ("list", "select"):
            return await self.list_messages(Selection.from_args(args))
        if command in BATCH and "ids" in args:
            ids = args["ids"]
            if not isinstance(ids, list):
                raise ControlError("ids must be a list of queue ids", code="bad_request")
            return await self.batch(command, [check_id(i) for i in ids])
        if command == "retry" and args.get("all"):
            return await self.retry(None, every=True)
        single: dict[str, Callable[[str], Awaitable[dict[str, Any]]]] = {
            "show": self.show, "retry": self.retry, "hold": self.hold,
            "release": self.release, "delete": self.delete}
        handler = single.get(command)
        if handler is None:
            raise ControlError(f"unknown queue command {command!r}", code="bad_request",
                               hint=f"commands: {', '.join(COMMANDS)}")
        return await handler(check_id(args.get("id")))

    # --- reading ---------------------------------------------------------------------------

    async def list_messages(self, selection: Selection | None = None) -> dict[str, Any]:
        """Every queued message (or those ``selection`` names), oldest first, with its
        state and recipients."""
        ids = self._spool.queue_ids()
        if selection is not None and selection.ids:
            ids = [i for i in ids if i in selection.ids]
        msgs = await asyncio.to_thread(self._load_many, ids)
        now = self._clock()
        entries = [self._entry(m, now) for m in msgs]
        if selection is not None:
            entries = [e for e in entries if matches(e, selection)]
        counts = {"active": 0, "deferred": 0, "held": 0, "waiting": 0}
        for e in entries:
            counts[e["state"]] += 1
        return {"now": now, "count": len(entries), "size": sum(e["size"] for e in entries),
                "counts": counts, "messages": entries}

    async def show(self, queue_id: str) -> dict[str, Any]:
        """One message: envelope, state, per-recipient status, and its header."""
        queue_id = check_id(queue_id)
        msg = await self._load(queue_id)
        try:
            head = await self._spool.read_message(queue_id, limit=HEADER_LIMIT)
        except KeyError:
            raise _not_found(queue_id) from None
        entry = self._entry(msg, self._clock())
        entry["envelope"] = dataclasses.asdict(msg.envelope)
        entry["envelope"]["recipients"] = list(msg.envelope.recipients)
        entry["headers"] = _header_block(head)
        return entry

    def _load_many(self, ids: list[str]) -> list[QueuedMessage]:
        found: list[QueuedMessage] = []
        for qid in ids:
            try:
                found.append(self._spool.load(qid))
            except KeyError:
                continue                    # delivered while we listed
            except SpoolError as exc:
                log.warning("queue list: %s", exc)
        return found

    async def _load(self, queue_id: str) -> QueuedMessage:
        try:
            return await asyncio.to_thread(self._spool.load, queue_id)
        except KeyError:
            raise _not_found(queue_id) from None

    def _entry(self, msg: QueuedMessage, now: float) -> dict[str, Any]:
        st = msg.state
        in_flight = self._scheduler is not None and self._scheduler.in_flight(msg.queue_id)
        waiting = None if in_flight or self._scheduler is None else \
            self._scheduler.waiting(msg.queue_id)
        state = "active" if in_flight else "waiting" if waiting else state_name(st, now)
        return {
            "id": msg.queue_id, "size": msg.size, "received_at": msg.envelope.received_at,
            "age": max(0.0, now - msg.envelope.received_at),
            "state": state, "in_flight": in_flight, "waiting": waiting,
            "held": st.held, "sender": msg.envelope.sender, "attempts": st.attempts,
            "next_attempt": st.next_attempt, "last_attempt": st.last_attempt,
            "upstream": st.upstream, "last_error": st.last_error,
            "recipients": [{"address": r.address, "status": str(r.status),
                            "attempts": r.attempts, "last_reply": r.last_reply}
                           for r in st.recipients],
        }

    # --- changing --------------------------------------------------------------------------

    async def batch(self, command: str, ids: list[str]) -> dict[str, Any]:
        """One command on several messages, in turn; what became of each id."""
        single: dict[str, Callable[[str], Awaitable[dict[str, Any]]]] = {
            "retry": self.retry, "hold": self.hold, "release": self.release,
            "delete": self.delete}
        out: dict[str, Any] = {"command": command, "done": [], "already": [], "missing": [],
                               "held": []}
        for queue_id in ids:
            try:
                result = await single[command](queue_id)
            except ControlError as exc:
                if exc.code not in ("not_found", "held"):
                    raise
                out["missing" if exc.code == "not_found" else "held"].append(queue_id)
                continue
            out["already" if result.get("already") else "done"].append(queue_id)
        return out

    async def retry(self, queue_id: str | None, *, every: bool = False) -> dict[str, Any]:
        """Make a message (or, with ``every``, each message not held) due now."""
        if every:
            retried: list[str] = []
            held = 0
            for qid in self._spool.queue_ids():
                try:
                    if await self._retry_one(qid):
                        retried.append(qid)
                except ControlError as exc:
                    if exc.code == "held":
                        held += 1
            return {"retried": retried, "skipped_held": held}
        queue_id = check_id(queue_id)
        await self._retry_one(queue_id, strict=True)
        return {"retried": [queue_id], "skipped_held": 0}

    async def _retry_one(self, queue_id: str, *, strict: bool = False) -> bool:
        await self._wait_idle(queue_id)
        try:
            msg = await self._load(queue_id)
        except ControlError:
            if strict:
                raise
            return False
        if msg.state.held:
            raise ControlError(f"message {queue_id} is held", code="held",
                               hint=f"release it first: relay queue release {queue_id}")
        if msg.state.next_attempt > 0:      # fresh messages are due already: no state write
            msg.state.next_attempt = 0.0
            await self._save(msg)
        if self._scheduler is not None:     # tried now: past a provider pause, relay's
            self._scheduler.retry_now(queue_id)   # fail-fast window (never past a quota)
        return True

    async def hold(self, queue_id: str) -> dict[str, Any]:
        """Keep a message queued but never attempted until released."""
        queue_id = check_id(queue_id)
        if self._scheduler is not None:
            self._scheduler.forget(queue_id)
        await self._wait_idle(queue_id)
        msg = await self._load(queue_id)
        already = msg.state.held
        if not already:
            msg.state.held = True
            await self._save(msg)
            self._maillog.event(queue_id, "held", by="operator")
        if self._scheduler is not None:
            self._scheduler.forget(queue_id)    # an attempt that just ended may have re-added it
        return {"held": queue_id, "already": already}

    async def release(self, queue_id: str) -> dict[str, Any]:
        """Let a held message be delivered again (at its next attempt time)."""
        queue_id = check_id(queue_id)
        msg = await self._load(queue_id)
        already = not msg.state.held
        if not already:
            msg.state.held = False
            await self._save(msg)
            self._maillog.event(queue_id, "released", by="operator")
        if self._scheduler is not None:
            self._scheduler.reschedule(queue_id)
        return {"released": queue_id, "already": already}

    async def delete(self, queue_id: str) -> dict[str, Any]:
        """Remove a message without delivering it (waits for an attempt in flight)."""
        queue_id = check_id(queue_id)
        if self._scheduler is not None:
            self._scheduler.forget(queue_id)
        waited = await self._wait_idle(queue_id)
        msg = await self._load(queue_id)
        await self._spool.remove(queue_id)
        if self._scheduler is not None:
            self._scheduler.forget(queue_id)
        pending = sum(r.status is RcptStatus.PENDING for r in msg.state.recipients)
        self._maillog.event(queue_id, "deleted", by="operator",
                            **{"from": f"<{msg.envelope.sender}>", "pending": pending})
        return {"deleted": queue_id, "waited_for_attempt": waited}

    async def _wait_idle(self, queue_id: str) -> bool:
        if self._scheduler is None or not self._scheduler.in_flight(queue_id):
            return False
        await self._scheduler.wait_idle(queue_id)
        return True

    async def _save(self, msg: QueuedMessage) -> None:
        try:
            await self._spool.save_state(msg)
        except KeyError:
            raise _not_found(msg.queue_id) from None


def _header_block(head: bytes) -> str:
    """The message header (up to the first empty line), as text."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = head.find(sep)
        if end >= 0:
            head = head[:end]
            break
    return head.decode("utf-8", "replace").replace("\r\n", "\n")
