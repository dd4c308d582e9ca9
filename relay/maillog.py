"""The mail log: one grep-able line per mail event, keyed by queue id, secrets censored.

Lines read like Postfix's::

    4QbX9k2ZJ7Tq: received client=10.20.0.5[platform] user=cc1 from=<a@example.com> size=1234
    4QbX9k2ZJ7Tq: delivered to=<b@example.net> upstream=office365 delay=0.42 reply="250 2.0.0 OK"

Values that may carry client-controlled text are quoted and control characters escaped,
so one event is always exactly one line. AUTH payloads and passwords are never passed
here; ``censor`` is a last line of defence for reply texts echoing them.
"""

from __future__ import annotations

import logging
import re

_SAFE = re.compile(r"[A-Za-z0-9._@:/+\-\[\]<>,]*\Z")   # no "=": password=x is censored
_SECRET = re.compile(r"(?i)(auth\s+(?:plain|login|xoauth2)\s+)\S+|(bearer\s+)\S+|(password=)\S+")


def censor(text: str) -> str:
    """Blank out anything that looks like an AUTH payload, bearer token or password."""
    return _SECRET.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "***", text)


def _fmt(value: object) -> str:
    text = str(value)
    if _SAFE.match(text):
        return text
    text = censor(text).replace("\\", "\\\\").replace('"', '\\"')
    if not text.isprintable():             # (most are: one C pass, not one per character)
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return f'"{text}"'


class MailLog:
    """Writes mail events to the ``relay.mail`` logger (or one given)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("relay.mail")

    def event(self, queue_id: str, verb: str, **fields: object) -> None:
        parts = [f"{queue_id or 'NOQUEUE'}: {verb}"]
        parts += [f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None and v != ""]
        self._log.info(" ".join(parts))

    def received(self, queue_id: str, **fields: object) -> None:
        self.event(queue_id, "received", **fields)

    def queued(self, queue_id: str, **fields: object) -> None:
        self.event(queue_id, "queued", **fields)

    def deferred(self, queue_id: str, **fields: object) -> None:
        self.event(queue_id, "deferred", **fields)

    def delivered(self, queue_id: str, **fields: object) -> None:
        self.event(queue_id, "delivered", **fields)

    def bounced(self, queue_id: str, **fields: object) -> None:
        self.event(queue_id, "bounced", **fields)

    def rejected(self, **fields: object) -> None:
        self.event("", "rejected", **fields)

    def removed(self, queue_id: str, **fields: object) -> None:
        self.event(queue_id, "removed", **fields)
