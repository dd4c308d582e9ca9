"""Protected headers survive relay byte for byte; rules on them are refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from relay.config.schema import (
    Config,
    HeaderRule,
    HostPort,
    ListenerConfig,
    MetricsConfig,
    RelaySection,
    RouteConfig,
    UpstreamConfig,
)
from relay.dkim.keys import DkimKey, DkimKeys, generate
from relay.dkim.sign import Signer
from relay.errors import ConfigError
from relay.headers import (
    DEFAULT_PROTECTED,
    HeaderGuard,
    apply_rules,
    check_rules,
    prepend,
    protected_lines,
    protected_patterns,
    split,
    verify_unchanged,
)
from relay.metrics import Metrics

pytestmark = pytest.mark.fast

# The five headers of the Zendesk + Exchange Online document, plus threading headers,
# in awkward but legal shapes: folded, odd whitespace, 8-bit text, LF and CRLF variants.
ZENDESK_HEAD = [
    b"Received: from zendesk.example ([192.0.2.10])\r\n\tby mx; Sat, 21 Nov 2026\r\n",
    b"From: =?UTF-8?Q?Support_J=C3=B6rg?= <support@example.com>\r\n",
    b"To: customer@example.net\r\n",
    b"Subject: [Ticket #4711] Re: Lieferung \xc3\xbcberf\xc3\xa4llig\r\n",
    b"Date: Sat, 21 Nov 2026 09:00:00 +0000\r\n",
    b"Message-ID: <ticket-4711-reply-3@zendesk.example>\r\n",
    b"In-Reply-To:\r\n <ticket-4711-reply-2@zendesk.example>\r\n",
    b"References: <ticket-4711@zendesk.example>\r\n <ticket-4711-reply-1@zendesk.example>\r\n"
    b"\t<ticket-4711-reply-2@zendesk.example>\r\n",
    b"Auto-Submitted: auto-generated\r\n",
    b"X-Auto-Response-Suppress:All\r\n",
    b"X-Mailer:   Zendesk Mailer  \r\n",
    b"X-Zendesk-From-Account-Id: 1a2b3c\r\n",
    b"x-zendesk-email-id:\t01HZX8Y3K9Q2M7N4P5R6S7T8V9\r\n",
    b"MIME-Version: 1.0\r\n",
    b"Content-Type: text/plain; charset=UTF-8\r\n",
    b"Content-Transfer-Encoding: 8bit\r\n",
]
ZENDESK = b"".join(ZENDESK_HEAD) + b"\r\nHallo J\xc3\xb6rg,\r\n\r\nIhre Anfrage...\r\n"
PROTECTED = [ZENDESK_HEAD[i] for i in (5, 6, 7, 8, 9, 10, 11, 12)]


@pytest.mark.parametrize("message", [ZENDESK, ZENDESK.replace(b"\r\n", b"\n")],
                         ids=["crlf", "lf"])
def test_protected_lines_exact(message: bytes) -> None:
    expected = PROTECTED if b"\r\n" in message else [p.replace(b"\r\n", b"\n")
                                                     for p in PROTECTED]
    assert protected_lines(message) == expected


def test_split_keeps_every_byte() -> None:
    fields, body_at = split(ZENDESK)
    assert b"".join(f.raw for f in fields) + ZENDESK[body_at:] == ZENDESK
    assert [f.name for f in fields][:2] == [b"Received", b"From"]
    assert ZENDESK[body_at:].startswith(b"\r\nHallo")


def test_sign_and_rules_keep_protected_headers_byte_identical() -> None:
    key = DkimKey("example.com", "s1", "rsa-sha256", generate("rsa"))
    rules = (HeaderRule("add", "X-Relay-Campaign", "winter"),
             HeaderRule("remove", "Content-Transfer-Encoding"),
             HeaderRule("replace", "To", "Customer <customer@example.net>"))
    check_rules(rules, DEFAULT_PROTECTED)
    out = apply_rules(ZENDESK, rules)
    out = prepend(out, b"Received: from platform by relay; Sat, 21 Nov 2026\r\n")
    out = Signer(DkimKeys([key])).sign(out, sender_domain="example.com")
    assert protected_lines(out) == PROTECTED
    assert verify_unchanged(ZENDESK, out)
    assert b"X-Relay-Campaign: winter\r\n\r\nHallo" in out
    assert b"Content-Transfer-Encoding" not in out
    assert out.endswith(ZENDESK[split(ZENDESK)[1]:])      # body untouched
    guard = HeaderGuard(metrics=(m := Metrics()))
    assert guard.check(ZENDESK, out)
    assert m.registry.get_sample_value("relay_protected_header_violations_total") == 0


@pytest.mark.parametrize("change", [
    (b"X-Mailer:   Zendesk Mailer  \r\n", b"X-Mailer: Zendesk Mailer\r\n"),      # whitespace
    (b"In-Reply-To:\r\n <ticket", b"In-Reply-To: <ticket"),                       # unfolded
    (b"x-zendesk-email-id", b"X-Zendesk-Email-Id"),                              # case
    (b"Auto-Submitted: auto-generated\r\n", b""),                                # removed
])
def test_any_change_is_detected_counted_and_logged(
        change: tuple[bytes, bytes], caplog: pytest.LogCaptureFixture) -> None:
    changed = ZENDESK.replace(*change)
    assert changed != ZENDESK
    assert not verify_unchanged(ZENDESK, changed)
    m = Metrics()
    with caplog.at_level(logging.ERROR, logger="relay.headers"):
        assert not HeaderGuard(metrics=m).check(ZENDESK, changed, queue_id="Q1")
    assert m.registry.get_sample_value("relay_protected_header_violations_total") == 1
    assert "Q1: protected headers changed" in caplog.text


def test_reordering_protected_headers_is_detected() -> None:
    a, b = ZENDESK_HEAD[8], ZENDESK_HEAD[9]
    swapped = ZENDESK.replace(a + b, b + a)
    assert not verify_unchanged(ZENDESK, swapped)


def test_operator_patterns_add_to_the_defaults() -> None:
    pats = protected_patterns(RelaySection(protected_headers=("X-Genesys-*", "x-mailer")))
    assert pats[:len(DEFAULT_PROTECTED)] == DEFAULT_PROTECTED
    assert "X-Genesys-*" in pats and len(pats) == len(DEFAULT_PROTECTED) + 1
    msg = b"X-Genesys-Conversation: abc\r\nSubject: x\r\n\r\nb"
    assert protected_lines(msg, pats) == [b"X-Genesys-Conversation: abc\r\n"]


@pytest.mark.parametrize("header", ["X-Mailer", "x-zendesk-email-id", "Message-ID",
                                    "References", "Auto-Submitted", "X-Auto-Response-Suppress",
                                    "In-Reply-To"])
@pytest.mark.parametrize("action", ["add", "remove", "replace"])
def test_rule_on_protected_header_refused(header: str, action: str) -> None:
    rule = HeaderRule(action, header, "v", line=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        check_rules([rule], DEFAULT_PROTECTED, where="upstream office365")
    text = info.value.explain()
    assert ":42:" in text and header in text and action in text
    assert "upstream office365" in text and info.value.hint


def test_rule_on_trace_header_refused() -> None:
    with pytest.raises(ConfigError, match="trace header"):
        check_rules([HeaderRule("remove", "Received", line=3)], DEFAULT_PROTECTED)


def test_check_rules_on_a_whole_config() -> None:
    relay = RelaySection(protected_headers=("X-Campaign-*",))
    listener = ListenerConfig(name="platform", protocol="smtp", listen=HostPort("127.0.0.1", 1),
                              header_rules=(HeaderRule("add", "X-Ok", "1", line=5),))
    up = UpstreamConfig(name="o365", protocol="smtp")
    route = RouteConfig(upstream="o365", line=30,
                        header_rules=(HeaderRule("remove", "X-Campaign-Id", line=31),))
    config = Config(source=Path("relay.toml"), relay=relay, metrics=MetricsConfig(),
                    listeners=(listener,), upstreams=(up,), routes=(route,))
    with pytest.raises(ConfigError) as info:
        check_rules(config)
    assert ":31:" in str(info.value) and "X-Campaign-Id" in str(info.value)
    assert "route[0]" in str(info.value)
    ok = Config(source=Path("relay.toml"), relay=relay, metrics=MetricsConfig(),
                listeners=(listener,), upstreams=(up,))
    check_rules(ok)


def test_prepend_only_trace_headers() -> None:
    with pytest.raises(ValueError, match="only prepends trace headers"):
        prepend(ZENDESK, b"X-Mailer: relay\r\n")


def test_rules_replace_adds_when_absent_and_keep_lf() -> None:
    lf = b"Subject: a\nX-Old: 1\n continued\n\nbody\n"
    out = apply_rules(lf, (HeaderRule("replace", "X-New", "v"),
                           HeaderRule("remove", "X-Old")))
    assert out == b"Subject: a\nX-New: v\n\nbody\n"


def test_forged_authentication_results_removed() -> None:
    from relay.headers import remove_forged_results

    msg = (b"Received: x\r\n"
           b"Authentication-Results: Relay.Example.Org;\r\n\tspf=pass smtp.mailfrom=a@b\r\n"
           b"Authentication-Results: mx.other.example; dkim=pass\r\n"
           b"Authentication-Results: relay.example.org.evil; spf=pass\r\n"
           b"Subject: s\r\n\r\nAuthentication-Results: relay.example.org; body\r\n")
    out = remove_forged_results(msg, "relay.example.org")
    assert out == msg.replace(
        b"Authentication-Results: Relay.Example.Org;\r\n\tspf=pass smtp.mailfrom=a@b\r\n", b"")
    assert remove_forged_results(ZENDESK, "relay.example.org") is ZENDESK
