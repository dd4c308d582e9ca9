"""SPF for inbound listeners: pyspf in strict RFC 7208 mode, on a thread, via relay's DNS.

``SpfChecker.check`` evaluates the MAIL FROM identity (or the HELO identity for the null
sender) and, for the log, the HELO identity; ``SpfChecker.apply`` turns the deciding result
into the listener's policy: ``reject`` refuses ``fail`` with ``550 5.7.23`` and defers a DNS
``temperror`` with ``451 4.4.3`` (never a 5xx); ``tag`` never refuses. Every accepted
message gets ``Received-SPF`` and ``Authentication-Results`` trace headers (RFC 7208 9.1,
RFC 8601, authserv-id = relay's hostname) in both modes.

``permerror`` (a broken record: more than 10 DNS-mechanism lookups, more than 2 void
lookups, syntax errors) is a choice RFC 7208 8.7 leaves to local policy, made per listener
with ``spf_permerror``: ``"tag"`` (the default) accepts and records it in the headers, the
log and the metric (it is the sending domain's own misconfiguration, common with stacked
``include:``s, and DMARC already treats it as "not pass"); ``"reject"`` refuses it under
``spf = "reject"`` with ``550 5.7.24`` (RFC 7372) and the reason.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from typing import Any, Literal

import spf

from relay.dns import Resolver
from relay.metrics import Metrics
from relay.verdict import Refusal

Result = Literal["pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"]
Identity = Literal["mailfrom", "helo"]
Lookup = Callable[[str, str, float], list[tuple[tuple[str, str], Any]]]
MAX_LOOKUPS = spf.MAX_LOOKUP
MAX_VOID = spf.MAX_VOID_LOOKUPS
OVERALL_TIMEOUT = 20.0          # RFC 7208 4.6.4: at least 20 s for the whole evaluation

log = logging.getLogger("relay.spf")


@dataclass(frozen=True, slots=True)
class SpfResult:
    """One identity's SPF outcome."""

    result: Result
    identity: Identity
    domain: str
    ip: str
    sender: str
    helo: str
    explanation: str = ""
    mechanism: str = ""
    lookups: int = 0
    void_lookups: int = 0


class _Query(spf.query):  # type: ignore[misc]
    """pyspf's query with its DNS driver replaced by relay's resolver (no module globals)."""

    def __init__(self, *args: Any, lookup: Lookup, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._lookup = lookup

    # Same algorithm as spf.query.dns (pyspf 2.0.14); only the driver call differs.
    def dns(self, name: str, qtype: str, cnames: dict[str, str] | None = None,
            ignore_void: bool = False) -> list[Any]:
        if not name:
            raise Exception("Invalid query")
        name = str(name)
        if name.endswith("."):
            name = name[:-1]
        if not reduce(lambda x, y: x and 0 < len(y) < 64, name.split("."), True):
            return []
        name = name.lower()
        result: list[Any] = self.cache.get((name, qtype), [])
        if result:
            return result
        cnamek = (name, "CNAME")
        cname = self.cache.get(cnamek)
        if cname:
            cname = cname[0]
        else:
            querytime: float = getattr(self, "querytime")  # noqa: B009 (untyped base)
            if querytime < 0:
                raise spf.TempError("DNS Error: exceeded max query lookup time")
            timeout = querytime if 0 < querytime < self.timeout else self.timeout
            then = time.monotonic()
            for k, v in self._lookup(name, qtype, timeout):
                k = (k[0].lower(), k[1])
                if k == cnamek:
                    cname = v
                    result = self.cache.get((cname, qtype), [])
                    if result:
                        break
                if k[1] == "CNAME" or (qtype, k[1]) in spf.query.SAFE2CACHE:
                    self.cache.setdefault(k, []).append(v)
            result = self.cache.get((name, qtype), [])
            if querytime > 0:
                self.querytime = querytime - (time.monotonic() - then)
        if not result and cname:
            if not cnames:
                cnames = {}
            elif len(cnames) >= spf.MAX_CNAME:
                raise spf.PermError(f"Length of CNAME chain exceeds {spf.MAX_CNAME}")
            cnames[name] = cname
            if cname.lower().rstrip(".") in cnames:
                if self.strict > 1:
                    raise spf.AmbiguityWarning("CNAME loop", cname)
            else:
                result = self.dns(cname, qtype, cnames=cnames)
                if result:
                    self.cache[(name, qtype)] = result
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


def evaluate(ip: str, sender: str, helo: str, *, lookup: Lookup, timeout: float,
             receiver: str = "", record: str | None = None,
             default_explanation: str | None = None) -> SpfResult:
    """Evaluate SPF (blocking: DNS). ``sender`` "" checks the HELO identity.

    ``record`` evaluates a given policy text instead of the domain's published one.
    """
    try:
        q = _Query(ip, sender, helo, receiver=receiver or None, strict=True,
                   timeout=timeout, querytime=max(timeout, OVERALL_TIMEOUT), lookup=lookup)
    except spf.PermError as exc:         # not an IP address at all
        return SpfResult(result="permerror", identity="mailfrom" if sender else "helo",
                         domain="", ip=ip, sender=sender, helo=helo, explanation=str(exc))
    if default_explanation is not None:
        q.set_default_explanation(default_explanation)
    res, _code, explanation = q.check(record)
    res = {"unknown": "permerror", "error": "temperror", "ambiguous": "permerror"}.get(res, res)
    mechanism = getattr(q, "mechanism", None) or ""
    return SpfResult(result=res, identity=q.ident, domain=q.o or "", ip=ip,
                     sender=q.s or "", helo=helo, explanation=str(explanation or ""),
                     mechanism=str(mechanism), lookups=q.lookups,
                     void_lookups=q.void_lookups)


def _late(ip: str, sender: str, helo: str, budget: float) -> SpfResult:
    """The temperror of an evaluation that outlived its budget."""
    domain = sender.rpartition("@")[2] if sender else helo
    return SpfResult(result="temperror", identity="mailfrom" if sender else "helo",
                     domain=domain, ip=ip, sender=sender, helo=helo,
                     explanation=f"DNS lookups did not finish in {budget:.0f} s")


def resolver_lookup(resolver: Resolver) -> Lookup:
    def lookup(name: str, qtype: str, timeout: float) -> list[tuple[tuple[str, str], Any]]:
        return resolver.spf_lookup(name, qtype, timeout=timeout)
    return lookup


# --- trace headers ------------------------------------------------------------------

_TOKEN = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~@\-]+$")


