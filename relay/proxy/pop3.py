"""POP3 before login, sans-IO: relay's own greeting, CAPA, STLS, USER/PASS, AUTH, QUIT.

Bytes in, events out (``relay.proxy.events``). Lines are bounded by ``max_line``; what was
pipelined after STLS is dropped; after ``Login`` nothing more is parsed and the rest of
the buffer (``leftover()``) goes to the provider once the login succeeds.
"""

from __future__ import annotations

from relay.config.schema import Secret, TlsMode
from relay.proxy.events import Close, Event, Login, LoginFailure, Send, StartTls
from relay.sasl import (
    LOGIN_PASS_PROMPT,
    LOGIN_USER_PROMPT,
    SaslError,
    b64decode,
    decode_text,
    is_clean,
    parse_plain,
)


class Pop3PreAuth:
    """One client's POP3 conversation up to a successful login (RFC 1939, 2449, 5034)."""

    def __init__(self, *, tls_mode: TlsMode, tls_active: bool = False, max_line: int = 8192,
                 allow_plaintext_auth: bool = False, max_bad: int = 10) -> None:
        self.tls_mode = tls_mode
        self.tls_active = tls_active
        self.max_line = max_line
        self.allow_plaintext_auth = allow_plaintext_auth
        self.max_bad = max_bad
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
            end = self._buf.find(b"\n")
            if end < 0 or end > self.max_line:
                if end > self.max_line or len(self._buf) > self.max_line:
                    self._state = "closed"
                    self._buf.clear()
                    out += [Send(b"-ERR Line too long.\r\n"), Close("line_too_long")]
                break
            line = bytes(self._buf[:end]).removesuffix(b"\r")
            del self._buf[:end + 1]
            out += self._sasl_line(line) if self._state == "sasl" else self._command(line)
        return out

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
        if verb == b"CAPA" and not arg:
            body = "".join(f"{c}\r\n" for c in self.capabilities())
            return [Send(f"+OK Capability list follows\r\n{body}.\r\n".encode())]
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
                return [Send(b"+OK\r\n.\r\n")]
            return [Send(b"-ERR [AUTH] Plaintext authentication disallowed on non-secure "
                         b"connections; use STLS.\r\n")]
        try:
            if verb == b"USER" and arg:
                self._user = decode_text(arg)
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
        if not (user and password and is_clean(user) and is_clean(password)):
            return self._err(b"Empty or invalid user name or password.")
        self._state = "login"
        return [Login(user=user, password=Secret(password), mechanism=mechanism)]

    def _auth(self, arg: bytes) -> list[Event]:
        if not arg:
            return [Send(b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n")]
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
                if not self._sasl_user:
                    raise SaslError("empty user name")
                return [Send(b"+ " + LOGIN_PASS_PROMPT + b"\r\n")]
            self._state = "command"
            return self._login(self._sasl_user, decode_text(payload), "sasl-login")
        except SaslError as exc:
            self._state = "command"
            return self._err(f"Invalid authentication data: {exc}.".encode())
