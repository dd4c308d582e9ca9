"""The SMTP listener's replies, each with an RFC 3463 enhanced status code.

The listener advertises ENHANCEDSTATUSCODES, so every reply after the greeting carries
one; a reply written without one gets the default code for its number (``with_enhanced``).
Checks do not reply: they raise ``relay.verdict.Refusal``, which the listener sends.
"""

from __future__ import annotations

import re

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")

# Replies without an enhanced code get one from this table (first three digits of the
# reply → enhanced code), as RFC 2034 requires once ENHANCEDSTATUSCODES is advertised.
_DEFAULT_ENHANCED = {
    "211": "2.0.0", "214": "2.0.0", "221": "2.0.0", "235": "2.7.0", "250": "2.0.0",
    "251": "2.1.5", "252": "2.5.0",
    "421": "4.3.0", "450": "4.2.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "535": "5.7.8", "538": "5.7.11", "550": "5.0.0", "551": "5.1.6",
    "552": "5.3.4", "553": "5.1.3", "554": "5.0.0", "555": "5.5.4",
}


# The refusal reasons the listener itself uses (checks add their own, e.g. "spf",
# "profile"); each is declared at 0 at start so alerts on rate() see the first one.
REASONS = ("relay_denied", "auth_required", "auth_blocked", "bad_address", "smuggling",
           "too_big", "too_many_rcpts", "too_many_connections", "unavailable", "policy",
           "spool_full", "spool_error", "error", "structure", "ownership", "profile", "dkim")


def with_enhanced(status: str) -> str:
    """Add the default enhanced code to a reply line that lacks one."""
    if len(status) < 3 or _HAS_ENHANCED.match(status):
        return status
    code = status[:3]
    enhanced = _DEFAULT_ENHANCED.get(code)
    if enhanced is None:
        return status
    sep = status[3:4] or " "
    rest = status[4:]
    return f"{code}{sep}{enhanced} {rest}".rstrip()


# The listener's fixed replies, in one place so tests and operators can grep them.
OK = "250 2.0.0 Ok"
SENDER_OK = "250 2.1.0 Ok"
RCPT_OK = "250 2.1.5 Ok"
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_ENCRYPTION = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
AUTH_BLOCKED = "454 4.7.0 Too many failed authentications; try again later"
AUTH_CLOSING = "421 4.7.0 Too many failed authentications; closing connection"
RELAY_DENIED = "550 5.7.1 Relaying denied"
TOO_MANY_RCPTS = "452 4.5.3 Error: too many recipients"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
BARE_LINE_ENDING = ("550 5.5.2 Error: bare <CR> or <LF> in message data; "
                    "lines must end with <CR><LF>")
DISK_FULL = "452 4.3.1 Insufficient system storage"
LOCAL_ERROR = "451 4.3.0 Error: local error in processing; try again later"
TOO_MANY_CONNECTIONS = "421 4.7.0 Error: too many connections; try again later"
TOO_MANY_FROM_CLIENT = "421 4.7.0 Error: too many connections from your address"
RESERVED_FOR_OTHERS = ("421 4.7.0 Error: too many connections from your network while "
                       "the server is busy; try again later")
TOO_FAST = "421 4.7.0 Error: too many connections from your network; slow down"
TOO_MUCH_JUNK = ("421 4.7.0 Error: too many NOOP, RSET, VRFY or unknown commands; "
                 "closing connection")
NOT_SMTP = "221 2.7.0 Error: this is an SMTP server; closing connection"
SHUTTING_DOWN = "421 4.3.2 Service shutting down; try again later"
NOT_AVAILABLE = "421 4.3.2 Service not available; try again later"
NEED_EHLO = "503 5.5.1 Error: send HELO/EHLO first"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"


def timeout_reply(hostname: str) -> str:
    return f"421 4.4.2 {hostname} Error: timeout exceeded"


def data_deadline_reply(hostname: str) -> str:
    return f"421 4.4.2 {hostname} Error: message data arrived too slowly; closing connection"


def too_big(size: int, by: str) -> str:
    """TOO_BIG naming the limit that applied: ``...: exchange-online allows 35 MB``."""
    shown = f"{size:,} bytes"
    for unit, scale in (("MB", 1024 * 1024), ("KB", 1024)):
        if size >= scale and size % scale == 0:
            shown = f"{size // scale} {unit}"
            break
    return f"{TOO_BIG}: {by} allows {shown}"


def queued(queue_id: str) -> str:
    return f"250 2.0.0 Ok: queued as {queue_id}"
