"""The SPF council's RFC 7208 test suite (from pyspf), run through relay's SPF wrapper.

The DNS answers come from each scenario's zone data, served the way pyspf's own harness
(test/testspf.py) serves them: the one place a fake DNS is right.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import spf
import yaml

from relay.checks.spf import evaluate

pytestmark = pytest.mark.fast

DATA = Path(__file__).parent / "data" / "rfc7208-tests.yml"
Zone = dict[str, list[Any]]


def _rdata(records: list[Any], name: str) -> Iterator[Any]:
    """Unpack a scenario's records as pyspf's harness does (SPF-only names also get TXT)."""
    txt = []
    gen = True
    for m in records:
        if not isinstance(m, dict):
            yield m                          # "TIMEOUT"
            continue
        for t, v in m.items():
            if t in ("TXT", "SPF") and isinstance(v, str):
                v = (v,)
            if t == "TXT":
                gen = False
            elif t == "SPF" and gen:
                txt.append(("TXT", v, name))
            if v != ("NONE",):
                yield (t, v, name)
    if gen:
        yield from txt


def load() -> list[tuple[str, Zone, dict[str, Any]]]:
    cases = []
    with DATA.open("rb") as fp:
        for scenario in yaml.safe_load_all(fp):
            zone = {d.lower(): list(_rdata(r, d)) for d, r in scenario["zonedata"].items()}
            for test_id, test in scenario["tests"].items():
                cases.append((test_id, zone, test))
    return cases


def stub(zone: Zone) -> Any:
    def lookup(name: str, qtype: str, timeout: float, level: int = 0) -> list[Any]:
        labels = [label for label in name.split(".") if label]
        if any(len(label) > 63 for label in labels):
            raise spf.TempError("DNS label too long")
        name = ".".join(labels)
        out: list[Any] = []
        timeout_pending = True
        if name.lower() not in zone:
            if name.startswith("error."):
                raise spf.TempError("DNS timeout")
            return out
        for rec in zone[name.lower()]:
            if rec == "TIMEOUT":
                if timeout_pending:
                    raise spf.TempError("DNS timeout")
                return out
            t, v, n = rec
            if t == qtype:
                timeout_pending = False
            if v == "TIMEOUT":
                if t == qtype:
                    raise spf.TempError("DNS timeout")
                continue
            if t == "AAAA":
                v = socket.inet_pton(socket.AF_INET6, v)
            elif t in ("TXT", "SPF"):
                v = [s.encode("utf-8") for s in v]
            out.append(((n, t), v))
            if not level and t == "CNAME":
                out += lookup(v, qtype, timeout, 1)
        return out
    return lookup


CASES = load()


def test_suite_is_complete() -> None:
    assert len(CASES) > 190


@pytest.mark.parametrize(("test_id", "zone", "case"), CASES, ids=[c[0] for c in CASES])
def test_rfc7208(test_id: str, zone: Zone, case: dict[str, Any]) -> None:
    result = evaluate(case["host"], case["mailfrom"], case["helo"], lookup=stub(zone),
                      timeout=5.0, default_explanation="DEFAULT")
    expected = case["result"]
    allowed = [expected] if isinstance(expected, str) else list(expected)
    assert result.result in allowed, f"{test_id}: {case.get('spec')}: {case.get('description')}"
    if "explanation" in case:
        assert result.explanation == case["explanation"]
