"""Build the mail-policy entries: [[route]], [[dkim]] and [[profile]]."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, cast

from relay.config.reader import Table, show, suggest
from relay.config.schema import DkimKeyConfig, ProfileConfig, RouteConfig
from relay.config.sections import priority, read_header_rules, size, structure_checks
from relay.config.values import is_domain, is_name, is_selector

_ROUTE_DOMAIN = 'a domain such as "example.com" or "*.example.com"'


def _route_domain(value: str) -> bool:
    return is_domain(value.removeprefix("*.")) and "*" not in value.removeprefix("*.")


def read_route(t: Table) -> RouteConfig:
    sender = t.opt_text("sender_domain", expected=_ROUTE_DOMAIN, check=_route_domain)
    recipient = t.opt_text("recipient_domain", expected=_ROUTE_DOMAIN, check=_route_domain)
    cfg = RouteConfig(
        upstream=t.text("upstream", required=True, expected="the name of an [[upstream]]"),
        sender_domain=sender.lower() if sender else None,
        recipient_domain=recipient.lower() if recipient else None,
        header_rules=read_header_rules(t),
        priority=priority(t, None),
        line=t.ctx.line(t.path) or 0,
    )
    t.finish()
    return cfg


def read_dkim(t: Table) -> DkimKeyConfig:
    domain = t.text("domain", required=True, expected='a domain such as "example.com"',
                   check=is_domain)
    selector = t.text("selector", required=True, expected='a selector such as "relay2025"',
                     check=is_selector)
    key_file = t.file("key_file", required=True, exists=True, readable=True, private=True)
    assert key_file is not None
    algorithm = t.enum("algorithm", ("rsa-sha256", "ed25519-sha256"), "rsa-sha256")
    on_failure = t.enum("on_failure", ("refuse", "send-unsigned"), "refuse")
    cfg = DkimKeyConfig(domain=domain.lower().rstrip("."), selector=selector, key_file=key_file,
                        algorithm=cast(Literal["rsa-sha256", "ed25519-sha256"], algorithm),
                        on_failure=cast(Literal["refuse", "send-unsigned"], on_failure),
                        line=t.ctx.line(t.path) or 0)
    t.finish()
    return cfg


def read_profile(t: Table, known: Mapping[str, ProfileConfig] | None = None) -> ProfileConfig:
    """One [[profile]]; with ``extends = "NAME"`` it starts from that profile's limits."""
    name = t.text("name", required=True, expected='a name such as "exchange-online"',
                 check=is_name)
    base: ProfileConfig | None = None
    parent = t.opt_text("extends", expected="the name of a profile defined before this one")
    if parent is not None:
        base = (known or {}).get(parent)
        if base is None or parent == name:
            names = [n for n in (known or {}) if n != name]
            raise t.error("extends", "unknown profile", got=show(parent),
                          expected="the name of a shipped profile or one defined above",
                          hint=suggest(parent, names) or
                          f"known profiles: {', '.join(names) or 'none'}")

    def inherit(key: str) -> object:
        return getattr(base, key) if base is not None else None

    def number(key: str) -> int | None:
        value = inherit(key)
        return t.integer(key, value if isinstance(value, int) else None, min=1)

    def bytes_(key: str) -> int | None:
        value = inherit(key)
        return size(t, key, value if isinstance(value, int) else None)

    cfg = ProfileConfig(
        name=name,
        max_recipients=number("max_recipients"),
        max_subject_chars=number("max_subject_chars"),
        max_local_part=number("max_local_part"),
        max_display_name=number("max_display_name"),
        max_body_bytes=bytes_("max_body_bytes"),
        max_message_bytes=bytes_("max_message_bytes"),
        allow_attachments=t.flag("allow_attachments",
                                 base.allow_attachments if base is not None else True),
        messages_per_minute=number("messages_per_minute"),
        bytes_per_5min=bytes_("bytes_per_5min"),
        recipients_per_day=number("recipients_per_day"),
        structure_checks=structure_checks(t, "structure_checks",
                                          base.structure_checks if base is not None else ()),
        connections_per_mailbox=number("connections_per_mailbox"),
        line=t.ctx.line(t.path) or 0,
    )
    t.text("description")
    t.finish()
    return cfg
