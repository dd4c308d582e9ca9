"""The envelope: what the listener knew when it accepted a message (a leaf: no stage inside).

Receiving fills it in, the spool stores it, checks, DKIM, routing and sending read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.pickling import pickled_by_fields


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Envelope:
    """What the listener knew when it accepted the message. Immutable once spooled."""

    sender: str                      # "" for the null reverse-path (bounces)
    recipients: tuple[str, ...]
    received_at: float               # unix time of the 250
    client_ip: str = ""
    client_helo: str = ""
    listener: str = ""
    auth_user: str = ""              # authenticated user on the listener, "" if none
    smtputf8: bool = False
    body_8bitmime: bool = False
    dsn_of: str = ""                 # queue id of the message this DSN reports on, if a DSN
    trusted: bool = False            # authenticated or allow-listed: may be DKIM-signed
