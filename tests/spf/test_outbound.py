"""`relay spf check` and the start-up warning, against dnsmasq."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.cli import main
from relay.config.loader import load_config
from relay.config.schema import HostPort
from relay.dns import Resolver
from relay.probe.spf import provider_include, warn_failing_domains
from tests.peers.dnsmasq import Zone, dnsmasq, silent_dns

MSFT = "spf.protection.outlook.com"
CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(autouse=True)
def no_config_around(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Results must not depend on where pytest runs (./conf/relay.toml) or on the caller's
    $RELAY_CONFIG: commands without -c find no config and use the shipped address sets."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RELAY_CONFIG", raising=False)


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[HostPort]:
    zone = Zone(domains=["customer.test", "nomsft.test", "toomany.test", "outlook.com",
                         "nospf.test", "cxone.test", "partial.test", "commas.test",
                         "two.test", "wide.test"], txt={
        "cxone.test": "v=spf1 ip4:207.166.95.11 ip4:207.166.92.11 ip4:52.6.44.126 "
                      "ip4:52.207.153.36 ~all",
        "partial.test": "v=spf1 ip4:207.166.95.11 include:" + MSFT + " -all",
        "commas.test": "v=spf1 ip4:69,169,235,170 -all",
        "two.test": "v=spf1 ip4:69.169.235.170,69.169.235.171 -all",
        "wide.test": "v=spf1 -ip4:69\uff0c169\uff0c235\uff0c170 -all",
        "customer.test": f"v=spf1 ip4:192.0.2.0/24 include:{MSFT} -all",
        MSFT: "v=spf1 ip4:40.92.0.0/15 ip4:40.107.0.0/16 -all",
        "nomsft.test": "v=spf1 ip4:192.0.2.0/24 -all",
        "toomany.test": "v=spf1 " + " ".join(f"a:h{i}.toomany.test" for i in range(11))
                        + " -all",
    }, a={f"h{i}.toomany.test": ["192.0.2.200"] for i in range(11)})
    with dnsmasq(tmp_path, zone) as hp:
        yield hp


def config(tmp: Path, dns: HostPort) -> Path:
    conf = tmp / "relay.toml"
    conf.write_text(
        f'[relay]\nhostname = "relay.test"\nspool = "{tmp / "spool"}"\n'
        f'dns_servers = ["{dns.host}:{dns.port}"]\ndns_timeout = "2s"\n'
        f'default_upstream = "outbox"\n\n'
        f'[[listener]]\nname = "local"\nprotocol = "smtp"\nlisten = "127.0.0.1:2525"\n'
        f'auth = "none"\nallow = ["127.0.0.0/8"]\n\n'
        f'[[upstream]]\nname = "o365"\nprotocol = "smtp"\nhost = "smtp.office365.com"\n'
        f'port = 587\n\n'
        f'[[upstream]]\nname = "outbox"\nprotocol = "outbox"\npath = "{tmp / "out"}"\n\n'
        f'[[route]]\nsender_domain = "customer.test"\nupstream = "o365"\n\n'
        f'[[route]]\nsender_domain = "nomsft.test"\nupstream = "o365"\n')
    return conf


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["spf", "check", *argv])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


@pytest.mark.fast
def test_provider_include() -> None:
    assert provider_include("smtp.office365.com") == (MSFT, "Microsoft 365 / Exchange Online")
    assert provider_include("outlook.office365.com.")[0] == MSFT  # type: ignore[index]
    assert provider_include("smtp-mail.outlook.com")[0] == MSFT  # type: ignore[index]
    assert provider_include("smtp.gmail.com")[0] == "_spf.google.com"  # type: ignore[index]
    assert provider_include("mail.example.com") is None
    assert provider_include("notoffice365.com") is None


def test_upstream_provider_included(tmp_path: Path, dns: HostPort,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "customer.test", "--upstream", "o365", "-c",
                    str(config(tmp_path, dns)))
    assert code == 0, out
    assert f"include:{MSFT} present" in out
    assert "lookups:  1 of 10" in out
    assert "result:   ok" in out


def test_upstream_provider_missing(tmp_path: Path, dns: HostPort,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "nomsft.test", "--upstream", "o365", "-c",
                    str(config(tmp_path, dns)))
    assert code == 1, out
    assert f"include:{MSFT} MISSING" in out
    assert "mail would get spf=fail" in out


def test_ips(dns: HostPort, capsys: pytest.CaptureFixture[str]) -> None:
    d = f"{dns.host}:{dns.port}"
    code, out = run(capsys, "nomsft.test", "--ip", "192.0.2.7", "--dns", d)
    assert code == 0 and "ip 192.0.2.7: spf=pass" in out
    code, out = run(capsys, "customer.test", "--ip", "40.92.1.1", "--ip", "198.51.100.9",
                    "--dns", d)
    assert code == 1
    assert "ip 40.92.1.1: spf=pass" in out and "ip 198.51.100.9: spf=fail" in out


def test_too_many_lookups(dns: HostPort, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "toomany.test", "--dns", f"{dns.host}:{dns.port}")
    assert code == 1
    assert "lookups:  11 of 10  OVER THE LIMIT" in out
    assert "permerror" in out


def test_no_record_is_a_warning(dns: HostPort, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "nospf.test", "--dns", f"{dns.host}:{dns.port}")
    assert code == 0 and "publishes no SPF record" in out


@pytest.mark.fast
def test_comma_written_address_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "customer.test", "--ip", "69,169,235,170")
    assert code == 1
    assert "'69,169,235,170' is not an IP address" in out and "69.169.235.170" in out


@pytest.mark.fast
@pytest.mark.parametrize(("given", "message"), [
    ("69\uff0c169\uff0c235\uff0c170",
     "relay: --ip '69\uff0c169\uff0c235\uff0c170' is not an IP address (address written "
     "with full-width characters)\n  hint: write \"69.169.235.170\" in plain ASCII: "
     "\"\uff0c\" \"\u3001\" \"\uff0e\" and full-width digits are what a Japanese input method "
     "types\n"),
    ("\uff16\uff19.169.235.170",
     "relay: --ip '\uff16\uff19.169.235.170' is not an IP address (address written with "
     "full-width characters)\n  hint: write \"69.169.235.170\" in plain ASCII: \"\uff0c\" "
     "\"\u3001\" \"\uff0e\" and full-width digits are what a Japanese input method types\n"),
    ("69.169.235.170, 69.169.235.171",
     "relay: --ip '69.169.235.170, 69.169.235.171' is not an IP address (2 addresses in one "
     "string)\n  hint: repeat --ip for each: --ip 69.169.235.170 --ip 69.169.235.171\n"),
    ("cxone-na2", "relay: --ip 'cxone-na2' is neither an IP address nor a named address "
     "set\n  hint: did you mean \"cxone-na1\"?\n"),
])
def test_address_typos_are_explained(capsys: pytest.CaptureFixture[str], given: str,
                                     message: str) -> None:
    code, out = run(capsys, "customer.test", "--ip", given)
    assert (code, out) == (1, message)


@pytest.mark.fast
def test_a_named_but_missing_config_is_an_error(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Only "no config anywhere" falls back to the shipped sets; a config the operator
    named (-c or $RELAY_CONFIG) that is missing is reported, not silently replaced."""
    monkeypatch.setenv("RELAY_CONFIG", str(tmp_path / "gone.toml"))
    code, out = run(capsys, "customer.test", "--ip", "cxone-na2")
    assert code != 0 and "config file not found" in out and "gone.toml" in out
    code, out = run(capsys, "customer.test", "--ip", "cxone-na2", "-c", "missing.toml")
    assert code != 0 and "config file not found" in out and "missing.toml" in out


