"""Build the mail-policy entries: [[route]], [[dkim]] and [[profile]]."""

from __future__ import annotations

from typing import Literal, cast

from relay.config.reader import Table
from relay.config.schema import DkimKeyConfig, ProfileConfig, RouteConfig
from relay.config.sections import priority, read_header_rules, size
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
    cfg = DkimKeyConfig(domain=domain.lower().rstrip("."), selector=selector, key_file=key_file,
                        algorithm=cast(Literal["rsa-sha256", "ed25519-sha256"], algorithm),
                        line=t.ctx.line(t.path) or 0)
    t.finish()
    return cfg


def read_profile(t: Table) -> ProfileConfig:
    name = t.text("name", required=True, expected='a name such as "exchange-online"',
                 check=is_name)
    cfg = ProfileConfig(
        name=name,
        max_recipients=t.integer("max_recipients", None, min=1),
        max_subject_chars=t.integer("max_subject_chars", None, min=1),
        max_local_part=t.integer("max_local_part", None, min=1),
        max_display_name=t.integer("max_display_name", None, min=1),
        max_body_bytes=size(t, "max_body_bytes", None),
        max_message_bytes=size(t, "max_message_bytes", None),
        allow_attachments=t.flag("allow_attachments", True),
        messages_per_minute=t.integer("messages_per_minute", None, min=1),
        bytes_per_5min=size(t, "bytes_per_5min", None),
        recipients_per_day=t.integer("recipients_per_day", None, min=1),
        connections_per_mailbox=t.integer("connections_per_mailbox", None, min=1),
        line=t.ctx.line(t.path) or 0,
    )
    t.text("description")
    t.finish()
    return cfg
