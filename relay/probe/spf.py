"""Outbound SPF pre-flight: would mail from a sender domain pass SPF where relay sends it?

Used by ``relay spf check`` and at start-up (one warning per routed sender domain whose
SPF would fail). Providers are recognised by the upstream host: Office 365 / Outlook
(``include:spf.protection.outlook.com``) and Google (``include:_spf.google.com``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from relay.checks.spf import MAX_LOOKUPS, SpfResult, evaluate, resolver_lookup
from relay.config.schema import Config, UpstreamConfig
from relay.config.values import address_typo
from relay.dns import Resolver
from relay.errors import DnsError

log = logging.getLogger("relay.spf")

# An address in TEST-NET-2 (RFC 5737): matches no real record, so evaluating it walks the
# whole record and counts every DNS-mechanism lookup.
_PROBE_IP = "198.51.100.254"
FAILING = ("fail", "softfail", "permerror")
PROVIDERS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("office365.com", "outlook.com", "microsoft.com", "exchangelabs.com"),
     "spf.protection.outlook.com", "Microsoft 365 / Exchange Online"),
    (("gmail.com", "google.com", "googlemail.com"), "_spf.google.com", "Google Workspace"),
)


def provider_include(host: str) -> tuple[str, str] | None:
    """(include domain, provider name) for an upstream host, or None if not recognised."""
    h = host.lower().rstrip(".")
    for suffixes, include, name in PROVIDERS:
        if any(h == s or h.endswith("." + s) for s in suffixes):
            return include, name
    return None


@dataclass
class Preflight:
    """What ``relay spf check`` prints; ``ok`` decides the exit code."""

    domain: str
    record: str | None = None
    lookups: int = 0
    probe: SpfResult | None = None
    ips: dict[str, SpfResult] = field(default_factory=dict)
    provider: str = ""
    include: str = ""
    include_found: bool | None = None
    problems: list[str] = field(default_factory=list)      # mail would fail: exit 1
    warnings: list[str] = field(default_factory=list)
    temporary: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def spf_record(resolver: Resolver, domain: str) -> str | None:
    records = [r for r in resolver.txt(domain) if r.lower().startswith(b"v=spf1")
               and (len(r) == 6 or r[6:7] == b" ")]
    if len(records) > 1:
        raise ValueError(f"{domain} publishes {len(records)} SPF records (a permerror)")
    return records[0].decode("utf-8", "replace") if records else None


def includes(resolver: Resolver, domain: str, target: str, *, budget: int = 20) -> bool:
    """Whether ``domain``'s SPF reaches ``include:target`` (or redirect=), recursively."""
    seen: set[str] = set()
    todo = [domain.lower()]
    while todo and budget > 0:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        budget -= 1
        record = spf_record(resolver, name)
        for term in (record or "").split()[1:]:
            t = term.lstrip("+-~?").lower()
            for prefix in ("include:", "redirect="):
                if t.startswith(prefix):
                    ref = t[len(prefix):].rstrip(".")
                    if ref == target:
                        return True
                    if "%" not in ref:
                        todo.append(ref)
    return False


