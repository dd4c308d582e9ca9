"""The exception tree: every relay error, each carrying a hint for the operator."""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error relay raises on purpose.

    ``hint`` tells the operator what to do about it; it is printed after the message.
    """

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    def explain(self) -> str:
        """The message, and the hint on its own line when there is one."""
        text = str(self)
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class ConfigError(RelayError):
    """A mistake in the config: ``FILE:LINE: key.path: what is wrong (got X); expected Y``."""

    def __init__(
        self,
        message: str,
        *,
        file: str = "",
        line: int | None = None,
        key: str = "",
        got: str | None = None,
        expected: str | None = None,
        hint: str = "",
    ) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.detail = message
        self.got = got
        self.expected = expected
        super().__init__(self._format(), hint=hint)

    def _format(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        text = f"{where}: "
        if self.key:
            text += f"{self.key}: "
        text += self.detail
        if self.got is not None:
            text += f" (got {self.got})"
        if self.expected is not None:
            text += f"; expected {self.expected}"
        return text


class SpoolError(RelayError):
    """The spool could not store or read a message (disk full, I/O error, damage)."""

    def __init__(self, message: str, *, disk_full: bool = False, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.disk_full = disk_full


class BareLineEndingError(SpoolError):
    """The spool refused a message holding a CR or LF that is not part of a CRLF pair.

    The spool only holds CRLF messages, so delivery never scans one again
    (``relay.spool.store``); ``kind`` is ``"CR"`` or ``"LF"``. Such bytes could smuggle
    headers or a second message past a provider, and the same bytes are refused every
    time: whoever produced them has a bug.
    """

    def __init__(self, kind: str, *, hint: str = "") -> None:
        super().__init__(f"not queueing a message with a bare {kind} (a CR or LF not part of "
                         "a CRLF pair): the spool holds only CRLF line endings",
                         hint=hint or "a bug in what produced the message; please report it")
        self.kind = kind


class TransportError(RelayError):
    """An upstream connection could not be opened through its transport.

    ``reason`` is a short, bounded label used in logs, ``relay check`` and metrics, e.g.
    ``proxy_unreachable``, ``proxy_auth_failed``, ``proxy_refused_ruleset``,
    ``ssh_host_key_mismatch``, ``ssh_auth_failed``, ``connect_timeout``,
    ``connect_refused``, ``dns_failed``, ``tls_failed``, ``tls_certificate``.
    Transport errors are always transient for delivery: mail is deferred, never bounced.
    """

    def __init__(self, message: str, *, reason: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


class OAuthError(RelayError):
    """A token could not be obtained: carries the identity platform's error code."""

    def __init__(
        self, message: str, *, error: str = "", description: str = "", hint: str = ""
    ) -> None:
        super().__init__(message, hint=hint)
        self.error = error
        self.description = description


class DeliveryError(RelayError):
    """One delivery attempt failed; ``permanent`` decides bounce (True) or retry (False).

    Unknown failures are transient. ``reply`` is the upstream's reply text, if any;
    ``reason`` is a bounded label for metrics.
    """

    def __init__(
        self,
        message: str,
        *,
        permanent: bool,
        reply: str = "",
        reason: str = "error",
        hint: str = "",
    ) -> None:
        super().__init__(message, hint=hint)
        self.permanent = permanent
        self.reply = reply
        self.reason = reason


class DnsError(RelayError):
    """A DNS lookup failed for a temporary reason (timeout, SERVFAIL, no server answered)."""

    hint = ("check [relay] dns_servers and that those servers answer; "
            "the lookup is retried with the next message")


class DkimError(RelayError):
    """A message could not be DKIM-signed or verified (unparsable header, bad key)."""


class ProxyUpstreamError(RelayError):
    """An IMAP/POP3 proxy session could not log in to its provider.

    ``reason`` is a bounded label (``auth_refused``, ``greeting``, ``starttls``,
    ``protocol``, ``timeout``); ``reply`` is the provider's answer (censored of secrets);
    ``credentials`` is True when the provider refused the credentials themselves.
    """

    def __init__(self, message: str, *, reason: str, reply: str = "",
                 credentials: bool = False, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.reason = reason
        self.reply = reply
        self.credentials = credentials


class ControlError(RelayError):
    """A queue tool or control-socket command failed.

    ``code`` is a short label a script can test: ``not_found`` (no such queued message),
    ``bad_request``, ``held`` (retry of a held message), ``unreachable`` (no running relay
    answers on the control socket), ``internal``.
    """

    def __init__(self, message: str, *, code: str = "error", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.code = code
