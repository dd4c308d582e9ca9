"""Build the provider-facing sections: [[upstream]], [[proxy]], [[token_source]], [[account]].

Secrets are read here (``*_env`` / ``*_file``); references to other entries by name are
checked later by ``relay.config.references``.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import urllib.parse
from pathlib import Path
from typing import Any, Literal, cast

from relay.config.pacing import read_quotas
from relay.config.reader import Table, show
from relay.config.schema import AccountConfig, ProxyConfig, TokenSourceConfig, UpstreamConfig
from relay.config.sections import (
    SMTP_UPSTREAM_ONLY,
    TLS_MODES,
    default,
    duration,
    read_header_rules,
)
from relay.config.values import (
    OWNED_EXPECTED,
    BadValue,
    is_address,
    is_domain,
    is_name,
    is_owned,
    parse_host,
)

log = logging.getLogger("relay.config")

UPSTREAM_PORTS = {
    "smtp": {"none": 25, "starttls": 587, "implicit": 465},
    "imap": {"none": 143, "starttls": 143, "implicit": 993},
    "pop3": {"none": 110, "starttls": 110, "implicit": 995},
}
_NOT_FOR_OUTBOX = ("host", "port", "tls", "ca_file", "verify_tls", "tls_server_name", "auth",
                   "username", "password_env", "password_file", "token_source", "via",
                   "helo_name")
TOKEN_URLS = {"microsoft": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
              "google": "https://oauth2.googleapis.com/token"}
SCOPES = {"microsoft": "https://outlook.office365.com/.default",
          "google": "https://mail.google.com/", "custom": ""}


def read_upstream(t: Table) -> UpstreamConfig:
    D = UpstreamConfig
    name = t.text("name", required=True, expected='a name such as "office365"', check=is_name)
    protocol = t.enum("protocol", ("smtp", "imap", "pop3", "outbox"))
    if protocol == "outbox":
        for key in _NOT_FOR_OUTBOX:
            if key in t:
                raise t.error(key, "does not apply to outbox upstreams",
                              hint="an outbox upstream writes .eml files into `path`; "
                                   "remove this line or change the protocol")
        path = t.file("path", required=True)
        cfg = UpstreamConfig(name=name, protocol="outbox", tls="none", path=path,
                             max_connections=_int(t, "max_connections", D),
                             profile=t.opt_text("profile"), header_rules=read_header_rules(t),
                             **_pacing(t), line=t.ctx.line(t.path) or 0)
        t.finish()
        return cfg
    if "path" in t:
        raise t.error("path", f"{protocol} upstreams take no path",
                      hint='`path` is for protocol = "outbox"')
    tls = t.enum("tls", TLS_MODES, default(D, "tls"))
    host = t.parsed("host", _host, "", expected='a host such as "smtp.office365.com"',
                    required=True)
    port = t.integer("port", UPSTREAM_PORTS[protocol][tls], min=1, max=65535)
    verify = t.flag("verify_tls", default(D, "verify_tls"))
    ca_file = _ca_file(t)
    username = t.text("username")
    password = t.secret("password")
    token_source = t.opt_text("token_source")
    auth = _auth(t, protocol, username, password is not None, token_source)
    cfg = UpstreamConfig(
        name=name,
        protocol=cast(Literal["smtp", "imap", "pop3", "outbox"], protocol),
        host=host,
        port=port or 0,
        tls=cast(Literal["none", "starttls", "implicit"], tls),
        ca_file=ca_file,
        verify_tls=verify,
        tls_server_name=t.opt_text("tls_server_name", expected="a host name", check=is_domain),
        auth=cast(Literal["none", "password", "xoauth2", "passthrough"], auth),
        username=username,
        password=password,
        token_source=token_source,
        via=t.opt_text("via"),
        max_connections=_int(t, "max_connections", D),
        max_messages_per_connection=_int(t, "max_messages_per_connection", D),
        connect_timeout=duration(t, "connect_timeout", D, min=0.001),
        command_timeout=duration(t, "command_timeout", D, min=0.001),
        data_timeout=duration(t, "data_timeout", D, min=0.001),
        helo_name=t.opt_text("helo_name", expected="a host name", check=is_domain),
        profile=t.opt_text("profile"),
        header_rules=read_header_rules(t),
        **_pacing(t),
        line=t.ctx.line(t.path) or 0,
    )
    t.finish()
    if protocol != "smtp":
        for key in SMTP_UPSTREAM_ONLY:
            if key in t.raw:
                raise t.error(key, "only applies to smtp upstreams",
                              hint=f"remove it from this {protocol} upstream")
    if not verify:
        t.warn("verify_tls", f"TLS certificate verification is OFF for upstream {name!r}: "
                             "anyone on the path can read and alter this mail and its "
                             "credentials")
    if tls == "none" and password is not None:
        t.warn("tls", f"upstream {name!r} sends its password without TLS")
    return cfg


def _pacing(t: Table) -> dict[str, Any]:
    """An upstream's pacing keys: [[upstream.quota]], connections_per_mailbox, mailbox."""
    return {"quotas": read_quotas(t),
            "connections_per_mailbox": t.integer("connections_per_mailbox", None, min=1),
            "mailbox": t.enum("mailbox", ("account", "sender"), "account")}