def preflight(resolver: Resolver, domain: str, *, ips: tuple[str, ...] = (),
              upstream: UpstreamConfig | None = None) -> Preflight:
    """Check ``domain`` (blocking: DNS). Problems make ``ok`` False."""
    pf = Preflight(domain=domain.lower().rstrip("."))
    lookup = resolver_lookup(resolver)
    sender = f"postmaster@{pf.domain}"
    try:
        pf.record = spf_record(resolver, pf.domain)
    except ValueError as exc:
        pf.problems.append(str(exc))
        return pf
    except DnsError as exc:
        pf.temporary = True
        pf.problems.append(f"could not look up SPF for {pf.domain}: {exc}")
        return pf
    pf.problems.extend(record_typos(pf.record or ""))
    if pf.record is None:
        pf.warnings.append(f"{pf.domain} publishes no SPF record: receivers get spf=none "
                           "and DMARC relies on DKIM alone")
    else:
        pf.probe = evaluate(_PROBE_IP, sender, pf.domain, lookup=lookup,
                            timeout=resolver.timeout)
        pf.lookups = pf.probe.lookups
        if pf.probe.result == "permerror":
            pf.problems.append(f"the record is broken (permerror): {pf.probe.explanation}")
        elif pf.probe.result == "temperror":
            pf.temporary = True
            pf.problems.append("DNS failed while evaluating the record (temperror)")
    for ip in ips:
        r = evaluate(ip, sender, pf.domain, lookup=lookup, timeout=resolver.timeout)
        pf.ips[ip] = r
        if r.result in FAILING or r.result == "temperror":
            pf.problems.append(f"{ip} gets spf={r.result}")
            pf.temporary = pf.temporary or r.result == "temperror"
    if upstream is not None and upstream.host:
        found = provider_include(upstream.host)
        if found is not None and pf.record is not None:
            pf.include, pf.provider = found
            try:
                pf.include_found = includes(resolver, pf.domain, pf.include)
            except (DnsError, ValueError) as exc:
                pf.problems.append(f"could not follow the includes: {exc}")
            if pf.include_found is False:
                all_q = _all_qualifier(pf.record)
                pf.problems.append(
                    f"upstream {upstream.name} sends through {pf.provider}, but the record "
                    f"does not include:{pf.include}; mail would get spf={all_q}")
        elif found is None and not ips:
            pf.warnings.append(f"upstream {upstream.name} ({upstream.host}) is not a known "
                               "provider: give its sending addresses with --ip")
    return pf


def record_typos(record: str) -> list[str]:
    """The ip4:/ip6: terms of a published record written the way vendor pages and input
    methods lead people to (commas, full-width characters, two addresses in one term),
    each with the terms to publish instead; receivers read them as a permerror."""
    out = []
    for term in record.split()[1:]:
        qualifier = term[0] if term[0] in "+-~?" else ""
        mech, sep, value = term[len(qualifier):].partition(":")
        if mech.lower() not in ("ip4", "ip6") or not sep:
            continue
        typo = address_typo(value)
        if typo is not None:
            fixed = " ".join(f"{qualifier}{mech}:{f}" for f in typo.fixed)
            out.append(f'the record says "{term}" ({typo.what}): publish "{fixed}" instead')
    return out


def _all_qualifier(record: str) -> str:
    for term in record.split()[1:]:
        if term.lower().lstrip("+-~?") == "all":
            return {"-": "fail", "~": "softfail", "?": "neutral"}.get(term[0], "pass")
        if term.lower().startswith("redirect="):
            return "whatever the redirect target says"
    return "neutral"


def routed_domains(config: Config) -> list[tuple[str, UpstreamConfig]]:
    """(sender domain, upstream) of every route naming a sender domain (wildcards: base),
    and of every DKIM signing domain no such route names (via ``default_upstream``)."""
    out: list[tuple[str, UpstreamConfig]] = []
    named: set[str] = set()
    for route in config.routes:
        if route.sender_domain:
            domain = route.sender_domain.removeprefix("*.").lower()
            named.add(domain)
            try:
                out.append((domain, config.upstream(route.upstream)))
            except KeyError:
                continue
    default = config.relay.default_upstream
    for key in config.dkim:
        domain = key.domain.lower().rstrip(".")
        if domain in named or default is None:
            continue
        named.add(domain)
        try:
            out.append((domain, config.upstream(default)))
        except KeyError:
            continue
    return out


async def warn_failing_domains(config: Config, resolver: Resolver, *,
                               logger: logging.Logger | None = None) -> list[Preflight]:
    """Start-up check: a warning for each routed sender domain whose SPF would fail."""
    lg = logger or log
    failing = []
    for domain, upstream in routed_domains(config):
        pf = await asyncio.to_thread(preflight, resolver, domain, upstream=upstream)
        if not pf.ok:
            failing.append(pf)
            lg.warning("SPF for sender domain %s via upstream %s would fail: %s "
                       "(check with: relay spf check %s --upstream %s)", domain,
                       upstream.name, "; ".join(pf.problems), domain, upstream.name)
    return failing


__all__ = ["MAX_LOOKUPS", "Preflight", "preflight", "provider_include", "routed_domains",
           "warn_failing_domains"]
