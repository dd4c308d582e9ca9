"""Reads when the certificates in a PEM file expire, for the TLS-expiry metric and alerts.

The metric reports the soonest ``notAfter`` of every certificate in the file: the leaf
and any intermediates served with it. Clients refuse the chain as soon as any of them
expires, so that is the date the operator must act before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509

from relay.config.schema import ListenerConfig
from relay.errors import ConfigError
from relay.metrics import Metrics


def pem_expiry(data: bytes, *, source: str = "<pem>") -> float:
    """The soonest expiry (Unix time) of the certificates in PEM ``data``."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(
            f"no readable certificate ({exc})", file=source,
            hint="the file must hold PEM certificates (-----BEGIN CERTIFICATE-----), "
                 "leaf first; check `openssl x509 -in FILE -noout -enddate`") from None
    return min(c.not_valid_after_utc.timestamp() for c in certs)


def certificate_expiry(path: Path) -> float:
    """The soonest expiry (Unix time) of the certificates in the PEM file at ``path``.

    Blocking file I/O: from async code call it through ``asyncio.to_thread``.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read certificate: {exc.strerror or exc}", file=str(path),
            hint="check that the file exists and is readable by relay's user") from None
    return pem_expiry(data, source=str(path))


async def update_listener_expiry(metrics: Metrics, listeners: Iterable[ListenerConfig]) -> None:
    """Set ``relay_tls_certificate_expiry_timestamp_seconds`` for every listener with a cert.

    Call it at start and after each reload (certificates are re-read then). Listeners that
    no longer have a certificate lose their series; an unreadable file raises ConfigError.
    """
    wanted = {lc.name: lc.cert for lc in listeners if lc.cert is not None}
    expiries = {name: await asyncio.to_thread(certificate_expiry, path)
                for name, path in wanted.items()}
    gauge = metrics.tls_cert_expiry
    for name, when in expiries.items():
        gauge.labels(name).set(when)
    for (name,) in list(_label_values(metrics)):
        if name not in expiries:
            gauge.remove(name)


def _label_values(metrics: Metrics) -> list[tuple[str, ...]]:
    """The listener label values the TLS-expiry gauge currently exports."""
    out: list[tuple[str, ...]] = []
    for family in metrics.tls_cert_expiry.collect():
        for sample in family.samples:
            out.append((sample.labels["listener"],))
    return out
