"""SPF against a real DNS server (dnsmasq on loopback): results, policies, headers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.checks.spf import SpfChecker
from relay.config.schema import HostPort
from relay.dns import Resolver
from relay.metrics import Metrics
from relay.verdict import Refusal
from tests.peers.dnsmasq import Zone, dnsmasq, silent_dns

D = "spf.test"
MSG = b"From: a@pass.spf.test\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[HostPort]:
    txt: dict[str, str] = {
        f"pass.{D}": "v=spf1 ip4:127.0.0.0/8 -all",
        f"fail.{D}": "v=spf1 ip4:192.0.2.0/24 -all",
        f"soft.{D}": "v=spf1 ip4:192.0.2.0/24 ~all",
        f"neutral.{D}": "v=spf1 ?all",
        f"mx.{D}": "v=spf1 mx -all",
        f"inc.{D}": f"v=spf1 include:pass.{D} -all",
        f"many.{D}": "v=spf1 " + " ".join(f"a:h{i}.{D}" for i in range(1, 12)) + " -all",
        f"ten.{D}": "v=spf1 " + " ".join(f"a:h{i}.{D}" for i in range(1, 10))
                    + " ip4:127.0.0.0/8 -all",
        f"void.{D}": f"v=spf1 a:nx1.{D} a:nx2.{D} a:nx3.{D} ip4:127.0.0.0/8 -all",
        f"twovoid.{D}": f"v=spf1 a:nx1.{D} a:nx2.{D} ip4:127.0.0.0/8 -all",
        f"syntax.{D}": "v=spf1 ip4:127.0.0.1/33 -all",
        f"v6.{D}": f"v=spf1 ip6:2001:db8:1::/48 a:v6host.{D} -all",
    }
    zone = Zone(domains=[D], txt=txt,
                a={f"h{i}.{D}": [f"192.0.2.{i}"] for i in range(1, 12)}
                | {f"mail.{D}": ["127.0.0.9"], f"v6host.{D}": ["2001:db8:2::25"]},
                mx={f"mx.{D}": [(f"mail.{D}", 10)]})
    with dnsmasq(tmp_path, zone) as hp:
        yield hp


@pytest.fixture
def checker(dns: HostPort) -> SpfChecker:
    return SpfChecker(resolver=Resolver(servers=[dns], timeout=3.0),
                      hostname="relay.example.org", metrics=Metrics())


@pytest.mark.parametrize(("sender", "ip", "expected", "lookups"), [
    (f"a@pass.{D}", "127.0.0.5", "pass", 0),
    (f"a@fail.{D}", "127.0.0.5", "fail", 0),
    (f"a@soft.{D}", "127.0.0.5", "softfail", 0),
    (f"a@neutral.{D}", "127.0.0.5", "neutral", 0),
    (f"a@mx.{D}", "127.0.0.9", "pass", 1),
    (f"a@mx.{D}", "127.0.0.8", "fail", 1),
    (f"a@inc.{D}", "127.0.0.5", "pass", 1),
    (f"a@ten.{D}", "127.0.0.5", "pass", 9),
    (f"a@many.{D}", "127.0.0.5", "permerror", 11),
    (f"a@void.{D}", "127.0.0.5", "permerror", 3),
    (f"a@twovoid.{D}", "127.0.0.5", "pass", 2),
    (f"a@syntax.{D}", "127.0.0.5", "permerror", 0),
    (f"a@nospf.{D}", "127.0.0.5", "none", 0),
    (f"a@v6.{D}", "2001:db8:1::7", "pass", 0),
    (f"a@v6.{D}", "2001:db8:2::25", "pass", 1),
    (f"a@v6.{D}", "2001:db8:3::1", "fail", 1),
    (f"a@pass.{D}", "::ffff:127.0.0.5", "pass", 0),          # IPv4-mapped (dual-stack socket)
    (f"a@pass.{D}", "not-an-ip", "permerror", 0),
])
def test_results(checker: SpfChecker, sender: str, ip: str, expected: str,
                 lookups: int) -> None:
    r = checker.evaluate(ip, sender, "client.example")
    assert r.result == expected, r
    assert r.identity == "mailfrom"
    if expected != "permerror" or sender.startswith("a@many"):
        assert r.lookups == lookups


async def test_reject_policy_refuses_fail_with_5_7_23(checker: SpfChecker) -> None:
    with pytest.raises(Refusal) as info:
        await checker.apply("reject", MSG, ip="127.0.0.5", sender=f"a@fail.{D}",
                            helo=f"pass.{D}", listener="inbound")
    assert info.value.reply == "550 5.7.23 SPF validation failed"
    m = checker._metrics
    assert m is not None
    assert m.registry.get_sample_value(
        "relay_spf_results_total", {"listener": "inbound", "result": "fail"}) == 1


@pytest.mark.parametrize("sender", [f"a@soft.{D}", f"a@many.{D}", f"a@neutral.{D}"])
async def test_reject_policy_accepts_softfail_neutral_permerror(checker: SpfChecker,
                                                                sender: str) -> None:
    out = await checker.apply("reject", MSG, ip="127.0.0.5", sender=sender, helo="h.example")
    assert out.endswith(MSG) and out.startswith(b"Received-SPF: ")


@pytest.mark.parametrize(("sender", "reason"), [
    (f"a@many.{D}", "SPF Permanent Error: Too many DNS lookups)"),
    (f"a@syntax.{D}", "SPF Permanent Error: Invalid IP4 CIDR length: ip4:127.0.0.1/33)"),
])
async def test_permerror_refused_only_where_chosen(checker: SpfChecker, sender: str,
                                                   reason: str) -> None:
    with pytest.raises(Refusal) as info:
        await checker.apply("reject", MSG, ip="127.0.0.5", sender=sender, helo="h.example",
                            permerror="reject")
    domain = sender.split("@")[1]
    assert info.value.reply == (f"550 5.7.24 SPF validation error: the SPF record of {domain} "
                                f"is broken ({reason}")
    assert info.value.reason == "spf_permerror"
    # "tag" (the default) accepts it with the result recorded; "tag" policy never refuses
    out = await checker.apply("reject", MSG, ip="127.0.0.5", sender=sender, helo="h.example")
    assert b"spf=permerror" in out.replace(b"\r\n\t", b" ")
    out = await checker.apply("tag", MSG, ip="127.0.0.5", sender=sender, helo="h.example",
                              permerror="reject")
    assert out.endswith(MSG)


async def test_permerror_choice_reaches_the_listener_checks(checker: SpfChecker) -> None:
    from relay.checks.message import MessageChecks
    from relay.verdict import SessionInfo

    session = SessionInfo(listener="inbound", client_ip="127.0.0.5", client_port=1,
                          helo="h.example", tls=False, auth_user="", allowlisted=False,
                          trusted=False)
    checks = MessageChecks(spf=checker, spf_policy="reject", spf_permerror="reject")
    with pytest.raises(Refusal) as info:
        await checks.check_sender(session, f"a@many.{D}", {})
    assert info.value.code == 550 and info.value.enhanced == "5.7.24"
    await MessageChecks(spf=checker, spf_policy="reject").check_sender(
        session, f"a@many.{D}", {})


async def test_tag_policy_headers(checker: SpfChecker) -> None:
    out = await checker.apply("tag", MSG, ip="127.0.0.5", sender=f"a@fail.{D}",
                              helo="client.example")
    head = out[:-len(MSG)].decode()
    unfolded = head.replace("\r\n\t", " ")
    assert unfolded.startswith("Received-SPF: fail (relay.example.org: domain of fail.spf.test "
                               "does not designate 127.0.0.5 as permitted sender)")
    assert "client-ip=127.0.0.5; envelope-from=a@fail.spf.test; helo=client.example;" \
        in unfolded
    assert "identity=mailfrom\r\n" in unfolded
    assert "Authentication-Results: relay.example.org; spf=fail " \
           "smtp.mailfrom=a@fail.spf.test\r\n" in unfolded
    assert all(len(line) <= 78 for line in head.split("\r\n"))
    assert head.endswith("\r\n") and head.count("\r\n") == len(head.splitlines())


async def test_tag_policy_never_refuses(checker: SpfChecker) -> None:
    out = await checker.apply("tag", MSG, ip="127.0.0.5", sender=f"a@many.{D}", helo="h.x")
    assert b"spf=permerror reason=" in out.replace(b"\r\n\t", b" ")


async def test_null_sender_uses_helo_identity(checker: SpfChecker) -> None:
    v = await checker.verdict("tag", ip="127.0.0.5", sender="", helo=f"pass.{D}")
    assert v.mailfrom is None and v.helo is not None and v.helo.result == "pass"
    assert b"smtp.helo=pass.spf.test" in v.headers
    assert b"identity=helo" in v.headers
    with pytest.raises(Refusal):
        await checker.apply("reject", MSG, ip="127.0.0.5", sender="", helo=f"fail.{D}")


async def test_off_does_nothing(checker: SpfChecker) -> None:
    assert await checker.apply("off", MSG, ip="127.0.0.5", sender=f"a@fail.{D}",
                               helo="x") is MSG


async def test_dns_timeout_is_451_4_4_3_never_5xx() -> None:
    with silent_dns() as hp:
        checker = SpfChecker(resolver=Resolver(servers=[hp], timeout=0.5), hostname="relay")
        with pytest.raises(Refusal) as info:
            await checker.apply("reject", MSG, ip="127.0.0.5", sender=f"a@pass.{D}",
                                helo="h.example")
        assert (info.value.code, info.value.enhanced) == (451, "4.4.3")
        out = await checker.apply("tag", MSG, ip="127.0.0.5", sender=f"a@pass.{D}",
                                  helo="h.example")
        assert b"spf=temperror" in out


async def test_header_values_from_the_client_are_quoted(checker: SpfChecker) -> None:
    v = await checker.verdict("tag", ip="127.0.0.5", sender=f"a@pass.{D}",
                              helo='evil"\r\nX-Injected: 1')
    assert b"X-Injected: 1\r\n" not in v.headers
    assert b'helo="evil\\"??X-Injected: 1"' in v.headers.replace(b"\r\n\t", b" ")
