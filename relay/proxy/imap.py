"""IMAP before login, sans-IO: relay's own greeting, CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE.

Bytes in, events out (``relay.proxy.events``). The machine accepts RFC 3501 quoted strings
and literals (synchronising ``{n}`` and LITERAL+ ``{n+}``), bounds every line and literal by
``max_line`` before anything is allocated, refuses NUL/CR/LF inside credentials, and drops
whatever was pipelined after STARTTLS. Once it emits ``Login`` it parses nothing more: the
rest of the buffer (``leftover()``) belongs to the provider after a successful login.

Hostile input ends the conversation with ``* BYE``: a line starting with TLS or binary
bytes or an HTTP request line at once, invalid commands after ``max_bad``, NOOP,
CAPABILITY and ID after ``max_junk``; a user name with a control character is refused
(``BAD``) before anything reaches the provider.
"""

from __future__ import annotations

import re

from relay.config.schema import Secret, TlsMode
from relay.proxy.events import Close, Event, Login, LoginFailure, Send, StartTls
from relay.sasl import (
    LOGIN_PASS_PROMPT,
    LOGIN_USER_PROMPT,
    SaslError,
    b64decode,
    decode_text,
    is_clean,
    is_clean_name,
    parse_plain,
)

_HEAD = re.compile(rb"^([\x21-\x7e]+) ([A-Za-z]+)(?: |$)")
_TAG_BAD = re.compile(rb'[(){%*"\\+]')
_LITERAL = re.compile(rb"\{(\d{1,20})(\+?)\}$")
_ATOM_BAD = re.compile(rb'[\x00-\x20\x7f(){%*"\\]')
_HTTP = re.compile(rb"^[A-Za-z]+ \S+ HTTP/\d(?:\.\d)?$")


class _Bad(Exception):
    """A command the machine answers with BAD (``close``: and then hangs up)."""

    def __init__(self, text: str, *, close: str = "") -> None:
        super().__init__(text)
        self.close = close


def _tokens(pieces: list[tuple[bool, bytes]]) -> list[bytes]:
    """Split a command's pieces (text, or literal when the flag is True) into strings."""
    out: list[bytes] = []
    for literal, data in pieces:
        if literal:
            out.append(data)
            continue
        i, n = 0, len(data)
        while i < n:
            if data[i] == 0x20:
                i += 1
                continue
            if data[i] == 0x22:
                j, value = i + 1, bytearray()
                while True:
                    if j >= n:
                        raise _Bad("Unterminated quoted string.")
                    ch = data[j]
                    if ch == 0x5C:
                        if j + 1 >= n or data[j + 1] not in b'"\\':
                            raise _Bad("Invalid escape in quoted string.")
                        value.append(data[j + 1])
                        j += 2
                        continue
                    if ch == 0x22:
                        break
                    if ch in (0x00, 0x0A, 0x0D):
                        raise _Bad("CR, LF or NUL inside a quoted string.")
                    value.append(ch)
                    j += 1
                out.append(bytes(value))
                i = j + 1
                if i < n and data[i] != 0x20:
                    raise _Bad("Missing space after quoted string.")
                continue
            j = data.find(b" ", i)
            j = n if j < 0 else j
            atom = data[i:j]
            if _ATOM_BAD.search(atom):
                raise _Bad("Invalid characters in atom.")
            out.append(atom)
            i = j
    return out


