"""Report rendering: verdict lines, hints, slow-walk notes, JSON."""

from __future__ import annotations

import pytest

from relay.errors import TransportError
from relay.probe.steps import Report, format_text, to_json

pytestmark = pytest.mark.fast


def test_text_and_json() -> None:
    r = Report("office365", "smtp", "smtp.office365.com:587", "dante")
    r.passed("proxy", 0.003, "SOCKS5 proxy dante reached")
    r.failed("socks5", 0.012, TransportError("refused", reason="proxy_refused_ruleset",
                                               hint="allow it"))
    r.skipped("auth", "not reached")
    text = format_text([r])
    assert "office365 (smtp smtp.office365.com:587 via dante)" in text
    assert "  ok    proxy          3 ms  SOCKS5 proxy dante reached" in text
    assert "  FAIL  socks5        12 ms  refused" in text
    assert "hint: allow it" in text and "  --    auth" in text
    assert "=> FAILED (proxy_refused_ruleset)" in text
    data = to_json([r])
    assert data["ok"] is False and data["upstreams"][0]["reason"] == "proxy_refused_ruleset"


def test_slow_walk_names_the_slowest_step() -> None:
    r = Report("office365", "smtp", "h:587", "direct")
    r.passed("tcp", 0.5, "")
    r.passed("greeting", 11.9, "")
    r.note_if_slow(10.0)
    assert r.notes == ["the walk took 12.4 s, more than slow_delivery_threshold (10 s); "
                       "11.9 s of it in greeting"]
    assert "  note: the walk took 12.4 s" in format_text([r])
    fast = Report("x", "smtp", "h:1", "direct")
    fast.passed("tcp", 0.1, "")
    fast.note_if_slow(10.0)
    assert fast.notes == []
