"""Build one [[listener]] from its table, with the rules that need only that listener.

The listener's keys and defaults (ports by protocol and TLS mode, the proxy's session
limits), which keys belong to SMTP or to the proxy, no accidental open relay, and a
certificate that matches its key. Rules that involve an upstream are checked afterwards
by ``relay.config.references``.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from typing import Literal, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from relay.config.addresses import AddressSets, expand
from relay.config.reader import Table, show
from relay.config.schema import (
    PROXY_MAX_CONNECTIONS,
    PROXY_MAX_CONNECTIONS_PER_CLIENT,
    STRUCTURE_LEVELS,
    ListenerConfig,
    Network,
)
from relay.config.sections import (
    TLS_MODES,
    default,
    duration,
    hostport,
    priority,
    read_header_rules,
    size,
    structure_checks,
)
from relay.config.values import (
    is_domain,
    is_loopback_host,
    is_name,
)

# Default ports when `listen`/`host` gives none: by protocol, then by TLS mode.
DEFAULT_PORTS = {
    "smtp": {"none": 25, "starttls": 587, "implicit": 465},
    "imap": {"none": 143, "starttls": 143, "implicit": 993},
    "pop3": {"none": 110, "starttls": 110, "implicit": 995},
}


def read_listener(t: Table, sets: AddressSets, *, sets_hint: str) -> ListenerConfig:
    D = ListenerConfig
    name = t.text("name", required=True, expected='a name such as "platform"', check=is_name)
    protocol = t.enum("protocol", ("smtp", "imap", "pop3"))
    tls = t.enum("tls", TLS_MODES, default(D, "tls"))
    listen = hostport(t, "listen", None, default_port=DEFAULT_PORTS[protocol][tls])
    if listen is None:
        raise t.error("listen", "missing required key",
                      expected='"HOST:PORT" such as "127.0.0.1:2525"')
    cert = t.file("cert", exists=True, readable=True)
    key = t.file("key", exists=True, readable=True, private=True)
    if tls != "none":
        if cert is None or key is None:
            missing = "cert" if cert is None else "key"
            raise t.error(missing, f'tls = "{tls}" needs a certificate and its key',
                          expected="cert and key file paths",
                          hint="give cert (PEM chain) and key (PEM private key)")
        if t.ctx.secrets:                  # the key is a secret: not opened otherwise
            check_cert(t, cert, key)
    elif cert is not None or key is not None:
        raise t.error("cert" if cert is not None else "key", 'cert/key given but tls = "none"',
                      expected='tls = "starttls" or "implicit", or no cert/key',
                      hint="remove the cert and key lines, or switch TLS on")
    auth = t.enum("auth", ("required", "none"), default(D, "auth"))
    users_file = t.file("users_file")
    allow = expand(t, "allow", sets, sets_hint=sets_hint)
    plaintext = t.flag("allow_plaintext_auth", default(D, "allow_plaintext_auth"))
    relay_domains = t.str_list("relay_domains", expected='domains such as "example.com"',
                               check=is_domain)
    upstream = t.opt_text("upstream")
    spf = t.enum("spf", ("off", "tag", "reject"), default(D, "spf"))
    proxy = protocol != "smtp"
    auth_level = "strict" if auth == "required" else "standard"
    cfg = ListenerConfig(
        name=name,
        protocol=cast(Literal["smtp", "imap", "pop3"], protocol),
        listen=listen,
        tls=cast(Literal["none", "starttls", "implicit"], tls),
        cert=cert,
        key=key,
        auth=cast(Literal["required", "none"], auth),
        users_file=users_file,
        allow=allow,
        allow_plaintext_auth=plaintext,
        relay_domains=tuple(d.lower().rstrip(".") for d in relay_domains),
        max_message_size=size(t, "max_message_size", default(D, "max_message_size")) or 0,
        max_recipients=t.integer("max_recipients", default(D, "max_recipients"), min=1) or 1,
        max_connections=t.integer("max_connections", PROXY_MAX_CONNECTIONS if proxy
                                  else default(D, "max_connections"), min=1) or 1,
        max_connections_per_client=t.integer(
            "max_connections_per_client", PROXY_MAX_CONNECTIONS_PER_CLIENT if proxy
            else default(D, "max_connections_per_client"), min=1) or 1,
        command_timeout=duration(t, "command_timeout", D, min=0.001),
        data_timeout=duration(t, "data_timeout", D, min=0.001),
        auth_fail_limit=t.integer("auth_fail_limit", default(D, "auth_fail_limit"), min=1) or 1,
        auth_fail_window=duration(t, "auth_fail_window", D, min=0.001),
        spf=cast(Literal["off", "tag", "reject"], spf),
        dkim_verify=t.flag("dkim_verify", default(D, "dkim_verify")),
        profile=t.opt_text("profile"),
        header_rules=read_header_rules(t),
        structure_checks=structure_checks(t, "structure_checks", STRUCTURE_LEVELS[auth_level]),
        max_header_size=size(t, "max_header_size", default(D, "max_header_size"),
                             min=1024) or 0,
        add_missing_headers=t.flag("add_missing_headers", default(D, "add_missing_headers")),
        sender_ownership=cast(Literal["enforce", "log"], t.enum(
            "sender_ownership", ("enforce", "log"), default(D, "sender_ownership"))),
        spf_permerror=cast(Literal["tag", "reject"], t.enum(
            "spf_permerror", ("tag", "reject"), default(D, "spf_permerror"))),
        upstream=upstream,
        login_timeout=duration(t, "login_timeout", D, min=0.001),
        idle_timeout=duration(t, "idle_timeout", D, min=0.001),
        max_line=t.integer("max_line", default(D, "max_line"), min=64) or 64,
        on_upstream_change=cast(Literal["reconnect", "keep"], t.enum(
            "on_upstream_change", ("reconnect", "keep"), default(D, "on_upstream_change"))),
        priority=priority(t, default(D, "priority")) or 0,
        tls_handshake_timeout=duration(t, "tls_handshake_timeout", D, min=0.001),
        data_deadline=duration(t, "data_deadline", D, min=0.001),
        min_data_rate=t.integer("min_data_rate", default(D, "min_data_rate"), min=0) or 0,
        max_junk_commands=t.integer("max_junk_commands", default(D, "max_junk_commands"),
                                    min=1) or 1,
        max_connection_rate_per_client=t.integer(
            "max_connection_rate_per_client", default(D, "max_connection_rate_per_client"),
            min=0) or 0,
        reserved_connections=t.integer("reserved_connections", None, min=0),
        client_ipv4_prefix=t.integer("client_ipv4_prefix", default(D, "client_ipv4_prefix"),
                                     min=8, max=32) or 32,
        client_ipv6_prefix=t.integer("client_ipv6_prefix", default(D, "client_ipv6_prefix"),
                                     min=16, max=128) or 64,
        dangerously_allow_open_relay=t.flag("dangerously_allow_open_relay",
                                            default(D, "dangerously_allow_open_relay")),
        line=t.ctx.line(t.path) or 0,
    )
    t.finish()
    _listener_rules(t, cfg)
    return cfg


SMTP_ONLY = ("relay_domains", "max_message_size", "max_recipients", "command_timeout",
             "data_timeout", "spf", "dkim_verify", "profile", "header_rule",
             "data_deadline", "min_data_rate", "dangerously_allow_open_relay",
             "priority", "structure_checks", "max_header_size",
             "add_missing_headers", "sender_ownership", "spf_permerror")
PROXY_ONLY = ("upstream", "login_timeout", "idle_timeout", "max_line", "on_upstream_change")


def _listener_rules(t: Table, cfg: ListenerConfig) -> None:
    """Rules within one listener; rules that involve an upstream are in references."""
    for key in PROXY_ONLY if cfg.protocol == "smtp" else SMTP_ONLY:
        if key in t.raw and not (key == "upstream" and cfg.protocol == "smtp"):
            other = "imap/pop3" if cfg.protocol == "smtp" else "smtp"
            raise t.error(key, f"only applies to {other} listeners",
                          hint=f"remove it from this {cfg.protocol} listener")
    if cfg.protocol == "smtp":
        if cfg.upstream is not None:
            raise t.error("upstream", "only imap/pop3 listeners take an upstream",
                          hint="SMTP mail is routed with [[route]] and relay.default_upstream")
        if cfg.auth == "none" and not cfg.allow and not cfg.relay_domains:
            raise t.error("auth", 'auth = "none" without allow or relay_domains',
                          got='"none"', expected="a non-empty allow (networks) or relay_domains",
                          hint="relay refuses to be an open relay: list the client networks "
                               'in allow (e.g. allow = ["10.20.0.0/16"]) or require AUTH')
        _open_relay(t, cfg)
        if cfg.auth == "required" and cfg.users_file is None:
            hint = "create it with `relay user add NAME`"
            if cfg.allow:
                hint += ', or set auth = "none" to accept only the allow-listed networks'
            raise t.error("users_file", 'auth = "required" needs a users file',
                          expected="a file path", hint=hint)
    else:
        if cfg.upstream is None:
            raise t.error("upstream", f"{cfg.protocol} listeners need an upstream",
                          expected=f"the name of an [[upstream]] with protocol = "
                                   f'"{cfg.protocol}"')
        if cfg.auth == "none":
            raise t.error("auth", f'{cfg.protocol} clients always log in; auth = "none" '
                          "is not supported", got='"none"', expected='"required"',
                          hint="relay checks logins against users_file, or passes them to "
                               'an upstream with auth = "passthrough"')
    if cfg.reserved_connections is not None and cfg.reserved_connections >= cfg.max_connections:
        raise t.error("reserved_connections", "leaves no slot for clients already connected",
                      got=str(cfg.reserved_connections),
                      expected=f"fewer than max_connections ({cfg.max_connections})",
                      hint="the reserve is the part of max_connections kept for client "
                           "networks that hold no connection yet; the default is a tenth, "
                           "at most 100")
    if cfg.allow_plaintext_auth and cfg.tls != "none":
        raise t.error("allow_plaintext_auth", f'plaintext AUTH on a tls = "{cfg.tls}" listener',
                      got="true", expected='false (clients authenticate after TLS)',
                      hint="allow_plaintext_auth only applies to tls = \"none\" listeners; "
                           "with TLS configured, credentials always wait for TLS")
    logs_in = cfg.protocol != "smtp" or cfg.auth == "required"
    if logs_in and cfg.tls == "none" and not cfg.allow_plaintext_auth:
        raise t.error("tls", "clients could never log in on this listener", got='"none"',
                      expected='"starttls" or "implicit" (with cert and key)',
                      hint="logins wait for TLS, and this listener has none: switch TLS on, "
                           "set allow_plaintext_auth = true (loopback only)"
                           + (', or use auth = "none" with allow if only listed networks send'
                              if cfg.protocol == "smtp" else ""))
    if cfg.protocol == "smtp" and cfg.auth == "required" and cfg.sender_ownership == "log":
        t.warn("sender_ownership", "not enforced: users who log in may send as any address "
                                   "(each message sent as an address the user does not own "
                                   "is logged)")
    if cfg.users_file is not None and not cfg.users_file.exists():
        t.warn("users_file", f"{cfg.users_file} does not exist yet; nobody can log in "
                             "until `relay user add NAME` creates it")
    if cfg.allow_plaintext_auth and not is_loopback_host(cfg.listen.host):
        t.warn("allow_plaintext_auth", f"passwords travel in clear on {cfg.listen}, "
                                       "which is not a loopback address")


def everywhere(allow: tuple[Network, ...]) -> str | None:
    """The address families (``"IPv4"``, ``"IPv6"``, ``"IPv4 and IPv6"``) whose every
    address ``allow`` covers, or None."""
    v4 = [n for n in allow if n.version == 4]
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    v4 += [ipaddress.IPv4Network("0.0.0.0/0") for n in allow
           if n.version == 6 and mapped.subnet_of(n)]
    v6 = [n for n in allow if n.version == 6]
    families = []
    if any(n.prefixlen == 0 for n in ipaddress.collapse_addresses(v4)):
        families.append("IPv4")
    if any(n.prefixlen == 0 for n in ipaddress.collapse_addresses(v6)):
        families.append("IPv6")
    return " and ".join(families) or None


def _open_relay(t: Table, cfg: ListenerConfig) -> None:
    """Refuse a listener that would relay anyone's mail to any domain (unless told to)."""
    family = everywhere(cfg.allow)
    if family is None:
        if cfg.dangerously_allow_open_relay:
            t.warn("dangerously_allow_open_relay", "set, but this listener is not an open "
                                                   "relay; remove the line")
        return
    if cfg.dangerously_allow_open_relay:
        t.warn("dangerously_allow_open_relay", f"listener {cfg.name} IS AN OPEN RELAY: any "
               f"client on {family} may send mail through it to any domain without logging "
               "in; spammers find such relays within hours")
        return
    raise t.error("allow", f"this listener would be an open relay: clients from every "
                  f"{family} address may send mail to any domain without logging in",
                  got=show(t.raw.get("allow")),
                  expected="the networks of the clients that may send without logging in",
                  hint="list only your platform's networks (e.g. allow = [\"10.20.0.0/16\", "
                       "\"cxone-na1\"]) and let everyone else log in with auth = \"required\"; "
                       "if you really mean to run an open relay, set "
                       "dangerously_allow_open_relay = true on this listener")


def check_cert(t: Table, cert: Path, key: Path) -> None:
    """Load the pair the way the listener will, so a bad PEM is a config error naming it."""
    try:
        x509.load_pem_x509_certificates(cert.read_bytes())
    except ValueError:
        raise t.error("cert", "not a PEM certificate", got=show(t.raw["cert"]),
                      expected="a file of -----BEGIN CERTIFICATE----- blocks",
                      hint=f"{cert}: server certificate first, then its intermediates") from None
    try:
        serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise t.error("key", "not an unencrypted PEM private key", got=show(t.raw["key"]),
                      expected="a -----BEGIN PRIVATE KEY----- block",
                      hint=f"{key}: relay cannot ask for a passphrase; decrypt it with "
                           "`openssl pkey -in KEY -out KEY.plain`") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError:
        raise t.error("key", "certificate and key do not match", got=show(t.raw["key"]),
                      expected=f"the private key of {t.raw['cert']}",
                      hint=f"{key} is not the key {cert} was issued for") from None
    except OSError as exc:
        raise t.error("cert", "cannot read certificate/key", got=show(t.raw["cert"]),
                      hint=str(exc)) from None
