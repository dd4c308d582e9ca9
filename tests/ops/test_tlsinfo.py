"""Certificate expiry read from PEM files, and the per-listener TLS-expiry metric."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.config.schema import HostPort, ListenerConfig
from relay.errors import ConfigError
from relay.metrics import Metrics
from relay.ops.certexpiry import certificate_expiry, pem_expiry, update_listener_expiry

pytestmark = pytest.mark.fast


def self_signed(not_after: dt.datetime) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_after - dt.timedelta(days=30)).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_expiry_of_one_certificate(tmp_path: Path) -> None:
    when = dt.datetime(2031, 5, 17, 12, 0, 0, tzinfo=dt.UTC)
    path = tmp_path / "cert.pem"
    path.write_bytes(self_signed(when))
    assert certificate_expiry(path) == when.timestamp()


def test_chain_reports_the_soonest_expiry() -> None:
    leaf = dt.datetime(2032, 1, 1, tzinfo=dt.UTC)
    intermediate = dt.datetime(2030, 6, 1, tzinfo=dt.UTC)
    assert pem_expiry(self_signed(leaf) + self_signed(intermediate)) == intermediate.timestamp()


def test_trustme_chain_with_key_in_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test")
    path = tmp_path / "combined.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(path))
    leaf = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    assert certificate_expiry(path) <= leaf.not_valid_after_utc.timestamp()


@pytest.mark.parametrize(("content", "needle"), [
    (b"", "no readable certificate"),
    (b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
     "no readable certificate"),
])
def test_bad_pem_is_a_config_error_with_hint(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        certificate_expiry(path)
    assert str(info.value).startswith(f"{path}: {needle}")
    assert "openssl x509" in info.value.hint


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        certificate_expiry(tmp_path / "absent.pem")
    assert "cannot read certificate" in str(info.value) and "readable" in info.value.hint


def listener(name: str, cert: Path | None) -> ListenerConfig:
    return ListenerConfig(name=name, protocol="smtp", listen=HostPort("127.0.0.1", 2525),
                          tls="starttls" if cert else "none", cert=cert, key=cert)


def exported(m: Metrics) -> dict[str, float]:
    return {s.labels["listener"]: s.value
            for f in m.tls_cert_expiry.collect() for s in f.samples}


async def test_listener_metric_follows_reloads(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pem", tmp_path / "b.pem"
    ta, tb = dt.datetime(2030, 1, 1, tzinfo=dt.UTC), dt.datetime(2031, 1, 1, tzinfo=dt.UTC)
    a.write_bytes(self_signed(ta))
    b.write_bytes(self_signed(tb))
    m = Metrics()
    await update_listener_expiry(m, [listener("platform", a), listener("plain", None),
                                     listener("inbound", b)])
    assert exported(m) == {"platform": ta.timestamp(), "inbound": tb.timestamp()}
    # Reload: the certificate was renewed in place, one listener removed.
    renewed = dt.datetime(2033, 3, 3, tzinfo=dt.UTC)
    a.write_bytes(self_signed(renewed))
    await update_listener_expiry(m, [listener("platform", a)])
    assert exported(m) == {"platform": renewed.timestamp()}
    # A broken file fails the update and leaves the old values in place.
    a.write_bytes(b"garbage")
    with pytest.raises(ConfigError):
        await update_listener_expiry(m, [listener("platform", a)])
    assert exported(m) == {"platform": renewed.timestamp()}