def _clean(text: str) -> str:
    return "".join(c if c.isprintable() and c not in "\r\n" else "?" for c in text)[:255]


def _quote(value: str) -> str:
    value = _clean(value)
    if value and _TOKEN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(r: SpfResult, receiver: str) -> str:
    who = r.domain or r.helo
    text = {
        "pass": f"domain of {who} designates {r.ip} as permitted sender",
        "fail": f"domain of {who} does not designate {r.ip} as permitted sender",
        "softfail": f"transitioning domain of {who} does not designate {r.ip} as permitted "
                    "sender",
        "neutral": f"{r.ip} is neither permitted nor denied by domain of {who}",
        "none": f"{who} does not publish SPF",
        "permerror": f"permanent error in processing domain of {who}: {r.explanation}",
        "temperror": f"temporary error in processing during lookup of {who}",
    }[r.result]
    return _clean(f"{receiver}: {text}").replace("(", "[").replace(")", "]")


def received_spf(r: SpfResult, receiver: str, linesep: bytes = b"\r\n") -> bytes:
    """``Received-SPF:`` (RFC 7208 9.1), folded, with its line end."""
    parts = [f"client-ip={r.ip};"]
    if r.identity == "mailfrom":
        parts.append(f"envelope-from={_quote(r.sender)};")
    parts.append(f"helo={_quote(r.helo)};")
    if r.mechanism:
        parts.append(f"mechanism={_quote(r.mechanism)};")
    parts += [f"receiver={_quote(receiver)};", f"identity={r.identity}"]
    return _fold(f"Received-SPF: {r.result} ({_comment(r, receiver)})", parts, linesep)


def authentication_results(r: SpfResult, authserv_id: str,
                           linesep: bytes = b"\r\n") -> bytes:
    """``Authentication-Results:`` (RFC 8601) with the spf result for the checked identity."""
    prop = (f"smtp.mailfrom={_quote(r.sender)}" if r.identity == "mailfrom"
            else f"smtp.helo={_quote(r.helo)}")
    reason = f" reason={_quote(r.explanation)}" if r.result == "permerror" else ""
    return _fold(f"Authentication-Results: {_quote(authserv_id)};",
                 [f"spf={r.result}{reason}", prop], linesep)


def _fold(first: str, parts: list[str], linesep: bytes) -> bytes:
    """Fold at the spaces between words (FWS is allowed in comments too), ≤ 78 columns."""
    words = first.split(" ")
    lines = [words[0]]
    for p in [*words[1:], *parts]:
        if len(lines[-1]) + 1 + len(p) > 76:
            lines.append("\t" + p)
        else:
            lines[-1] += " " + p
    return (linesep.decode().join(lines) + linesep.decode()).encode("utf-8", "replace")


