"""POP3 before login, sans-IO: relay's own greeting, CAPA, STLS, USER/PASS, AUTH, QUIT.

Bytes in, events out (``relay.proxy.events``). Command lines are bounded by RFC 2449's
255 octets (CRLF included; ``AUTH`` lines and SASL responses by ``max_line``); what was
pipelined after STLS is dropped; after ``Login`` nothing more is parsed and the rest of
the buffer (``leftover()``) goes to the provider once the login succeeds.

Hostile input ends the conversation with the protocol's own ``-ERR``: a line that does
not start with a letter (TLS or binary bytes) or an HTTP request line at once, invalid
commands after ``max_bad``, CAPA/AUTH listings after ``max_junk``, and a user name with
a control character is refused before anything reaches the provider.
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

MAX_COMMAND = 255                 # RFC 2449 section 4: a command line, CRLF included
_LETTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HTTP = re.compile(rb"^[A-Za-z]+ \S+ HTTP/\d(?:\.\d)?$")


class Pop3PreAuth:
    """One client's POP3 conversation up to a successful login (RFC 1939, 2449, 5034)."""

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
        self._state = "command"           # command | sasl | login | tls | done | closed
        self._user = ""                   # from USER, waiting for PASS
        self._sasl_mech = ""
        self._sasl_user = ""
        self._bad = 0

    @property
    def _login_allowed(self) -> bool:
        return self.tls_active or self.tls_mode == "none" or self.allow_plaintext_auth

    def capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE"]
        if self.tls_mode == "starttls" and not self.tls_active:
            caps.append("STLS")
        if self._login_allowed:
            caps += ["USER", "SASL PLAIN LOGIN"]
        return caps

    # -- PreAuth interface ------------------------------------------------------------------
    def greeting(self) -> bytes:
        return b"+OK relay ready.\r\n"

    def refuse(self, why: str) -> bytes:
        self._state = "closed"
        return f"-ERR [SYS/TEMP] {why}\r\n".encode()

    def timed_out(self) -> bytes:
        self._state = "closed"
        return b"-ERR Disconnected for inactivity.\r\n"

    def tls_started(self) -> None:
        self.tls_active = True
        self._buf.clear()
        self._user = ""
        self._state = "command"

    def leftover(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def login_succeeded(self, capability: str | None = None, untagged: bytes = b"") -> bytes:
        self._state = "done"
        return b"+OK Logged in.\r\n"

    def login_failed(self, why: LoginFailure) -> list[Event]:
        self._user = ""
        if why == "refused":
            self._state = "closed"
            return [Send(b"-ERR [SYS/TEMP] Too many failed logins from your address, "
                         b"try again later.\r\n"), Close("refused")]
        self._state = "command"
        reply = (b"-ERR [AUTH] Authentication failed.\r\n" if why == "credentials"
                 else b"-ERR [SYS/TEMP] Too many failed logins for this account, try again "
                      b"later.\r\n" if why == "account_locked"
                 else b"-ERR [SYS/TEMP] Mail server unavailable, try again later.\r\n")
        return [Send(reply), *self._process()]

    def receive(self, data: bytes) -> list[Event]:
        self._buf += data
        if self._state not in ("command", "sasl"):
            return []                      # kept for leftover(); never parsed
        return self._process()

    # -- parsing ---------------------------------------------------------------------------
    def _process(self) -> list[Event]:
        out: list[Event] = []
        while self._state in ("command", "sasl"):
            command = self._state == "command"
            if command and self._buf and self._buf[0] not in _LETTERS \
                    and self._buf[0] not in b"\r\n":
                out += self._fatal(b"-ERR This is a POP3 server.\r\n", "not_protocol")
                break
            end = self._buf.find(b"\n")
            if command and self._buf[:5].upper() != b"AUTH ":
                limit = min(self.max_line, MAX_COMMAND)     # CRLF included
                too_long = end + 1 > limit if end >= 0 else len(self._buf) >= limit
            else:
                too_long = end > self.max_line or (end < 0 and len(self._buf) > self.max_line)
            if too_long:
                out += self._fatal(b"-ERR Line too long.\r\n", "line_too_long")
                break
            if end < 0:
                break
            line = bytes(self._buf[:end]).removesuffix(b"\r")
            del self._buf[:end + 1]
            out += self._sasl_line(line) if self._state == "sasl" else self._command(line)
        return out

    def _fatal(self, text: bytes, reason: str) -> list[Event]:
        self._state = "closed"
        self._buf.clear()
        return [Send(text), Close(reason)]

    def _junk_reply(self, reply: bytes) -> list[Event]:
        """A command that does nothing toward a login (CAPA, AUTH listing): counted."""
        self._junk += 1
        if self._junk > self.max_junk:
            return self._fatal(b"-ERR Too many commands without logging in.\r\n", "junk")
        return [Send(reply)]

    def _err(self, text: bytes) -> list[Event]:
        self._bad += 1
        if self._bad >= self.max_bad:
            self._state = "closed"
            self._buf.clear()
            return [Send(b"-ERR " + text + b" Too many invalid commands.\r\n"),
                    Close("bad_input")]
        return [Send(b"-ERR " + text + b"\r\n")]

    def _command(self, line: bytes) -> list[Event]:
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if _HTTP.match(line):
            return self._fatal(b"-ERR This is a POP3 server.\r\n", "not_protocol")
        if verb == b"CAPA" and not arg:
            body = "".join(f"{c}\r\n" for c in self.capabilities())
            return self._junk_reply(f"+OK Capability list follows\r\n{body}.\r\n".encode())
        if verb == b"QUIT" and not arg:
            self._state = "closed"
            return [Send(b"+OK Logging out.\r\n"), Close("logout")]
        if verb == b"STLS" and not arg:
            if self.tls_mode != "starttls" or self.tls_active:
                return self._err(b"STLS not available.")
            self._state = "tls"
            self._buf.clear()                       # the STARTTLS-injection class: drop it
            return [Send(b"+OK Begin TLS negotiation now.\r\n"), StartTls()]
        if verb in (b"USER", b"PASS", b"AUTH") and not self._login_allowed:
            if verb == b"AUTH" and not arg:
                return self._junk_reply(b"+OK\r\n.\r\n")
            return [Send(b"-ERR [AUTH] Plaintext authentication disallowed on non-secure "
                         b"connections; use STLS.\r\n")]
        try:
            if verb == b"USER" and arg:
                user = decode_text(arg)
                if not is_clean_name(user):
                    return self._err(b"Invalid user name.")
                self._user = user
                return [Send(b"+OK\r\n")]
            if verb == b"PASS" and arg:
                if not self._user:
                    return self._err(b"No user name given.")
                user, self._user = self._user, ""
                return self._login(user, decode_text(arg), "user")
            if verb == b"AUTH":
                return self._auth(arg)
        except SaslError as exc:
            return self._err(f"Invalid credentials: {exc}.".encode())
        return self._err(b"Command not allowed before login.")

    def _login(self, user: str, password: str, mechanism: str) -> list[Event]:
        if not (user and password and is_clean_name(user) and is_clean(password)):
            return self._err(b"Empty or invalid user name or password.")
        self._state = "login"
        return [Login(user=user, password=Secret(password), mechanism=mechanism)]

    def _auth(self, arg: bytes) -> list[Event]:
        if not arg:
            return self._junk_reply(b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n")
        mech, _, initial = arg.partition(b" ")
        mech = mech.upper()
        if mech not in (b"PLAIN", b"LOGIN"):
            return [Send(b"-ERR Unsupported authentication mechanism.\r\n")]
        self._sasl_mech, self._sasl_user = mech.decode(), ""
        self._state = "sasl"
        if initial:
            return self._sasl_line(initial)
        return [Send(b"+ \r\n" if mech == b"PLAIN" else b"+ " + LOGIN_USER_PROMPT + b"\r\n")]

    def _sasl_line(self, line: bytes) -> list[Event]:
        if line.strip() == b"*":
            self._state = "command"
            return [Send(b"-ERR Authentication canceled.\r\n")]
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
        except SaslError as exc:
            self._state = "command"
            return self._err(f"Invalid authentication data: {exc}.".encode())
