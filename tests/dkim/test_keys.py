"""Loading [[dkim]] keys: every bad key is a config error naming the file and the entry."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from relay.config.schema import DkimKeyConfig
from relay.dkim.keys import (
    generate,
    load_keys,
    private_pem,
    public_b64,
    txt_record,
    write_private_key,
    zone_line,
    zone_strings,
)
from relay.errors import ConfigError

pytestmark = pytest.mark.fast


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
        fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def cfg(path: Path, algorithm: str = "rsa-sha256", line: int = 12) -> DkimKeyConfig:
    return DkimKeyConfig(domain="Example.COM", selector="s1", key_file=path,
                         algorithm=algorithm, line=line)  # type: ignore[arg-type]


def test_loads_rsa_pkcs1_pkcs8_and_ed25519(tmp_path: Path) -> None:
    r = tmp_path / "rsa.pem"
    r.write_bytes(pem(generate("rsa"), serialization.PrivateFormat.TraditionalOpenSSL))
    e = tmp_path / "ed.pem"
    e.write_bytes(pem(generate("ed25519")))
    seed = tmp_path / "ed.key"        # dkimpy's dknewkey format: base64 of the 32-byte seed
    seed.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    keys = load_keys([cfg(r), cfg(e, "ed25519-sha256"),
                      DkimKeyConfig("example.com", "s2", seed, "ed25519-sha256")])
    assert len(keys) == 3
    assert [k.selector for k in keys.for_domain("EXAMPLE.com.")] == ["s1", "s1", "s2"]
    assert keys.domains() == {"example.com"}


@pytest.mark.parametrize(("content", "algorithm", "words"), [
    (None, "rsa-sha256", ["does not exist", "relay dkim keygen"]),
    (b"not a key", "rsa-sha256", ["not usable"]),
    ("rsa1024", "rsa-sha256", ["RSA-1024", "at least 2048"]),
    ("ec", "rsa-sha256", ["type EC", "RSA or Ed25519"]),
    ("ed", "rsa-sha256", ["Ed25519 key but algorithm is rsa-sha256"]),
    ("rsa", "ed25519-sha256", ["RSA key but algorithm is ed25519-sha256"]),
    ("encrypted", "rsa-sha256", ["passphrase"]),
    ("dir", "rsa-sha256", ["cannot be read"]),
])
def test_bad_keys_are_config_errors(tmp_path: Path, content: object, algorithm: str,
                                    words: list[str]) -> None:
    path = tmp_path / "key.pem"
    if content == "rsa1024":
        path.write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    elif content == "ec":
        path.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    elif content == "ed":
        path.write_bytes(pem(generate("ed25519")))
    elif content == "rsa":
        path.write_bytes(pem(generate("rsa")))
    elif content == "encrypted":
        path.write_bytes(generate("rsa").private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw")))
    elif content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_keys([cfg(path, algorithm)])
    text = info.value.explain()
    assert str(path) in text
    assert ":12:" in text and "domain=Example.COM selector=s1" in text
    for w in words:
        assert w in text
    assert info.value.hint


def test_duplicate_entry_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(private_pem(generate("rsa")))
    with pytest.raises(ConfigError, match="configured twice"):
        load_keys([cfg(path), cfg(path, line=20)])


def test_write_private_key_is_0600_and_refuses_overwrite(tmp_path: Path) -> None:
    key = generate("ed25519")
    path = tmp_path / "new.pem"
    write_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_private_key(key, path)


def test_records() -> None:
    ed = generate("ed25519")
    assert txt_record(ed).startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(public_b64(ed))) == 32
    r = generate("rsa")
    value = txt_record(r)
    assert value.startswith("v=DKIM1; k=rsa; p=MIIB")
    parts = zone_strings(value)
    assert "".join(parts) == value and all(len(p) <= 255 for p in parts) and len(parts) == 2
    line = zone_line("s._domainkey.example.com", value)
    assert line.startswith('s._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p=')
