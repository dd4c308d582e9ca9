"""Protected headers: pass them through byte for byte, refuse rules that touch them, check.

relay never re-serialises a message. The only changes it makes to the header block are
prepending its own trace fields (Received, DKIM-Signature, Received-SPF,
Authentication-Results), the operator's header rules, which work on raw bytes and may
not touch a protected field (``check_rules`` refuses such a config at load time), and,
on mail from trusted clients, a ``Date:`` or ``Message-ID:`` the message lacks
(``add_missing``: inserted at one place, only when no field of that name exists, every
byte of the message kept; the listener does it before the guard takes its snapshot).
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from relay.config.schema import Config, HeaderRule, RelaySection
from relay.errors import ConfigError
from relay.metrics import Metrics

DEFAULT_PROTECTED: tuple[str, ...] = (
    "Auto-Submitted", "X-Auto-Response-Suppress", "X-Mailer", "X-Zendesk-*",
    "Message-ID", "In-Reply-To", "References")
TRACE_HEADERS: tuple[str, ...] = (
    "Received", "DKIM-Signature", "Received-SPF", "Authentication-Results")

log = logging.getLogger("relay.headers")


def protected_patterns(relay: RelaySection | None = None) -> tuple[str, ...]:
    """The built-in list plus ``[relay] protected_headers`` (case-insensitive, ``*`` globs)."""
    extra = relay.protected_headers if relay is not None else ()
    seen: dict[str, str] = {}
    for p in (*DEFAULT_PROTECTED, *extra):
        seen.setdefault(p.lower(), p)
    return tuple(seen.values())


@functools.lru_cache(maxsize=64)
def _matcher(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One compiled, case-insensitive regex for a list of ``*`` globs."""
    return re.compile("|".join(f"(?:{fnmatch.translate(p.lower())})" for p in patterns)
                      or r"(?!)")


def is_protected(name: str | bytes, patterns: Iterable[str]) -> bool:
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    return _matcher(tuple(patterns)).match(text.strip().lower()) is not None


@dataclass(frozen=True, slots=True)
class Field:
    """One raw header field: its exact bytes (folding and line ends included)."""

    name: bytes          # as written, without the colon and trailing blanks
    raw: bytes


def split(data: bytes) -> tuple[list[Field], int]:
    """The raw header fields and the offset where the blank line (and the body) starts.

    Lines that are neither a field nor a continuation (obsolete or broken input) are kept
    as fields with an empty name so nothing is ever lost.
    """
    fields: list[Field] = []
    pos = 0
    n = len(data)
    while pos < n:
        end = data.find(b"\n", pos)
        end = n if end < 0 else end + 1
        line = data[pos:end]
        if line in (b"\r\n", b"\n"):
            return fields, pos
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = Field(last.name, last.raw + line)
        else:
            colon = line.find(b":")
            name = line[:colon].rstrip(b" \t") if colon > 0 else b""
            fields.append(Field(name, line))
        pos = end
    return fields, n


def protected_lines(data: bytes, patterns: Sequence[str] = DEFAULT_PROTECTED) -> list[bytes]:
    """The exact raw bytes of every protected field, in message order."""
    fields, _ = split(data)
    return [f.raw for f in fields if f.name and is_protected(f.name, patterns)]


def verify_unchanged(before: bytes, after: bytes,
                     patterns: Sequence[str] = DEFAULT_PROTECTED) -> bool:
    """True when ``after`` carries the protected fields of ``before`` byte for byte."""
    return protected_lines(before, patterns) == protected_lines(after, patterns)


def _linesep(data: bytes) -> bytes:
    end = data.find(b"\n")
    return b"\r\n" if end > 0 and data[end - 1:end] == b"\r" else b"\n"


def apply_rules(data: bytes, rules: Sequence[HeaderRule]) -> bytes:
    """Apply add/remove/replace rules to the raw header; every other byte is kept.

    ``add`` appends a field at the end of the header, ``remove`` drops every field of that
    name, ``replace`` rewrites every field of that name (or adds one if there is none).
    """
    if not rules:
        return data
    fields, body_at = split(data)
    sep = _linesep(data)

    def append(field: Field) -> None:
        # A header that runs to the end of the data may lack its last line end: never
        # glue a new field onto that line.
        if fields and not fields[-1].raw.endswith(b"\n"):
            fields[-1] = Field(fields[-1].name, fields[-1].raw + sep)
        fields.append(field)

    for rule in rules:
        name = rule.header.encode("ascii")
        new = name + b": " + rule.value.encode("utf-8") + sep
        same = [i for i, f in enumerate(fields) if f.name.lower() == name.lower()]
        if rule.action == "add":
            append(Field(name, new))
        elif rule.action == "remove":
            fields = [f for i, f in enumerate(fields) if i not in same]
        elif same:
            for i in same:
                fields[i] = Field(name, new)
        else:
            append(Field(name, new))
    return b"".join(f.raw for f in fields) + data[body_at:]


def prepend(data: bytes, *fields: bytes) -> bytes:
    """Prepend trace fields (each a complete ``Name: value`` line with its line end)."""
    for f in fields:
        name = f.split(b":", 1)[0].decode("ascii", "replace")
        if name.lower() not in {t.lower() for t in TRACE_HEADERS}:
            raise ValueError(f"relay only prepends trace headers, not {name}")
    return b"".join(fields) + data


MISSING_ADDABLE: tuple[bytes, ...] = (b"date", b"message-id")


