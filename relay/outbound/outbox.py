"""The ``outbox`` upstream kind: each delivered message becomes one ``.eml`` file in a folder.

File format (what a newcomer opening the file sees): the message exactly as relay
would have sent it upstream, preceded by the header lines a local delivery agent adds
(as Postfix's ``local`` does), so any mail client opens it and the envelope is visible::

    Return-Path: <sender@example.com>
    X-Original-To: rcpt1@example.net
    X-Original-To: rcpt2@example.net
    <the message bytes, unchanged>

Names are ``<queue id>.eml`` when the file carries every recipient of the message, else
``<queue id>-<hash of recipients>.eml``; a retry rewrites the same file, so a crash
between writing and recording the delivery never produces a second file. Writes are
atomic: ``.tmp-*`` file, fsync, rename, fsync of the folder (off the event loop).
``OutboxCourier`` is this kind's courier (``relay.outbound.courier``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from relay.config.schema import UpstreamConfig
from relay.errors import DeliveryError
from relay.outbound.courier import RcptResult, transient
from relay.outbound.session import Credentials
from relay.spool.records import QueuedMessage
from relay.timing import StageTimer

log = logging.getLogger("relay.delivery")


def outbox_name(queue_id: str, recipients: list[str], all_recipients: tuple[str, ...]) -> str:
    """The file name for this delivery (deterministic, so retries overwrite)."""
    if sorted(recipients) == sorted(all_recipients):
        return f"{queue_id}.eml"
    digest = hashlib.sha256("\n".join(sorted(recipients)).encode()).hexdigest()[:10]
    return f"{queue_id}-{digest}.eml"


def envelope_headers(sender: str, recipients: list[str]) -> bytes:
    """``Return-Path`` and one ``X-Original-To`` per recipient, CRLF-terminated."""
    lines = [f"Return-Path: <{sender}>"] + [f"X-Original-To: {r}" for r in recipients]
    for line in lines:
        if any(c in line for c in "\r\n\x00"):
            raise ValueError("envelope address contains a line break or NUL")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _write(folder: Path, name: str, payload: bytes, fsync: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    tmp = folder / f".tmp-{name}-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return final


async def write_outbox(folder: Path, *, queue_id: str, sender: str, recipients: list[str],
                       all_recipients: tuple[str, ...], data: bytes,
                       fsync: bool = True) -> Path:
    """Write the message to ``folder`` atomically; returns the file's path.

    Raises a transient ``DeliveryError`` (reason ``outbox_write``) on any I/O error.
    """
    name = outbox_name(queue_id, recipients, all_recipients)
    try:
        payload = envelope_headers(sender, recipients) + data
        return await asyncio.to_thread(_write, folder, name, payload, fsync)
    except (OSError, ValueError) as exc:
        raise DeliveryError(f"cannot write {folder / name}: {exc}", permanent=False,
                            reason="outbox_write",
                            hint="check that the outbox folder exists, is writable by relay "
                                 "and the disk is not full") from exc


class OutboxCourier:
    """Delivers to an ``outbox`` upstream: one ``.eml`` file per delivery."""

    def __init__(self, upstream: UpstreamConfig, *, fsync: bool = True) -> None:
        self.upstream = upstream
        self._fsync = fsync

    async def close(self) -> None:
        return None

    async def carry(self, msg: QueuedMessage, data: bytes, recipients: list[str], *,
                    credentials: Credentials, timer: StageTimer,
                    handed: Callable[[], None]) -> dict[str, RcptResult]:
        folder = self.upstream.path
        if folder is None:
            return {r: transient("outbox upstream has no path", "outbox_write")
                    for r in recipients}
        handed()              # the file may be in the outbox from here on
        try:
            path = await write_outbox(folder, queue_id=msg.queue_id,
                                      sender=msg.envelope.sender, recipients=recipients,
                                      all_recipients=msg.envelope.recipients, data=data,
                                      fsync=self._fsync)
        except DeliveryError as exc:
            log.error("%s: %s (hint: %s)", msg.queue_id, exc, exc.hint)
            return {r: transient(str(exc), exc.reason) for r in recipients}
        return dict.fromkeys(recipients, RcptResult(250, f"250 2.0.0 Ok: written to {path}",
                                                    False))
