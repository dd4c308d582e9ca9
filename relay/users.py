"""The users file: relay's own SMTP AUTH and proxy users (scrypt hashes), re-read on change.

The users file holds one ``name:hash`` per line (``#`` comments and blank lines allowed),
where hash is ``$scrypt$n=16384,r=8,p=1$<salt>$<key>`` (standard base64), made by
``relay user add``. An optional third field lists what the user owns for sender
ownership: ``name:hash:alice@example.com,example.org,*.example.net`` (addresses,
domains, ``*.``-subdomains; ``relay user add NAME --owns ...``). Passwords are checked
off the event loop with a constant-time compare; an unknown user costs the same scrypt as
a known one. The file is re-read when it changes, so ``relay user add`` takes effect
without a reload (a missing file means no users yet).
A file that every user may read is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from relay.atomicfile import replace_file
from relay.config.values import OWNED_EXPECTED, is_owned
from relay.errors import ConfigError

log = logging.getLogger("relay.smtp")

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_KEY_LEN = 32
_MAXMEM = 64 * 1024 * 1024
_USERS_HINT = ("each line is NAME:HASH or NAME:HASH:OWNED,...; create entries with "
               "`relay user add NAME`")


def valid_name(name: str) -> bool:
    return (0 < len(name) <= 256 and name.isprintable() and ":" not in name
            and not any(c.isspace() for c in name))


def hash_password(password: bytes, *, n: int = SCRYPT_N, r: int = SCRYPT_R,
                  p: int = SCRYPT_P) -> str:
    """A ``$scrypt$`` hash of ``password`` with a fresh random salt (CPU-heavy: ~0.1 s)."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=_KEY_LEN, maxmem=_MAXMEM)
    b64 = base64.b64encode
    return f"$scrypt$n={n},r={r},p={p}${b64(salt).decode()}${b64(key).decode()}"


@dataclass(frozen=True, slots=True)
class _Hash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _parse_hash(text: str) -> _Hash:
    parts = text.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "scrypt":
        raise ValueError("not a $scrypt$ hash")
    try:
        opts = dict(kv.split("=", 1) for kv in parts[2].split(","))
        n, r, p = int(opts["n"]), int(opts["r"]), int(opts["p"])
        salt = base64.b64decode(parts[3], validate=True)
        key = base64.b64decode(parts[4], validate=True)
    except (KeyError, ValueError, binascii.Error):
        raise ValueError("malformed $scrypt$ hash") from None
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or 128 * r * n > _MAXMEM:
        raise ValueError("scrypt parameters out of range")
    if len(salt) < 8 or len(key) < 16:
        raise ValueError("salt or key too short")
    return _Hash(n, r, p, salt, key)


def verify_hash(stored: str, password: bytes) -> bool:
    """Check ``password`` against a stored hash (blocking: call it in a thread)."""
    h = _parse_hash(stored)
    key = hashlib.scrypt(password, salt=h.salt, n=h.n, r=h.r, p=h.p, dklen=len(h.key),
                         maxmem=_MAXMEM)
    return hmac.compare_digest(key, h.key)


# Checked when the user is unknown, so that costs the same time as a known user.
_DUMMY = (f"$scrypt$n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}$"
          f"{base64.b64encode(bytes(16)).decode()}${base64.b64encode(bytes(32)).decode()}")


def read_users(path: Path) -> dict[str, str]:
    """Parse a users file into name → hash; ConfigError (file:line) on any bad line."""
    return {name: hashed for name, (hashed, _owns) in read_entries(path).items()}