def add_missing(data: bytes, at: int, fields: Sequence[bytes]) -> bytes:
    """Insert ``fields`` (whole ``Date:``/``Message-ID:`` lines) at offset ``at``.

    Only a field the message has no field of the same name of is inserted (any case,
    blanks before the colon included, exactly as ``split`` and the guard read names);
    ``at`` must be the start of a header line. The result is ``data`` with the new bytes
    at one offset: ``out[:at] + out[at + len(added):] == data``, so no existing field,
    protected or not, changes by a byte (tests/headers checks it property-based).
    """
    existing, body_at = split(data)
    present = {f.name.lower() for f in existing}
    if at > body_at or (at and data[at - 1:at] != b"\n"):
        raise ValueError("fields are inserted at the start of a header line")
    added = []
    for f in fields:
        name = f.split(b":", 1)[0]
        if name.lower() not in MISSING_ADDABLE or not f.endswith(b"\r\n") or \
                b"\n" in f[:-1] or b"\r" in f[:-2]:
            raise ValueError(f"add_missing only adds one-line Date/Message-ID fields, not {f!r}")
        if name.lower() not in present:
            present.add(name.lower())
            added.append(f)
    if not added:
        return data
    return data[:at] + b"".join(added) + data[at:]


def remove_forged_results(data: bytes, authserv_id: str) -> bytes:
    """Drop Authentication-Results fields that claim to be ours (RFC 8601 section 5).

    Inbound mail may carry such a field written by anyone; relay's own results are only
    trustworthy when no earlier copy can pass for them. Other fields are left untouched.
    """
    fields, body_at = split(data)
    mine = authserv_id.lower().encode("ascii", "replace")

    def forged(f: Field) -> bool:
        if f.name.lower() != b"authentication-results":
            return False
        value = f.raw.split(b":", 1)[1].replace(b"\r\n", b"").replace(b"\n", b"").lower()
        return value.split(b";", 1)[0].split()[:1] == [mine]

    if not any(forged(f) for f in fields):
        return data
    return b"".join(f.raw for f in fields if not forged(f)) + data[body_at:]


def _check_list(rules: Sequence[HeaderRule], patterns: Sequence[str], where: str) -> None:
    for rule in rules:
        name = rule.header.strip()
        hit = next((p for p in patterns if fnmatch.fnmatchcase(name.lower(), p.lower())), None)
        if hit is not None:
            raise ConfigError(
                f"{where}: header rule '{rule.action} {name}' touches protected header "
                f"{name} (protected by '{hit}')", line=rule.line or None,
                key=f"{where}.header_rules",
                hint="relay passes protected headers through unchanged; remove the rule, "
                     "or (only if you really must) take the header out of "
                     "[relay] protected_headers — built-in ones cannot be removed")
        if name.lower() in {t.lower() for t in TRACE_HEADERS}:
            raise ConfigError(f"{where}: header rule '{rule.action} {name}' touches a trace "
                              f"header relay writes itself", line=rule.line or None,
                              key=f"{where}.header_rules", hint="remove the rule")
        if not name or any(c in name for c in ": \t") or not name.isascii():
            raise ConfigError(f"{where}: header rule names an invalid header {name!r}",
                              line=rule.line or None, key=f"{where}.header_rules",
                              hint="give a field name such as X-Campaign")


def check_rules(rules: Config | Sequence[HeaderRule],
                patterns: Sequence[str] | None = None, *, where: str = "header_rules") -> None:
    """Refuse (ConfigError naming rule line and header) any rule on a protected header.

    Called with a whole ``Config`` by the config loader (every listener, upstream and
    route), or with one list of rules.
    """
    if isinstance(rules, Config):
        pats = patterns if patterns is not None else protected_patterns(rules.relay)
        for lst in rules.listeners:
            _check_list(lst.header_rules, pats, f"listener {lst.name}")
        for up in rules.upstreams:
            _check_list(up.header_rules, pats, f"upstream {up.name}")
        for i, route in enumerate(rules.routes):
            _check_list(route.header_rules, pats, f"route[{i}]")
        return
    _check_list(rules, patterns if patterns is not None else DEFAULT_PROTECTED, where)


class HeaderGuard:
    """Defence in depth: counts and logs any message whose protected headers changed."""

    def __init__(self, patterns: Sequence[str] = DEFAULT_PROTECTED, *,
                 metrics: Metrics | None = None, logger: logging.Logger | None = None) -> None:
        self.patterns = tuple(patterns)
        self._metrics = metrics
        self._log = logger or log

    def unchanged_by_prefix(self, received: bytes, outgoing: bytes) -> bool:
        """True when ``outgoing`` is ``received`` with only unprotected fields prepended.

        The usual case (trace headers and DKIM-Signature prepended): every byte of what was
        received is still there, in place, so only the prefix needs parsing.
        """
        if outgoing is received:
            return True
        cut = len(outgoing) - len(received)
        if cut < 0 or received[:1] in (b" ", b"\t") or not outgoing.endswith(received):
            return False
        prefix = outgoing[:cut]
        return not prefix or (prefix.endswith(b"\n") and
                              not protected_lines(prefix + b"\r\n", self.patterns))

    def check(self, received: bytes, outgoing: bytes, *, queue_id: str = "") -> bool:
        """Compare what relay received with what it will store/send; False on a change."""
        if self.unchanged_by_prefix(received, outgoing):
            return True
        before = protected_lines(received, self.patterns)
        after = protected_lines(outgoing, self.patterns)
        if before == after:
            return True
        names = sorted({f.split(b":", 1)[0].decode("ascii", "replace")
                        for f in set(before) ^ set(after)})
        if self._metrics is not None:
            self._metrics.protected_header_violations.inc()
        self._log.error("%s: protected headers changed between receipt and send: %s "
                        "(a bug: please report it)", queue_id or "NOQUEUE",
                        ", ".join(names) or "order")
        return False
