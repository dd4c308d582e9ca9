"""The shipped files: the quick-start config, CXone address sets, provider profiles."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from pathlib import Path

import pytest

from relay.config.loader import load_config
from relay.config.schema import HostPort
from tests.config.conftest import CONF, DATA

pytestmark = pytest.mark.fast

# NICE CXone's "system email" page (Japanese edition), as the field documents give it.
SEED = Path(__file__).parent / "fixtures" / "cxone-system-email.ja.txt"


def test_quick_start_config() -> None:
    c = load_config(CONF / "relay.toml")
    (listener,) = c.listeners
    assert listener.listen == HostPort("127.0.0.1", 2525)
    assert listener.auth == "none"
    assert set(listener.allow) == {ipaddress.ip_network("127.0.0.0/8"),
                                   ipaddress.ip_network("::1")}
    (up,) = c.upstreams
    assert up.protocol == "outbox"
    assert up.path == CONF.parent / "var" / "outbox"
    assert c.relay.spool == CONF.parent / "var" / "spool"
    assert c.relay.default_upstream == "outbox"
    assert c.metrics.listen == HostPort("127.0.0.1", 9325)


def _cxone_page() -> dict[str, dict[str, set[str]]]:
    """The CXone page's two lists, per region, exactly as written (commas and all)."""
    regions = {"北米": "na1", "オーストラリア": "au", "カナダ": "ca", "ヨーロッパ": "eu",
               "日本": "jp", "イギリス": "uk"}
    page = SEED.read_text(encoding="utf-8")
    allow_part, spf_part = page.split("\nSPFレコード\n", 1)
    allow_part = allow_part.split("\nメールサーバー許可リスト\n", 1)[1]
    out: dict[str, dict[str, set[str]]] = {"allow": {}, "spf": {}}
    for kind, part in (("allow", allow_part), ("spf", spf_part)):
        region = ""
        for line in part.splitlines():
            if line.strip() in regions:
                region = regions[line.strip()]
            for addr in re.findall(r"\d{1,3}[.,]\d{1,3}[.,]\d{1,3}[.,]\d{1,3}", line):
                out[kind].setdefault(region, set()).add(addr)
    return out


def test_shipped_address_sets_match_the_cxone_document() -> None:
    """Each region's allow-list and SPF list, exactly as the page gives them, commas fixed."""
    c = load_config(CONF / "relay.toml")
    page = _cxone_page()
    assert set(page["allow"]) == set(page["spf"]) == {"na1", "au", "ca", "eu", "jp", "uk"}
    assert any("," in a for addrs in page["allow"].values() for a in addrs)   # the typo
    for kind, suffix in (("allow", ""), ("spf", "-spf")):
        for region, addrs in page[kind].items():
            want = {ipaddress.ip_network(a.replace(",", ".")) for a in addrs}
            got = c.address_sets[f"cxone-{region}{suffix}"]
            assert set(got) == want, f"cxone-{region}{suffix}"
            assert len(got) == len(addrs)


def test_shipped_address_sets_note_each_comma_fix() -> None:
    text = (DATA / "address_sets.toml").read_text()
    for line in text.splitlines():
        m = re.match(r'\s*"([\d.]+)",', line)
        if m and line.count("#"):
            assert f'"{m.group(1).replace(".", ",")}"' in line


def test_shipped_profiles() -> None:
    c = load_config(CONF / "relay.toml")
    g = c.profile("genesys-agentless")
    assert (g.max_recipients, g.max_subject_chars, g.max_local_part, g.max_display_name,
            g.max_body_bytes, g.allow_attachments) == (1, 400, 64, 64, 3 * 2**20, False)
    assert g.messages_per_minute == 600
    assert set(g.structure_checks) == {"to", "mime"}
    # the custom tiers: the same limits, only the pace differs
    for tier in (1200, 3000):
        t = c.profile(f"genesys-agentless-{tier}")
        assert t.messages_per_minute == tier
        assert dataclasses.replace(t, name=g.name, messages_per_minute=600,
                                   line=g.line) == g
    e = c.profile("exchange-online")
    assert (e.max_message_bytes, e.recipients_per_day, e.messages_per_minute) == (
        35 * 2**20, 10000, 30)
    z = c.profile("zendesk-exchange-connector")
    assert (z.messages_per_minute, z.bytes_per_5min, z.recipients_per_day,
            z.max_message_bytes) == (10, 50 * 2**20, 10000, 50 * 2**20)
    assert {"from", "to", "mime"} <= set(z.structure_checks)


def test_data_files_are_standalone_valid_toml() -> None:
    for name in ("address_sets.toml", "profiles.toml"):
        data = tomllib.loads((DATA / name).read_text())
        assert set(data) == {"address_set" if name.startswith("address") else "profile"}