def read_entries(path: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Parse a users file into name → (hash, owned addresses and domains)."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read users file ({exc.strerror})", file=str(path),
                          hint="create it with `relay user add NAME`, readable by relay"
                          ) from None
    if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError("users file is readable or writable by every user", file=str(path),
                          got=oct(st.st_mode & 0o777), expected="mode 0600 (or 0640)",
                          hint=f"run: chmod 600 {path}")
    users: dict[str, tuple[str, tuple[str, ...]]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        hashed, _, owned = rest.partition(":")
        if not sep or not valid_name(name):
            raise ConfigError("not a NAME:HASH line", file=str(path), line=lineno,
                              hint=_USERS_HINT)
        try:
            _parse_hash(hashed)
        except ValueError as exc:
            raise ConfigError(f"user {name!r}: {exc}", file=str(path), line=lineno,
                              hint=f"set the password again with `relay user add {name}`"
                              ) from None
        if name in users:
            raise ConfigError(f"user {name!r} listed twice", file=str(path), line=lineno,
                              hint="remove one of the lines")
        owns = parse_owns(owned)
        for item in owns:
            if not is_owned(item):
                raise ConfigError(f"user {name!r}: cannot own {item!r}", file=str(path),
                                  line=lineno, expected=OWNED_EXPECTED,
                                  hint=f"fix it with `relay user add {name} --owns ...`")
        users[name] = (hashed, owns)
    return users


def parse_owns(text: str) -> tuple[str, ...]:
    """``"a@example.com, example.org"`` → ``("a@example.com", "example.org")``."""
    return tuple(dict.fromkeys(p.strip().lower() for p in text.replace(" ", ",").split(",")
                               if p.strip()))


def write_users(path: Path, users: dict[str, str],
                owns: dict[str, tuple[str, ...]] | None = None) -> None:
    """Atomically replace the users file (fsynced; mode 0600, or 0640 if it was group-readable).

    An existing file's owner and group are kept, so a file made readable by relay's
    service user stays readable after root edits it. ``owns`` gives each user's owned
    addresses and domains (the optional third field).
    """
    mode, owner = 0o600, None
    try:
        st = path.stat()
        mode |= st.st_mode & stat.S_IRGRP
        owner = (st.st_uid, st.st_gid)
    except FileNotFoundError:
        pass
    owned = owns or {}
    body = "".join(f"{name}:{hashed}" + (f":{','.join(owned[name])}" if owned.get(name) else "")
                   + "\n" for name, hashed in users.items())
    replace_file(path, body.encode("utf-8"), mode=mode, owner=owner)


class UserDB:
    """The listener's users: checked off the loop, re-read when the file changes."""

    def __init__(self, path: Path, users: dict[str, str] | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}
        self._owns: dict[str, tuple[str, ...]] = {}
        if users is None:
            self._reload_if_changed(force=True)
        else:
            self._users = dict(users)

    @classmethod
    def load(cls, path: Path) -> UserDB:
        """Read and validate the file now (start-up and reload): ConfigError if bad."""
        return cls(path)

    def names(self) -> list[str]:
        return sorted(self._users)

    def owns(self, name: str) -> tuple[str, ...]:
        """What ``name`` may send as (third field), as of the last read of the file.

        The file is re-read at each login (``verify_sync``, off the loop), so this never
        touches the disk and sees what the session's own AUTH saw.
        """
        return self._owns.get(name, ())

    def _reload_if_changed(self, *, force: bool = False) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:              # nobody can log in until `relay user add`
            self._users, self._owns, self._stamp = {}, {}, None
            return
        except OSError:
            if force:
                read_users(self.path)          # raises the operator-facing error
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if not force and stamp == self._stamp:
            return
        with self._lock:
            entries = read_entries(self.path)
            self._users = {name: hashed for name, (hashed, _) in entries.items()}
            self._owns = {name: owns for name, (_, owns) in entries.items() if owns}
            self._stamp = stamp

    def verify_sync(self, name: str, password: bytes) -> bool:
        """Blocking check (scrypt); use ``await asyncio.to_thread(db.verify_sync, ...)``."""
        try:
            self._reload_if_changed()
        except ConfigError as exc:              # keep the last good list
            log.warning("users file changed but is not usable; keeping the previous "
                        "users: %s", exc.explain())
        stored = self._users.get(name)
        ok = verify_hash(stored or _DUMMY, password)
        return ok and stored is not None