def test_named_set_checks_every_address(dns: HostPort,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    d = f"{dns.host}:{dns.port}"
    code, out = run(capsys, "cxone.test", "--ip", "cxone-na1-spf", "--dns", d)
    assert code == 0, out
    for ip in ("207.166.95.11", "207.166.92.11", "52.6.44.126", "52.207.153.36"):
        assert f"ip {ip} (cxone-na1-spf): spf=pass (ip4:{ip})" in out
    code, out = run(capsys, "partial.test", "--ip", "cxone-na1-spf", "--dns", d)
    assert code == 1
    assert "ip 207.166.95.11 (cxone-na1-spf): spf=pass" in out
    for ip in ("207.166.92.11", "52.6.44.126", "52.207.153.36"):
        assert f"problem:  {ip} gets spf=fail" in out


def test_named_set_with_a_network(tmp_path: Path, dns: HostPort,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    conf = config(tmp_path, dns)
    conf.write_text(conf.read_text() + '\n[[address_set]]\nname = "vendor"\n'
                    'networks = ["192.0.2.0/24", "198.51.100.7"]\n')
    code, out = run(capsys, "nomsft.test", "--ip", "vendor", "-c", str(conf))
    assert code == 1
    assert "ip 192.0.2.0 (vendor): spf=pass" in out and "ip 192.0.2.255 (vendor): spf=pass" in out
    assert "problem:  198.51.100.7 gets spf=fail" in out
    assert "note:     vendor: network 192.0.2.0/24 is checked at its first and last address" in out


@pytest.mark.parametrize(("domain", "problem"), [
    ("commas.test", 'problem:  the record says "ip4:69,169,235,170" (IPv4 address written with '
     'commas): publish "ip4:69.169.235.170" instead'),
    ("two.test", 'problem:  the record says "ip4:69.169.235.170,69.169.235.171" (2 addresses '
     'in one string): publish "ip4:69.169.235.170 ip4:69.169.235.171" instead'),
    ("wide.test", 'problem:  the record says "-ip4:69\uff0c169\uff0c235\uff0c170" (address '
     'written with full-width characters): publish "-ip4:69.169.235.170" instead'),
])
def test_published_record_typos_get_the_same_hints(dns: HostPort,
                                                   capsys: pytest.CaptureFixture[str],
                                                   domain: str, problem: str) -> None:
    code, out = run(capsys, domain, "--dns", f"{dns.host}:{dns.port}")
    assert code == 1
    assert problem in out.splitlines()


@pytest.mark.fast
def test_record_fragment_for_named_sets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["spf", "record", "cxone-na1-spf", "cxone-au-spf", "-c",
                 str(CONF / "relay.toml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == ("fragment: ip4:207.166.95.11 ip4:207.166.92.11 ip4:52.6.44.126 "
                      "ip4:52.207.153.36 ip4:13.210.152.254 ip4:54.153.190.82")
    assert out[3] == "lookups:  +0 (ip4:/ip6: terms need no DNS lookup; the limit is 10)"


def test_record_merged_into_the_published_one(dns: HostPort,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["spf", "record", "cxone-na1-spf", "--domain", "partial.test", "--dns",
                 f"{dns.host}:{dns.port}", "-c", str(CONF / "relay.toml")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (f"publish:  v=spf1 ip4:207.166.95.11 include:{MSFT} ip4:207.166.92.11 "
            "ip4:52.6.44.126 ip4:52.207.153.36 -all") in out.splitlines()
    assert "lookups:  1 of 10 (unchanged)" in out


def test_dns_timeout_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with silent_dns() as hp:
        code, out = run(capsys, "customer.test", "--dns", f"{hp.host}:{hp.port}",
                        "--dns-timeout", "0.5")
    assert code == 2, out
    assert "could not check" in out


async def test_startup_warning_per_failing_domain(tmp_path: Path, dns: HostPort,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(config(tmp_path, dns))
    with caplog.at_level(logging.WARNING, logger="relay.spf"):
        failing = await warn_failing_domains(cfg, Resolver.from_config(cfg.relay))
    assert [p.domain for p in failing] == ["nomsft.test"]
    assert "SPF for sender domain nomsft.test via upstream o365 would fail" in caplog.text
    assert "customer.test" not in caplog.text


@pytest.mark.fast
def test_routed_domains_include_dkim_domains_via_default_upstream() -> None:
    from relay.config.schema import (
        Config,
        DkimKeyConfig,
        MetricsConfig,
        RelaySection,
        RouteConfig,
        UpstreamConfig,
    )
    from relay.probe.spf import routed_domains

    o365 = UpstreamConfig(name="o365", protocol="smtp", host="smtp.office365.com", port=587)
    gmail = UpstreamConfig(name="gmail", protocol="smtp", host="smtp.gmail.com", port=587)
    cfg = Config(source=Path("x.toml"), relay=RelaySection(default_upstream="o365"),
                 metrics=MetricsConfig(), listeners=(), upstreams=(o365, gmail),
                 routes=(RouteConfig(upstream="gmail", sender_domain="*.shop.test"),),
                 dkim=(DkimKeyConfig("Brand.test", "s", Path("k")),
                       DkimKeyConfig("shop.test", "s", Path("k"))))
    assert [(d, u.name) for d, u in routed_domains(cfg)] == [
        ("shop.test", "gmail"), ("brand.test", "o365")]
