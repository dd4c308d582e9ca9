"""DKIM test fixtures: test keys and a dnsmasq serving their records."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.config.schema import HostPort
from relay.dkim.keys import DkimKey, DkimKeys, generate
from relay.dkim.sign import Signer
from relay.dns import Resolver
from tests.peers import need
from tests.peers.dnsmasq import Zone, dnsmasq

HERE = Path(__file__).parent


@dataclass
class KeySet:
    rsa: DkimKey
    ed: DkimKey
    other_rsa: DkimKey          # published under a selector, but not what signs


@pytest.fixture(scope="session")
def keyset() -> KeySet:
    return KeySet(
        rsa=DkimKey("example.com", "rsa2026", "rsa-sha256", generate("rsa")),
        ed=DkimKey("example.com", "ed2026", "ed25519-sha256", generate("ed25519")),
        other_rsa=DkimKey("example.com", "stale", "rsa-sha256", generate("rsa")),
    )


@pytest.fixture
def dns(tmp_path: Path, keyset: KeySet) -> Iterator[HostPort]:
    zone = Zone(domains=["example.com"], txt={
        keyset.rsa.record_name: keyset.rsa.record(),
        keyset.ed.record_name: keyset.ed.record(),
        # a record that does not match the key that signs with selector "stale"
        keyset.other_rsa.record_name: keyset.rsa.record(),
    })
    with dnsmasq(tmp_path, zone) as hp:
        yield hp


@pytest.fixture
def resolver(dns: HostPort) -> Resolver:
    return Resolver(servers=[dns], timeout=3.0)


def signer(*keys: DkimKey) -> Signer:
    return Signer(DkimKeys(keys))


def perl_verify(data: bytes, dns: HostPort) -> list[tuple[str, str, str]]:
    """Mail::DKIM's verdicts: (result, domain, selector) per signature."""
    need("perl")
    proc = subprocess.run(["perl", str(HERE / "verify_dkim.pl"), dns.host, str(dns.port)],
                          input=data, capture_output=True, timeout=60, check=True)
    out = []
    for line in proc.stdout.decode().splitlines():
        parts = line.split()
        if parts and parts[0] != "none":
            out.append((parts[0], parts[1], parts[2]))
    return out


def dkimpy_verify(data: bytes, resolver: Resolver) -> list[bool]:
    """dkimpy's own verifier (with PyNaCl for Ed25519), keys from the dnsmasq zone."""
    import dkim

    d = dkim.DKIM(data)
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    out = []
    for i in range(count):
        try:
            out.append(bool(d.verify(idx=i, dnsfunc=resolver.dkim_txt)))
        except dkim.ValidationError:        # dkimpy raises on a body hash mismatch
            out.append(False)
    return out
