"""DKIM keys: load and validate every [[dkim]] key, generate new ones, render DNS records."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.config.schema import DkimKeyConfig
from relay.errors import ConfigError

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
MIN_RSA_BITS = 2048


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One loaded signing key for ``selector._domainkey.domain``."""

    domain: str
    selector: str
    algorithm: Algorithm
    private: PrivateKey
    key_file: Path | None = None
    line: int = 0

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def public_b64(self) -> str:
        return public_b64(self.private)

    def record(self) -> str:
        """The TXT record value to publish, e.g. ``v=DKIM1; k=rsa; p=MIIB...``."""
        return txt_record(self.private)


class DkimKeys:
    """Every configured key, by (lower-case) domain; a domain may have several (dual-sign)."""

    def __init__(self, keys: Sequence[DkimKey] = ()) -> None:
        self._keys = tuple(keys)
        self._by_domain: dict[str, tuple[DkimKey, ...]] = {}
        for k in self._keys:
            d = k.domain.lower().rstrip(".")
            self._by_domain[d] = (*self._by_domain.get(d, ()), k)

    def for_domain(self, domain: str) -> tuple[DkimKey, ...]:
        return self._by_domain.get(domain.lower().rstrip("."), ())

    def domains(self) -> frozenset[str]:
        return frozenset(self._by_domain)

    def __iter__(self) -> Iterator[DkimKey]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def public_b64(key: PrivateKey) -> str:
    """The ``p=`` value: SubjectPublicKeyInfo DER for RSA, the raw 32 bytes for Ed25519."""
    pub = key.public_key()
    if isinstance(pub, ed25519.Ed25519PublicKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = pub.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def txt_record(key: PrivateKey) -> str:
    k = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"
    return f"v=DKIM1; k={k}; p={public_b64(key)}"


def zone_strings(value: str, size: int = 255) -> list[str]:
    """A TXT value split into the ≤255-character strings a zone file needs."""
    return [value[i:i + size] for i in range(0, len(value), size)] or [""]


def zone_line(name: str, value: str) -> str:
    """A zone-file line: ``name. IN TXT ( "part1" "part2" )``."""
    parts = " ".join(f'"{p}"' for p in zone_strings(value))
    return f"{name}. IN TXT ( {parts} )"


def _where(cfg: DkimKeyConfig) -> str:
    return f"[[dkim]] domain={cfg.domain} selector={cfg.selector}"


def _error(cfg: DkimKeyConfig, message: str, hint: str) -> ConfigError:
    return ConfigError(f"{_where(cfg)}: {message}", line=cfg.line or None,
                       key="dkim.key_file", hint=hint)


def parse_private_key(data: bytes) -> PrivateKey:
    """A PEM (PKCS#1 or PKCS#8) RSA/Ed25519 key, or dkimpy's base64 Ed25519 seed.

    Raises ValueError with a readable reason.
    """
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError as exc:
            raise ValueError("the key is encrypted with a passphrase") from exc
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"not a readable PEM private key ({exc})") from exc
        if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            kind = type(key).__name__.lstrip("_").replace("PrivateKey", "")
            raise ValueError(f"it holds a key of type {kind}; DKIM needs RSA or Ed25519")
        return key
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except ValueError:
        seed = b""
    if len(seed) == 32:
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    raise ValueError("neither a PEM private key nor a base64 Ed25519 seed")


def load_key(cfg: DkimKeyConfig) -> DkimKey:
    """Load and validate one [[dkim]] key; every failure is a ConfigError naming the file."""
    path = cfg.key_file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _error(cfg, f"key file {path} does not exist",
                     f"create it with: relay dkim keygen --domain {cfg.domain} "
                     f"--selector {cfg.selector} --out {path}") from None
    except OSError as exc:
        raise _error(cfg, f"key file {path} cannot be read ({exc.strerror})",
                     "make it readable by the user relay runs as (mode 0600)") from None
    try:
        key = parse_private_key(data)
    except ValueError as exc:
        raise _error(cfg, f"key file {path} is not usable: {exc}",
                     "give an unencrypted PEM private key (relay dkim keygen writes one)"
                     ) from None
    if cfg.algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise _error(cfg, f"key file {path} holds an Ed25519 key but algorithm is rsa-sha256",
                         'set algorithm = "ed25519-sha256" or point key_file at an RSA key')
        if key.key_size < MIN_RSA_BITS:
            raise _error(cfg, f"key file {path} is RSA-{key.key_size}; at least "
                         f"{MIN_RSA_BITS} bits are required",
                         "generate a new key with relay dkim keygen --bits 2048 and publish it")
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise _error(cfg, f"key file {path} holds an RSA key but algorithm is ed25519-sha256",
                     'set algorithm = "rsa-sha256" or point key_file at an Ed25519 key')
    return DkimKey(domain=cfg.domain.lower().rstrip("."), selector=cfg.selector,
                   algorithm=cfg.algorithm, private=key, key_file=path, line=cfg.line)


def load_keys(configs: Sequence[DkimKeyConfig]) -> DkimKeys:
    """Load every configured key (start-up and reload): the first problem is raised."""
    seen: set[tuple[str, str, str]] = set()
    keys = []
    for cfg in configs:
        ident = (cfg.domain.lower(), cfg.selector, cfg.algorithm)
        if ident in seen:
            raise _error(cfg, "the same domain, selector and algorithm is configured twice",
                         "remove the duplicate [[dkim]] entry")
        seen.add(ident)
        keys.append(load_key(cfg))
    return DkimKeys(keys)


def generate(algorithm: Literal["rsa", "ed25519"] = "rsa", bits: int = 2048) -> PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if bits < MIN_RSA_BITS:
        raise ValueError(f"RSA keys must have at least {MIN_RSA_BITS} bits")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private_key(key: PrivateKey, path: Path) -> None:
    """Write the key as PKCS#8 PEM, created 0600 (never world-readable, even briefly)."""
    data = private_pem(key)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