class ImapPreAuth:
    """One client's IMAP conversation up to a successful login."""

    def __init__(self, *, tls_mode: TlsMode, tls_active: bool = False, max_line: int = 8192,
                 allow_plaintext_auth: bool = False, max_bad: int = 10,
                 max_junk: int = 20) -> None:
        self.tls_mode = tls_mode
        self.tls_active = tls_active
        self.max_line = max_line
        self.allow_plaintext_auth = allow_plaintext_auth
        self.max_bad = max_bad
        self.max_junk = max_junk
        self._junk = 0
        self._buf = bytearray()
        self._state = "command"         # command | literal | sasl | login | tls | done | closed
        self._pieces: list[tuple[bool, bytes]] = []
        self._size = 0                   # bytes of the command so far (text and literals)
        self._need = 0                   # literal bytes still expected
        self._tag = b"*"
        self._sasl_mech = ""
        self._sasl_user = ""
        self._bad = 0

    # -- what the client may do -------------------------------------------------------
    @property
    def _login_allowed(self) -> bool:
        return self.tls_active or self.tls_mode == "none" or self.allow_plaintext_auth

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID"]
        if self.tls_mode == "starttls" and not self.tls_active:
            caps.append("STARTTLS")
        caps += ["AUTH=PLAIN", "AUTH=LOGIN"] if self._login_allowed else ["LOGINDISABLED"]
        return " ".join(caps)

    # -- PreAuth interface ------------------------------------------------------------------
    def greeting(self) -> bytes:
        return f"* OK [CAPABILITY {self.capabilities()}] relay ready.\r\n".encode()

    def refuse(self, why: str) -> bytes:
        self._state = "closed"
        return f"* BYE [UNAVAILABLE] {why}\r\n".encode()

    def timed_out(self) -> bytes:
        self._state = "closed"
        return b"* BYE Disconnected for inactivity.\r\n"

    def tls_started(self) -> None:
        self.tls_active = True
        self._buf.clear()
        self._state = "command"

    def leftover(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def login_succeeded(self, capability: str | None = None, untagged: bytes = b"") -> bytes:
        self._state = "done"
        code = f"[CAPABILITY {capability}] " if capability else ""
        return untagged + self._tag + f" OK {code}Logged in\r\n".encode()

    def login_failed(self, why: LoginFailure) -> list[Event]:
        tag = self._tag
        if why == "refused":
            self._state = "closed"
            return [Send(tag + b" NO [UNAVAILABLE] Too many failed logins from your address, "
                               b"try again later.\r\n* BYE Closing connection.\r\n"),
                    Close("refused")]
        self._state = "command"
        if why == "credentials":
            events: list[Event] = [Send(tag + b" NO [AUTHENTICATIONFAILED] "
                                              b"Authentication failed.\r\n")]
        elif why == "account_locked":
            events = [Send(tag + b" NO [UNAVAILABLE] Too many failed logins for this account, "
                                 b"try again later.\r\n")]
        else:
            events = [Send(tag + b" NO [UNAVAILABLE] Mail server unavailable, "
                                 b"try again later.\r\n")]
        return events + self._process()

    def receive(self, data: bytes) -> list[Event]:
        if self._state in ("login", "tls", "done", "closed"):
            self._buf += data            # kept for leftover(); never parsed
            return []
        self._buf += data
        return self._process()

    # -- parsing ---------------------------------------------------------------------------
    def _process(self) -> list[Event]:
        out: list[Event] = []
        while self._state in ("command", "literal", "sasl"):
            if self._state == "literal":
                if len(self._buf) < self._need:
                    break
                self._pieces.append((True, bytes(self._buf[:self._need])))
                del self._buf[:self._need]
                self._state = "command"
                continue
            if self._state == "command" and not self._pieces and self._buf and (
                    self._buf[0] >= 0x7F or (self._buf[0] < 0x20 and self._buf[0] not in b"\r\n")):
                out += self._fatal(b"* BYE This is an IMAP server.\r\n", "not_protocol")
                break
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self.max_line - self._size:
                    out += self._fatal(b"* BYE Command line too long.\r\n", "line_too_long")
                break
            line = bytes(self._buf[:end]).removesuffix(b"\r")
            del self._buf[:end + 1]
            if len(line) > self.max_line - self._size:
                out += self._fatal(b"* BYE Command line too long.\r\n", "line_too_long")
                break
            if self._state == "sasl":
                out += self._sasl_line(line)
            else:
                out += self._command_line(line)
        return out

    def _fatal(self, text: bytes, reason: str) -> list[Event]:
        self._state = "closed"
        self._buf.clear()
        return [Send(text), Close(reason)]

    def _command_line(self, line: bytes) -> list[Event]:
        m = _LITERAL.search(line)
        if m:
            if not self._pieces:
                head = _HEAD.match(line)
                self._tag = head.group(1) if head and not _TAG_BAD.search(head.group(1)) else b"*"
            size = int(m.group(1))
            self._size += len(line)
            if size > self.max_line - self._size:
                return self._fatal(self._tag + b" BAD Literal too large.\r\n"
                                   b"* BYE Closing connection.\r\n", "literal_too_large")
            self._size += size
            self._pieces.append((False, line[:m.start()]))
            self._need = size
            self._state = "literal"
            return [] if m.group(2) else [Send(b"+ Ready for literal data\r\n")]
        self._pieces.append((False, line))
        pieces, self._pieces, self._size = self._pieces, [], 0
        try:
            return self._command(pieces)
        except _Bad as exc:
            if exc.close:
                return self._fatal(self._tag + f" BAD {exc}\r\n".encode(), exc.close)
            return self._bad_reply(str(exc))

    def _bad_reply(self, text: str) -> list[Event]:
        self._bad += 1
        reply = self._tag + f" BAD {text}\r\n".encode()
        if self._bad >= self.max_bad:
            return self._fatal(reply + b"* BYE Too many invalid commands.\r\n", "bad_input")
        return [Send(reply)]

    def _junk_reply(self, reply: bytes) -> list[Event]:
        """A command that does nothing toward a login (NOOP, CAPABILITY, ID): counted."""
        self._junk += 1
        if self._junk > self.max_junk:
            return self._fatal(b"* BYE Too many commands without logging in.\r\n", "junk")
        return [Send(reply)]

    def _command(self, pieces: list[tuple[bool, bytes]]) -> list[Event]:
        first = pieces[0][1]
        if len(pieces) == 1 and _HTTP.match(first):
            return self._fatal(b"* BYE This is an IMAP server.\r\n", "not_protocol")
        head = _HEAD.match(first)
        if not head or _TAG_BAD.search(head.group(1)):
            self._tag = b"*"
            raise _Bad("Invalid tag or command.")
        self._tag = head.group(1)
        command = head.group(2).upper()
        pieces[0] = (False, first[head.end():])
        tag = self._tag
        if command == b"ID":                       # RFC 2971: the server may answer NIL
            return self._junk_reply(b"* ID NIL\r\n" + tag + b" OK ID completed.\r\n")
        if command not in (b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS", b"LOGIN",
                           b"AUTHENTICATE"):
            raise _Bad("Command not allowed before login.")
        args = _tokens(pieces)
        if command == b"CAPABILITY" and not args:
            return self._junk_reply(f"* CAPABILITY {self.capabilities()}\r\n".encode() + tag +
                                    b" OK Capability completed.\r\n")
        if command == b"NOOP" and not args:
            return self._junk_reply(tag + b" OK NOOP completed.\r\n")
        if command == b"LOGOUT" and not args:
            self._state = "closed"
            return [Send(b"* BYE Logging out.\r\n" + tag + b" OK Logout completed.\r\n"),
                    Close("logout")]
        if command == b"STARTTLS" and not args:
            if self.tls_mode != "starttls" or self.tls_active:
                raise _Bad("STARTTLS not available." if not self.tls_active
                           else "TLS is already active.")
            self._state = "tls"
            self._buf.clear()                       # the STARTTLS-injection class: drop it
            return [Send(tag + b" OK Begin TLS negotiation now.\r\n"), StartTls()]
        if command == b"LOGIN" and len(args) == 2:
            if not self._login_allowed:
                return [Send(tag + b" NO [PRIVACYREQUIRED] Plaintext authentication "
                                   b"disallowed on non-secure connections; use STARTTLS.\r\n")]
            try:
                user, password = decode_text(args[0]), decode_text(args[1])
            except SaslError as exc:
                raise _Bad(f"Invalid credentials: {exc}.") from exc
            return self._login(user, password, "login")
        if command == b"AUTHENTICATE" and 1 <= len(args) <= 2:
            return self._authenticate(args)
        raise _Bad(f"Invalid arguments to {command.decode()}.")

    def _login(self, user: str, password: str, mechanism: str) -> list[Event]:
        if user and not is_clean_name(user):
            raise _Bad("Control characters in the user name.")
        if not (user and password and is_clean(password)):
            raise _Bad("Empty or invalid user name or password.")
        self._state = "login"
        return [Login(user=user, password=Secret(password), mechanism=mechanism)]

    def _authenticate(self, args: list[bytes]) -> list[Event]:
        mech = args[0].upper()
        if not self._login_allowed:
            return [Send(self._tag + b" NO [PRIVACYREQUIRED] Plaintext authentication "
                                     b"disallowed on non-secure connections; use STARTTLS.\r\n")]
        if mech not in (b"PLAIN", b"LOGIN"):
            return [Send(self._tag + b" NO Unsupported authentication mechanism.\r\n")]
        self._sasl_mech, self._sasl_user = mech.decode(), ""
        self._state = "sasl"
        if len(args) == 2:                           # SASL-IR
            return self._sasl_line(args[1])
        return [Send(b"+ \r\n" if mech == b"PLAIN" else b"+ " + LOGIN_USER_PROMPT + b"\r\n")]

    def _sasl_line(self, line: bytes) -> list[Event]:
        if line.strip() == b"*":
            self._state = "command"
            return [Send(self._tag + b" BAD Authentication canceled.\r\n")]
        try:
            payload = b64decode(line)
            if self._sasl_mech == "PLAIN":
                self._state = "command"
                user, password = parse_plain(payload)
                return self._login(user, password, "plain")
            if not self._sasl_user:
                self._sasl_user = decode_text(payload)
                if not self._sasl_user or not is_clean_name(self._sasl_user):
                    raise SaslError("empty user name or control characters in it")
                return [Send(b"+ " + LOGIN_PASS_PROMPT + b"\r\n")]
            self._state = "command"
            return self._login(self._sasl_user, decode_text(payload), "sasl-login")
        except (SaslError, _Bad) as exc:
            self._state = "command"
            return self._bad_reply(f"Invalid authentication data: {exc}.")