# --- the listener's check -----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SpfVerdict:
    """What the pipeline does: ``refusal`` (raise it) or ``headers`` to prepend."""

    mailfrom: SpfResult | None
    helo: SpfResult | None
    refusal: Refusal | None
    headers: bytes = b""

    @property
    def deciding(self) -> SpfResult | None:
        return self.mailfrom or self.helo


class SpfChecker:
    """Evaluates SPF for one listener's policy (``off``, ``tag``, ``reject``)."""

    def __init__(self, *, resolver: Resolver, hostname: str,
                 metrics: Metrics | None = None) -> None:
        self.resolver = resolver
        self.hostname = hostname
        self._metrics = metrics
        self._lookup = resolver_lookup(resolver)

    def evaluate(self, ip: str, sender: str, helo: str) -> SpfResult:
        return evaluate(ip, sender, helo, lookup=self._lookup, timeout=self.resolver.timeout,
                        receiver=self.hostname)

    async def check(self, *, ip: str, sender: str, helo: str) -> tuple[SpfResult | None,
                                                                        SpfResult | None]:
        """(MAIL FROM result or None for the null sender, HELO result or None).

        Both identities are evaluated at once on the resolver's DNS threads; past the
        overall budget (RFC 7208 4.6.4, plus one lookup) the answer is ``temperror``
        whatever the threads are still waiting for.
        """
        helo_ok = "." in helo and not helo.startswith("[")
        senders = ([sender] if sender else []) + ([""] if helo_ok else [])
        budget = max(self.resolver.timeout, OVERALL_TIMEOUT) + self.resolver.timeout
        try:
            async with asyncio.timeout(budget):
                results = await asyncio.gather(*(
                    self.resolver.run(self.evaluate, ip, s, helo) for s in senders))
        except TimeoutError:
            log.warning("spf: lookups for %s did not finish in %.0f s: temperror",
                        sender or helo, budget)
            results = [_late(ip, s, helo, budget) for s in senders]
        mf = results[0] if sender else None
        hr = results[-1] if helo_ok else None
        return mf, hr

    async def verdict(self, policy: Literal["off", "tag", "reject"], *, ip: str, sender: str,
                      helo: str, listener: str = "", linesep: bytes = b"\r\n",
                      permerror: Literal["tag", "reject"] = "tag") -> SpfVerdict:
        if policy == "off":
            return SpfVerdict(None, None, None)
        mf, hr = await self.check(ip=ip, sender=sender, helo=helo)
        deciding = mf or hr
        if deciding is None:           # null sender and no usable HELO name
            return SpfVerdict(None, None, None)
        if self._metrics is not None:
            self._metrics.spf_results.labels(listener=listener, result=deciding.result).inc()
        log.info("spf %s identity=%s domain=%s ip=%s lookups=%d%s", deciding.result,
                 deciding.identity, deciding.domain, ip, deciding.lookups,
                 f" helo_result={hr.result}" if hr is not None and mf is not None else "")
        refusal = None
        if policy == "reject" and deciding.result == "temperror":
            refusal = Refusal(451, "4.4.3", "SPF record lookup failed temporarily; "
                              "try again later", reason="spf_temperror")
        elif policy == "reject" and deciding.result == "fail":
            refusal = Refusal(550, "5.7.23", "SPF validation failed", reason="spf")
        elif policy == "reject" and permerror == "reject" and deciding.result == "permerror":
            refusal = Refusal(550, "5.7.24", "SPF validation error: the SPF record of "
                              f"{_clean(deciding.domain or deciding.helo)[:80]} is broken "
                              f"({_clean(deciding.explanation)[:120]})",
                              reason="spf_permerror")
        if refusal is not None:
            return SpfVerdict(mf, hr, refusal)
        headers = received_spf(deciding, self.hostname, linesep) + \
            authentication_results(deciding, self.hostname, linesep)
        return SpfVerdict(mf, hr, None, headers)

    async def apply(self, policy: Literal["off", "tag", "reject"], data: bytes, *, ip: str,
                    sender: str, helo: str, listener: str = "",
                    permerror: Literal["tag", "reject"] = "tag") -> bytes:
        """The message with SPF trace headers prepended; raises ``Refusal`` when refused."""
        end = data.find(b"\n")
        linesep = b"\r\n" if end > 0 and data[end - 1:end] == b"\r" else b"\n"
        v = await self.verdict(policy, ip=ip, sender=sender, helo=helo, listener=listener,
                               linesep=linesep, permerror=permerror)
        if v.refusal is not None:
            raise v.refusal
        return v.headers + data
