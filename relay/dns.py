"""DNS lookups for SPF and DKIM through one resolver built from ``[relay] dns_servers``.

Everything here is blocking (dnspython's stub resolver) and is meant to run on a worker
thread; ``run`` and ``txt_async`` do that for callers on the event loop, on the
process's DNS pool (``lookup_pool``) when it is given one: a DNS server that stops
answering then ties up only those threads, never the ones that store and fsync mail.
pyspf and dkimpy are given this resolver's functions (``spf_lookup``, ``dkim_txt``),
never the system default.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from relay.config.schema import HostPort, RelaySection
from relay.errors import DnsError, RelayError

if TYPE_CHECKING:
    import dns.resolver

__all__ = ["DnsError", "Resolver", "lookup_pool"]

LOOKUP_THREADS = 16       # lookups mostly wait on the network: threads, not CPU
T = TypeVar("T")


def lookup_pool() -> ThreadPoolExecutor:
    """The worker threads for one process's DNS lookups (SPF, DKIM keys); shut it down at exit."""
    return ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="relay-dns")


class Resolver:
    """A stub resolver: the configured servers (or the system's), one overall timeout."""

    def __init__(self, *, servers: Sequence[HostPort] = (), timeout: float = 5.0,
                 cache_size: int = 10_000, executor: Executor | None = None) -> None:
        self.timeout = timeout
        self.servers = tuple(servers)
        self.executor = executor      # None: asyncio's default worker threads
        self._cache_size = cache_size
        self._addresses = [(_address(s), s.port) for s in servers]   # checked now
        # dnspython (about 5 MB of memory) is loaded at the first lookup: an SMTP listener
        # process without SPF never makes one.
        self._res: dns.resolver.Resolver | None = None
        self._making = threading.Lock()           # lookups run on several threads

    def _resolver(self) -> dns.resolver.Resolver:
        if self._res is not None:
            return self._res
        with self._making:
            if self._res is None:
                import dns.nameserver
                import dns.resolver

                if self._addresses:
                    res = dns.resolver.Resolver(configure=False)
                    res.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                       for host, port in self._addresses]
                else:
                    res = dns.resolver.Resolver(configure=True)
                res.timeout = self.timeout
                res.lifetime = self.timeout
                # honours each answer's TTL (and the SOA minimum for negative answers);
                # thread-safe
                res.cache = dns.resolver.LRUCache(self._cache_size) \
                    if self._cache_size else None
                self._res = res
            return self._res

    @classmethod
    def from_config(cls, relay: RelaySection, *, executor: Executor | None = None) -> Resolver:
        return cls(servers=relay.dns_servers, timeout=relay.dns_timeout, executor=executor)

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """Run a blocking function that does lookups (pyspf, dkimpy) on the DNS threads."""
        if self.executor is None:
            return await asyncio.to_thread(func, *args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(func, *args))

    def describe(self) -> str:
        """Which servers are asked, for error messages and ``relay spf check``."""
        if self.servers:
            return ", ".join(str(s) for s in self.servers)
        return "the system resolver (" + ", ".join(
            str(n) for n in self._resolver().nameservers) + ")"

    def resolve(self, name: str, rdtype: str, *, timeout: float | None = None) -> list[Any]:
        """The answer's rdata for ``name``/``rdtype``; ``[]`` for NXDOMAIN or no data.

        Raises ``DnsError`` when no server gave an answer in time (a temporary error).
        """
        import dns.exception
        import dns.resolver

        lifetime = self.timeout if timeout is None else min(timeout, self.timeout)
        try:
            answer = self._resolver().resolve(name, rdtype, lifetime=lifetime, search=False,
                                       raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.resolver.LifetimeTimeout as exc:
            raise DnsError(f"DNS lookup of {name} {rdtype} timed out after {lifetime:g}s "
                           f"asking {self.describe()}") from exc
        except dns.resolver.NoNameservers as exc:
            raise DnsError(f"DNS lookup of {name} {rdtype} failed: no server answered "
                           f"({self.describe()}): {exc}") from exc
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsError(f"DNS lookup of {name} {rdtype} failed: {exc}") from exc
        return list(answer)

    def txt(self, name: str, *, timeout: float | None = None) -> list[bytes]:
        """Every TXT record at ``name``, each with its strings joined (RFC 7208 3.3)."""
        return [b"".join(r.strings) for r in self.resolve(name, "TXT", timeout=timeout)]

    async def txt_async(self, name: str) -> list[bytes]:
        return await self.run(self.txt, name)

    # --- adapters for the libraries -------------------------------------------------

    def dkim_txt(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the first DKIM key record at ``name`` or None.

        A temporary failure raises ``dkim.DnsTimeoutError`` so dkimpy reports it as such.
        """
        import dkim

        qname = name.decode("ascii") if isinstance(name, bytes) else name
        try:
            records = self.txt(qname, timeout=timeout)
        except DnsError as exc:
            raise dkim.DnsTimeoutError(str(exc)) from exc
        for rec in records:
            if rec.startswith(b"v=DKIM1") or b"p=" in rec:
                return rec
        return records[0] if records else None

    def spf_lookup(self, name: str, qtype: str, strict: object = True,
                   timeout: float = 20) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's ``DNSLookup`` contract: ``[((name, type), value), ...]``.

        Values match pyspf's dnspython driver: addresses as text, MX as
        ``(preference, exchange)``, PTR as text without the root dot, TXT as the list of
        strings. Temporary failures raise ``spf.TempError``.
        """
        import spf

        try:
            rdatas = self.resolve(name, qtype, timeout=timeout)
        except DnsError as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        out: list[tuple[tuple[str, str], Any]] = []
        for r in rdatas:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), r.address))
            elif qtype == "MX":
                out.append(((name, qtype), (r.preference, r.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), r.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), list(r.strings)))
        return out


def _address(hp: HostPort) -> str:
    try:
        return str(ipaddress.ip_address(hp.host))
    except ValueError:
        raise RelayError(f"DNS server {hp} is not an IP address",
                         hint="give [relay] dns_servers as IP:port, e.g. 127.0.0.1:53") from None
