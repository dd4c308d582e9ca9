"""SMTP replies the listener sends, and ``Refusal``: a check's verdict carrying its reply.

Every reply after the greeting carries an RFC 3463 enhanced status code (the listener
advertises ENHANCEDSTATUSCODES). ``Refusal`` is what checks (relay policy, SPF, provider
profiles, DKIM) raise to refuse a sender, a recipient or a message with a full reply::

    raise Refusal(550, "5.7.23", "SPF validation failed", reason="spf")
    raise Refusal(552, "5.3.4", "Subject is 512 characters; genesys-agentless allows 400",
                  reason="profile")

``reason`` is the bounded label counted in ``relay_messages_refused{reason=...}``.
"""

from __future__ import annotations

import re

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
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
           "too_big", "too_many_rcpts", "too_many_connections", "policy", "spool_full",
           "spool_error", "error")


class Refusal(Exception):
    """Refuse the current command or message with this SMTP reply (nothing is queued)."""

    def __init__(self, code: int, enhanced: str, text: str, *, reason: str = "policy") -> None:
        if not 400 <= code <= 599:
            raise ValueError(f"a refusal needs a 4xx or 5xx code, not {code}")
        if not _ENHANCED.match(enhanced) or enhanced[0] != str(code)[0]:
            raise ValueError(f"enhanced code {enhanced!r} does not match reply code {code}")
        if "\r" in text or "\n" in text:
            raise ValueError("reply text must be one line")
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.reason = reason

    @classmethod
    def from_reply(cls, reply: str, reason: str) -> Refusal:
        """``Refusal.from_reply("550 5.7.1 Relaying denied", "relay_denied")``."""
        code, enhanced, text = reply.split(" ", 2)
        return cls(int(code), enhanced, text, reason=reason)

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def permanent(self) -> bool:
        return self.code >= 500


def with_enhanced(status: str) -> str:
    """Add the default enhanced code to a reply line that lacks one (aiosmtpd's own)."""
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
SHUTTING_DOWN = "421 4.3.2 Service shutting down; try again later"
NEED_EHLO = "503 5.5.1 Error: send HELO/EHLO first"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"


def timeout_reply(hostname: str) -> str:
    return f"421 4.4.2 {hostname} Error: timeout exceeded"


def queued(queue_id: str) -> str:
    return f"250 2.0.0 Ok: queued as {queue_id}"