def _int(t: Table, key: str, cls: type) -> int:
    value = t.integer(key, default(cls, key), min=1)
    assert value is not None
    return value


def _host(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise BadValue("not a host", expected='a host such as "smtp.office365.com"')
    if ":" in value and not value.startswith("["):
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise BadValue("port written into host", expected="a host without :PORT",
                           hint="put the port in `port = N`") from None
        return value
    return parse_host(value.strip("[]"))


def _auth(t: Table, protocol: str, username: str, has_password: bool,
          token_source: str | None) -> str:
    explicit = t.enum("auth", ("none", "password", "xoauth2", "passthrough"), "") or None
    if has_password and not username:
        raise t.error("username", "a password is set but no username",
                      expected="the mailbox or login name")
    if has_password and token_source:
        raise t.error("token_source", "both a password and a token_source are set",
                      expected="one way to authenticate")
    inferred = "password" if has_password else "xoauth2" if token_source else "none"
    if explicit is None:
        if username and inferred == "none":
            raise t.error("username", "a username is set but no password or token_source",
                          expected="password_env, password_file or token_source")
        return inferred
    if explicit == "passthrough" and protocol == "smtp":
        raise t.error("auth", "passthrough is only for imap/pop3 upstreams", got='"passthrough"',
                      expected='"none", "password" or "xoauth2"',
                      hint="relay stores SMTP mail before delivery, so it has no client "
                           "credentials to pass on; use accounts or upstream credentials")
    if explicit in ("passthrough", "none") and inferred != "none":
        raise t.error("auth", f'auth = "{explicit}" but credentials are set', got=show(explicit),
                      expected=f'"{inferred}"')
    if (explicit == "password" and inferred == "xoauth2") or \
            (explicit == "xoauth2" and inferred == "password"):
        raise t.error("auth", "auth does not match the credentials given", got=show(explicit),
                      expected=f'"{inferred}"')
    return explicit


def read_proxy(t: Table) -> ProxyConfig:
    name = t.text("name", required=True, expected='a name such as "dante"', check=is_name)
    url = t.text("url", required=True,
                expected='"socks5://[user@]host[:1080]" or "ssh://user@host[:22]"')
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("socks5", "ssh"):
        hint = "SOCKS4 and HTTP proxies are not supported" if scheme else ""
        raise t.error("url", "unsupported proxy scheme", got=show(url),
                      expected='"socks5://..." or "ssh://..."', hint=hint)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise t.error("url", "unexpected path or query in proxy url", got=show(url),
                      expected=f'"{scheme}://[user@]host:port"')
    try:
        port = parts.port or (1080 if scheme == "socks5" else 22)
        host = parse_host(parts.hostname or "")
    except BadValue as exc:
        fixed = url.replace(parts.hostname or "", exc.expected.strip('"'), 1)
        raise t.error("url", exc.what, got=None if parts.password else show(url),
                      expected=show(fixed) if "comma" in exc.what else exc.expected,
                      hint=exc.hint) from None
    except ValueError as exc:
        raise t.error("url", "bad host or port in proxy url",
                      got=None if parts.password else show(url),
                      expected=f'"{scheme}://[user@]host:port"', hint=str(exc)) from None
    if parts.password is not None:                      # never echo it back
        raise t.error("url", "password inside the url is not accepted",
                      expected=f'"{scheme}://{parts.username}@{host}:{port}" with '
                               "password_env or password_file",
                      hint="move the password to an environment variable or a file")
    username = urllib.parse.unquote(parts.username or "")
    password = t.secret("password")
    if password is not None and not username:
        raise t.error("url", "a proxy password is set but the url has no user",
                      got=show(url), expected=f'"{scheme}://USER@{host}:{port}"')
    if scheme == "ssh":
        if "remote_dns" in t:
            raise t.error("remote_dns", "remote_dns only applies to socks5 proxies",
                          hint="SSH channels always resolve names on the bastion")
        if not username:
            raise t.error("url", "ssh proxies need a user", got=show(url),
                          expected=f'"ssh://USER@{host}:{port}"')
        known_hosts = t.file("known_hosts", exists=True, readable=True)
        if known_hosts is None:
            raise t.error("known_hosts", "ssh proxies need a known_hosts file",
                          expected="a file path",
                          hint=f"relay never trusts an unknown host key; create it with "
                               f"`ssh-keyscan -p {port} {host} > known_hosts` and check "
                               "the fingerprint")
        key_file = t.file("key_file", exists=True, readable=True, private=True)
        if key_file is None and password is None:
            raise t.error("key_file", "ssh proxies need key_file (or a password)",
                          expected="a private key file path")
    else:
        for k in ("key_file", "known_hosts"):
            if k in t:
                raise t.error(k, f"{k} only applies to ssh proxies")
        known_hosts = key_file = None
    cfg = ProxyConfig(name=name, kind=cast(Literal["socks5", "ssh"], scheme), host=host,
                      port=port, username=username, password=password,
                      remote_dns=t.flag("remote_dns", default(ProxyConfig, "remote_dns")),
                      key_file=key_file, known_hosts=known_hosts,
                      connect_timeout=duration(t, "connect_timeout", ProxyConfig, min=0.001),
                      line=t.ctx.line(t.path) or 0)
    t.finish()
    return cfg


def _ca_file(t: Table) -> Path | None:
    """An optional ``ca_file``: a readable PEM bundle that ssl can load."""
    ca_file = t.file("ca_file", exists=True, readable=True)
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (ssl.SSLError, ValueError) as exc:
            raise t.error("ca_file", "cannot load CA certificates", got=show(t.raw["ca_file"]),
                          expected="a PEM file of CA certificates", hint=str(exc)) from None
    return ca_file


def read_token_source(t: Table) -> TokenSourceConfig:
    D = TokenSourceConfig
    name = t.text("name", required=True, expected='a name such as "o365"', check=is_name)
    kind = t.enum("kind", ("client_credentials", "refresh_token", "static"))
    provider = t.enum("provider", ("microsoft", "google", "custom"), default(D, "provider"))
    tenant = t.text("tenant", expected='a tenant id or domain such as "contoso.onmicrosoft.com"')
    token_url = t.text("token_url", expected='an https URL', check=_token_url)
    if not token_url and kind != "static":
        if provider == "custom":
            raise t.error("token_url", 'provider = "custom" needs a token_url',
                          expected="an https URL")
        if provider == "microsoft" and not tenant:
            raise t.error("tenant", "Microsoft token sources need a tenant",
                          expected='a tenant id or domain such as "contoso.onmicrosoft.com"')
        token_url = TOKEN_URLS[provider].format(tenant=tenant)
    client_id = t.text("client_id")
    secret = t.secret("client_secret")
    cert = t.file("certificate_file", exists=True, readable=True)
    cert_key = t.file("certificate_key_file", exists=True, readable=True, private=True)
    if (cert is None) != (cert_key is None):
        raise t.error("certificate_key_file" if cert else "certificate_file",
                      "certificate_file and certificate_key_file go together",
                      expected="both files")
    refresh = t.file("refresh_token_file")
    token_file = t.file("token_file", exists=kind == "static", readable=kind == "static",
                        private=kind == "static")
    if kind != "static" and not client_id:
        raise t.error("client_id", f"{kind} token sources need a client_id",
                      expected="the application (client) id")
    if kind == "client_credentials":
        if provider == "google":
            raise t.error("kind", "Google has no client_credentials grant for mail",
                          got=show(kind), expected='"refresh_token"')
        if secret is None and cert is None:
            raise t.error("client_secret_env", "client_credentials needs a client secret "
                          "or a certificate", expected="client_secret_env, client_secret_file"
                          " or certificate_file + certificate_key_file")
        if secret is not None and cert is not None:
            raise t.error("certificate_file", "both a client secret and a certificate are set",
                          expected="one of them")
    elif kind == "refresh_token":
        if refresh is None:
            raise t.error("refresh_token_file", "refresh_token needs refresh_token_file",
                          expected="a file path (relay rewrites it when the token rotates)")
        if not refresh.parent.is_dir():
            raise t.error("refresh_token_file", "its directory does not exist",
                          got=show(t.raw["refresh_token_file"]), hint=f"create {refresh.parent}")
        if not refresh.exists():
            t.warn("refresh_token_file", f"{refresh} does not exist yet; token requests "
                                         "fail until it holds a refresh token")
    elif token_file is None:
        raise t.error("token_file", "static token sources need token_file",
                      expected="a file path holding the access token")
    cfg = TokenSourceConfig(
        name=name, kind=cast(Literal["client_credentials", "refresh_token", "static"], kind),
        provider=cast(Literal["microsoft", "google", "custom"], provider),
        token_url=token_url, tenant=tenant, client_id=client_id, client_secret=secret,
        certificate_file=cert, certificate_key_file=cert_key,
        scope=t.text("scope", SCOPES[provider] or default(D, "scope")),
        refresh_token_file=refresh, token_file=token_file, via=t.opt_text("via"),
        ca_file=_ca_file(t), refresh_margin=duration(t, "refresh_margin", D),
        request_timeout=duration(t, "request_timeout", D, min=0.001),
        line=t.ctx.line(t.path) or 0)
    t.finish()
    return cfg


def _token_url(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme == "http" and parts.hostname:       # only for a local test endpoint
        try:
            return ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            return parts.hostname == "localhost"
    return False


def read_account(t: Table) -> AccountConfig:
    upstream = t.text("upstream", required=True, expected="the name of an [[upstream]]")
    user = t.opt_text("user", expected="a relay user name")
    sender = t.opt_text("sender", expected='an address such as "sales@example.com"',
                       check=is_address)
    if user is None and sender is None:
        raise t.error("user", "an account applies to a user or a sender",
                      expected="user = \"NAME\" (from the users file) or sender = \"ADDRESS\"")
    username = t.text("username", required=True, expected="the mailbox at the provider")
    password = t.secret("password")
    token_source = t.opt_text("token_source")
    if password is not None and token_source is not None:
        raise t.error("token_source", "both a password and a token_source are set",
                      expected="one way to authenticate")
    owns = t.str_list("owns", expected=OWNED_EXPECTED, check=is_owned)
    if owns and user is None:
        raise t.error("owns", "owns applies to a relay user, and this account has none",
                      expected='user = "NAME" beside owns',
                      hint="owns lists the addresses a user who logs in to relay may send "
                           "as; an account chosen by sender needs no owner")
    cfg = AccountConfig(upstream=upstream, user=user,
                        sender=sender.lower() if sender else None, username=username,
                        password=password, token_source=token_source,
                        owns=tuple(o.lower() for o in owns), line=t.ctx.line(t.path) or 0)
    t.finish()
    return cfg
