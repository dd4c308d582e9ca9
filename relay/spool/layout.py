"""The spool's on-disk format: queue ids, the message file and the state file codecs.

A spool directory holds::

    lock                 flock held by the running relay (pid inside, for messages)
    control.sock         the running relay's control socket (relay.control)
    handovers            messages handed to a provider, outcome not yet recorded
                         (relay.spool.handovers; ``handovers.tmp`` while it is compacted)
    tmp/                 files being written; anything here at start-up is a leftover
    queue/<ID>           one file per message: header line, envelope JSON, raw message
    queue/<ID>.state     mutable delivery state; absent = fresh (all pending, due now)
    corrupt/             damaged files moved aside by recovery, for a human to inspect

A message file is ``relay-spool/1 <envelope-length> <data-length>\\n``, then the envelope
as JSON (exactly envelope-length bytes), then the message bytes (exactly data-length).
The declared lengths let recovery tell a complete file from a damaged one without a
checksum pass over the body; files only ever reach ``queue/`` complete and fsynced.

The message bytes have CRLF line endings only: no CR or LF outside a CRLF pair
(``bare_line_ending`` finds one). ``Spool.store``, the only way into ``queue/``, refuses
any other message, and delivery relies on it: it sends the bytes without scanning them
again (see ``relay.spool.store`` for who writes messages and why each is CRLF-only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import secrets
import threading
import time
from typing import Any, Literal

from relay.envelope import Envelope
from relay.spool.records import QueueState, RcptStatus, Recipient

MAGIC = b"relay-spool/1"
STATE_VERSION = 1
MAX_HEADER_LINE = 64                  # "relay-spool/1 <20 digits> <20 digits>\n" fits
MAX_ENVELOPE = 16 * 1024 * 1024       # sanity bound when parsing a declared length
STATE_SUFFIX = ".state"

# Crockford's base32: digits then uppercase letters without I, L, O, U. Its characters are
# in ASCII order, so a fixed-width encoding sorts like the number it encodes.
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TIME_CHARS = 11                       # 55 bits of microseconds: good until year 3111
RANDOM_CHARS = 6                      # 30 random bits: distinct across processes/restarts
ID_LENGTH = TIME_CHARS + RANDOM_CHARS
_ID_RE = re.compile(f"[{ALPHABET}]{{{ID_LENGTH}}}")


class FormatError(ValueError):
    """A spool file does not parse; the message says what is wrong with it."""


def _b32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class IdGenerator:
    """Makes queue ids: microsecond time then random bits, strictly increasing per process.

    Ids sort in arrival order, are safe as file names, and differ between processes and
    restarts (the random part), even if the clock steps back (the time part never repeats
    within a process; across processes the random part decides).
    """

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()
        self._pid = -1
        self._rng = random.Random()

    def new(self) -> str:
        with self._lock:
            now = time.time_ns() // 1000
            self._last = now if now > self._last else self._last + 1
            stamp = self._last
            if self._pid != os.getpid():     # first use, or a forked child: fresh seed
                self._pid = os.getpid()
                self._rng.seed(secrets.token_bytes(16))
            rand = self._rng.getrandbits(5 * RANDOM_CHARS)
        return _b32(stamp, TIME_CHARS) + _b32(rand, RANDOM_CHARS)


def is_queue_id(text: str) -> bool:
    """True if ``text`` is a well-formed queue id (so also a safe file name)."""
    return _ID_RE.fullmatch(text) is not None


def id_time(queue_id: str) -> float:
    """The Unix time encoded in a queue id."""
    value = 0
    for ch in queue_id[:TIME_CHARS]:
        value = value * 32 + ALPHABET.index(ch)
    return value / 1e6


# --- JSON records --------------------------------------------------------------------------

def _dumps(record: dict[str, Any]) -> bytes:
    # ASCII with \u escapes: any str round-trips, lone surrogates (undecodable bytes a
    # client sent, kept as surrogate escapes) included.
    return json.dumps(record, separators=(",", ":")).encode("ascii")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number relay writes")


def _loads(raw: bytes) -> Any:
    return json.loads(raw, parse_constant=_reject_constant)


def _finite(value: float, what: str) -> float:
    """A JSON number as a float, or FormatError (too large for a float)."""
    try:
        number = float(value)
    except OverflowError:
        raise FormatError(f"{what} is out of range") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise FormatError(f"{what} is out of range")
    return number


# --- message file ------------------------------------------------------------------------

_ENVELOPE_FIELDS = tuple(f.name for f in dataclasses.fields(Envelope))


def encode_envelope(envelope: Envelope) -> bytes:
    # Per message on the accept path: a plain dict, not dataclasses.asdict (deep-copies).
    record = {name: getattr(envelope, name) for name in _ENVELOPE_FIELDS}
    record["recipients"] = list(envelope.recipients)
    return _dumps(record)


_SCALARS: dict[str, type] = {"str": str, "bool": bool, "int": int, "float": float}


def decode_envelope(raw: bytes) -> Envelope:
    try:
        record = _loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FormatError(f"envelope is not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise FormatError("envelope is not a JSON object")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Envelope):
        if f.name not in record:
            if f.default is dataclasses.MISSING:
                raise FormatError(f"envelope lacks {f.name!r}")
            continue
        value = record[f.name]
        if f.name == "recipients":
            if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
                raise FormatError("envelope recipients is not a list of strings")
            if not value:
                raise FormatError("envelope has no recipients")
            value = tuple(value)
        elif f.name == "received_at":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise FormatError("envelope received_at is not a number")
            value = _finite(value, "envelope received_at")
        elif (expected := _SCALARS.get(str(f.type))) is not None:
            ok = type(value) is expected or (expected is float and type(value) is int)
            if not ok:
                raise FormatError(f"envelope {f.name} is not a {expected.__name__}")
            if expected is float:
                value = _finite(value, f"envelope {f.name}")
        values[f.name] = value
    return Envelope(**values)


def bare_line_ending(data: bytes) -> Literal["CR", "LF"] | None:
    """Which bare line ending ``data`` holds (a CR or LF not part of a CRLF pair), if any.

    Every CRLF holds one CR and one LF, so any surplus is bare: three C-speed counts
    (~175 µs per 100 KB), no per-line work.
    """
    pairs = data.count(b"\r\n")
    if data.count(b"\n") != pairs:
        return "LF"
    if data.count(b"\r") != pairs:
        return "CR"
    return None


def message_header(envelope_json: bytes, data_len: int) -> bytes:
    """The first bytes of a message file: header line and envelope JSON."""
    return b"%s %d %d\n" % (MAGIC, len(envelope_json), data_len) + envelope_json


def parse_header_line(line: bytes) -> tuple[int, int]:
    """(envelope length, data length) from a message file's first line (with its \\n)."""
    if not line.endswith(b"\n"):
        raise FormatError("header line is incomplete or too long")
    parts = line[:-1].split(b" ")
    if len(parts) != 3 or parts[0] != MAGIC:
        shown = line[:40].decode("ascii", "backslashreplace")
        raise FormatError(f"not a relay spool file (header {shown!r})")
    if not (parts[1].isdigit() and parts[2].isdigit()):
        raise FormatError("header lengths are not numbers")
    env_len, data_len = int(parts[1]), int(parts[2])
    if env_len > MAX_ENVELOPE:
        raise FormatError(f"declared envelope length {env_len} is implausible")
    return env_len, data_len


