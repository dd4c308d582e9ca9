"""A private dnsmasq on loopback serving test zones (TXT, A, AAAA, MX, PTR) for SPF/DKIM."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relay.config.schema import HostPort
from tests.peers import free_port, need, running, wait_for_port


@dataclass
class Zone:
    """Records to serve. Names are served authoritatively: anything else under
    ``domains`` is NXDOMAIN (so SPF void lookups are real)."""

    domains: Sequence[str]
    txt: Mapping[str, str | Sequence[str]] = field(default_factory=dict)
    a: Mapping[str, Sequence[str]] = field(default_factory=dict)      # name -> IPv4/IPv6
    mx: Mapping[str, Sequence[tuple[str, int]]] = field(default_factory=dict)
    ptr: Mapping[str, str] = field(default_factory=dict)             # IP -> name


def split_txt(value: str, size: int = 255) -> list[str]:
    """A long TXT value as the ≤255-character strings DNS carries."""
    return [value[i:i + size] for i in range(0, len(value), size)] or [""]


def _quote(s: str) -> str:
    if '"' in s or "\\" in s:
        raise ValueError(f"TXT text with quotes or backslashes is not supported: {s!r}")
    return f'"{s}"'


def dnsmasq_conf(zone: Zone) -> str:
    """The zone as dnsmasq config lines (a file, so quoted TXT strings keep commas)."""
    lines = [f"local=/{d}/" for d in zone.domains]
    for name, value in zone.txt.items():
        parts = split_txt(value) if isinstance(value, str) else list(value)
        lines.append(f"txt-record={name}," + ",".join(_quote(p) for p in parts))
    for name, ips in zone.a.items():
        lines += [f"host-record={name},{ip}" for ip in ips]
    for name, mxs in zone.mx.items():
        lines += [f"mx-host={name},{target},{pref}" for target, pref in mxs]
    for ip, name in zone.ptr.items():
        if ":" in ip:
            raise ValueError("IPv6 PTR records are not supported by this helper")
        rev = ".".join(reversed(ip.split("."))) + ".in-addr.arpa"
        lines.append(f"ptr-record={rev},{name}")
    return "\n".join(lines) + "\n"


def dnsmasq_args(conf: Path, host: str, port: int) -> list[str]:
    return [need("dnsmasq"), "--keep-in-foreground", "--no-resolv", "--no-hosts",
            "--no-poll", "--bind-interfaces", f"--listen-address={host}", f"--port={port}",
            "--pid-file=", "--user=root", "--log-facility=-", "--log-queries",
            "--cache-size=0", "--no-negcache", "--local-ttl=0", f"--conf-file={conf}"]


@contextlib.contextmanager
def dnsmasq(tmp: Path, zone: Zone, *, host: str = "127.0.0.1",
            port: int | None = None) -> Iterator[HostPort]:
    """Run dnsmasq for the ``with`` block; yields the address to give relay's resolver."""
    port = port or free_port(host)
    log = tmp / f"dnsmasq-{port}.log"
    conf = tmp / f"dnsmasq-{port}.conf"
    conf.write_text(dnsmasq_conf(zone))
    with running(dnsmasq_args(conf, host, port), log=log) as proc:
        wait_for_port(host, port, proc=proc, log=log)
        yield HostPort(host, port)


@contextlib.contextmanager
def silent_dns(host: str = "127.0.0.1") -> Iterator[HostPort]:
    """A UDP port that receives queries and never answers (a DNS timeout)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        yield HostPort(host, int(s.getsockname()[1]))