class MessageFile:
    """Reads a message file's parts from an open file, checking them against each other."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        first = os.pread(fd, MAX_HEADER_LINE, 0)
        if not first:
            raise FormatError("file is empty")
        if not first.startswith(MAGIC[:len(first)]):
            shown = first[:24].decode("ascii", "backslashreplace")
            raise FormatError(f"not a relay spool file (starts with {shown!r})")
        end = first.find(b"\n")
        if end < 0:
            raise FormatError("header line is truncated"
                              if len(first) < MAX_HEADER_LINE else "header line is too long")
        self.env_len, self.data_len = parse_header_line(first[:end + 1])
        self.data_offset = end + 1 + self.env_len
        actual = os.fstat(fd).st_size
        expected = self.data_offset + self.data_len
        if actual != expected:
            raise FormatError(f"file is {actual} bytes but its header declares {expected} "
                              "(truncated or overwritten)")
        raw = os.pread(fd, self.env_len, end + 1)
        if len(raw) != self.env_len:
            raise FormatError("envelope is truncated")
        self.envelope = decode_envelope(raw)

    def read_data(self, limit: int | None = None) -> bytes:
        want = self.data_len if limit is None else min(limit, self.data_len)
        data = os.pread(self.fd, want, self.data_offset)
        while len(data) < want:             # pread may return short for very large reads
            more = os.pread(self.fd, want - len(data), self.data_offset + len(data))
            if not more:
                raise FormatError("message data is truncated")
            data += more
        return data


# --- state file --------------------------------------------------------------------------

def fresh_state(envelope: Envelope) -> QueueState:
    """The state a message has before its first attempt: everyone pending, due now."""
    return QueueState(recipients=[Recipient(address=a) for a in envelope.recipients])


def state_name(state: QueueState, now: float) -> str:
    """The queue state shown by tools and metrics: held, deferred (due later) or active."""
    if state.held:
        return "held"
    return "deferred" if state.next_attempt > now else "active"


def encode_state(state: QueueState) -> bytes:
    record = dataclasses.asdict(state)
    record["v"] = STATE_VERSION
    return _dumps(record)


def decode_state(raw: bytes, envelope: Envelope) -> QueueState:
    """Parse a state file and check that it belongs to ``envelope``."""
    try:
        record = _loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FormatError(f"state is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("v") != STATE_VERSION:
        raise FormatError("state has no known version")
    rcpts = record.get("recipients")
    if not isinstance(rcpts, list):
        raise FormatError("state recipients is not a list")
    recipients: list[Recipient] = []
    try:
        for r in rcpts:
            recipients.append(Recipient(
                address=_typed(r, "address", str), status=RcptStatus(_typed(r, "status", str)),
                last_reply=_typed(r, "last_reply", str), attempts=_typed(r, "attempts", int)))
        state = QueueState(
            recipients=recipients, attempts=_typed(record, "attempts", int),
            next_attempt=_finite(_typed(record, "next_attempt", (int, float)), "next_attempt"),
            held=_typed(record, "held", bool),
            last_attempt=_finite(_typed(record, "last_attempt", (int, float)), "last_attempt"),
            upstream=_typed(record, "upstream", str),
            last_error=_typed(record, "last_error", str))
    except (TypeError, ValueError, KeyError) as exc:
        raise FormatError(f"state field {exc}") from None
    if [r.address for r in recipients] != list(envelope.recipients):
        raise FormatError("state recipients do not match the envelope's")
    return state


def _typed(record: object, key: str, kind: type[Any] | tuple[type[Any], ...]) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise KeyError(f"{key!r} is missing")
    value = record[key]
    if isinstance(value, bool) and kind is not bool:
        raise TypeError(f"{key!r} has the wrong type")
    if not isinstance(value, kind):
        raise TypeError(f"{key!r} has the wrong type")
    return value
