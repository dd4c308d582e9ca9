"""The typed config: frozen dataclasses that the loader fills and validates.

Everything relay does is driven by one ``Config``; nothing reads config from a global.
Sizes are bytes, durations seconds, networks ``ipaddress`` objects; secrets are ``Secret``
so they never print. Named address sets are already expanded into ``allow``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from relay.config.machine import auto_smtp_processes

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
TlsMode = Literal["none", "starttls", "implicit"]


class Secret:
    """A secret value (password, client secret) that never appears in repr/str/logs."""

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str = "") -> None:
        self._value = value
        self.origin = origin          # e.g. "env O365_PASSWORD" or "file /etc/relay/pw"

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.origin or '***'})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RetryConfig:
    first: float = 60.0              # first retry after this many seconds
    max: float = 1800.0              # backoff doubles up to this
    jitter: float = 0.2              # +/- fraction
    lifetime: float = 5 * 86400.0    # give up and bounce after this (default 5 days)


@dataclass(frozen=True, slots=True)
class HeaderRule:
    action: Literal["add", "remove", "replace"]
    header: str
    value: str = ""
    line: int = 0                    # where it was defined, for errors


@dataclass(frozen=True, slots=True)
class ThrottleReplyConfig:
    """One row of the throttle-reply table: a provider reply that means "slow down"."""

    name: str
    action: Literal["pause-mailbox", "pause-upstream"]
    codes: tuple[int, ...] = ()                # reply codes; empty: any
    status: str = ""                           # enhanced status code prefix ("4.7.", "5.4.5")
    text: str = ""                             # regular expression on the reply (ignoring case)
    pause: float = 60.0                        # first pause when the reply names no time
    max_pause: float = 3600.0                  # repeated throttles double the pause up to this
    provider: str = ""                         # description: who sends it
    line: int = 0


@dataclass(frozen=True, slots=True)
class PacingSection:
    """Where quota usage is kept: in this process, or in Redis shared by replicas."""

    backend: Literal["local", "redis"] = "local"
    redis_url: str = ""                        # redis://host:6379/0 or rediss://...
    password: Secret | None = None             # AUTH to Redis (password_env / _file)
    replicas: int = 1                          # relays sharing the quotas (local share: 1/n)
    key_prefix: str = "relay"
    timeout: float = 0.5                       # one Redis round trip; longer means unreachable
    retry_interval: float = 5.0                # probe an unreachable Redis this often
    ca_file: Path | None = None                # rediss://: CA for the Redis server


@dataclass(frozen=True, slots=True)
class RelaySection:
    hostname: str = "localhost"
    spool: Path = Path("/var/spool/relay")
    pid_file: Path | None = None               # default: <spool>/relay.pid
    control_socket: Path | None = None         # default: <spool>/control.sock
    log_level: str = "info"
    default_upstream: str | None = None        # route for mail no [[route]] matches
    dns_servers: tuple[HostPort, ...] = ()     # empty: the system resolver
    dns_timeout: float = 5.0
    slow_delivery_threshold: float = 10.0
    protected_headers: tuple[str, ...] = ()    # added to the built-in list
    retry: RetryConfig = field(default_factory=RetryConfig)
    bounce_from: str = ""                      # default MAILER-DAEMON@<hostname>
    fsync: bool = True                         # only for benchmarks/tests on tmpfs
    shutdown_grace: float = 30.0
    smtp_processes: int = field(default_factory=auto_smtp_processes)   # "auto"; 0: in main
    event_loop: str = "uvloop"                 # or "asyncio" (relay.app.eventloop)
    account_fail_limit: int = 10               # failed logins to one account, from anywhere ...
    account_fail_window: float = 900.0         # ... within this window: refused for as long
    spool_reserve: int = 100 * 1024 * 1024     # free space kept for records: MAIL gets 452 below


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True
    listen: HostPort = HostPort("127.0.0.1", 9325)


# The event loops [relay] event_loop may name (relay.app.eventloop runs them).
EVENT_LOOPS = ("uvloop", "asyncio")

# IMAP/POP3 listeners' limits when the config sets none. A contact-center platform opens
# one proxy session per mailbox, all from one host (a thousand mailboxes from one address
# is normal), and a logged-in idle session costs about 8 KB and two file descriptors: so
# ten thousand sessions, any number of them from one address. Failed logins are limited
# per address by auth_fail_limit instead. (SMTP keeps 200 and 20 per client.)
PROXY_MAX_CONNECTIONS = 10_000
PROXY_MAX_CONNECTIONS_PER_CLIENT = 10_000

# Message structure checks a listener or profile may turn on (relay.checks.structure),
# and the levels that name sets of them.
STRUCTURE_CHECKS: tuple[str, ...] = (
    "header-section", "header-size", "nul", "line-length", "8bit-headers", "field-names",
    "from", "singletons", "addresses", "to", "mime")
STRUCTURE_LEVELS: dict[str, tuple[str, ...]] = {
    "off": (),
    "standard": STRUCTURE_CHECKS[:9],          # what RFC 5322 itself requires
    "strict": STRUCTURE_CHECKS,                # plus a To: field and sane MIME
}


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    protocol: Literal["smtp", "imap", "pop3"]
    listen: HostPort
    tls: TlsMode = "none"
    cert: Path | None = None
    key: Path | None = None
    auth: Literal["required", "none"] = "required"
    users_file: Path | None = None
    allow: tuple[Network, ...] = ()            # named sets already expanded
    allow_plaintext_auth: bool = False         # AUTH without TLS (only sensible on loopback)
    relay_domains: tuple[str, ...] = ()        # inbound: accept these recipient domains from anyone
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 100
    max_connections: int = 200                 # imap/pop3 in a config file: PROXY_MAX_...
    max_connections_per_client: int = 20
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    auth_fail_limit: int = 5                   # failures before the client is refused
    auth_fail_window: float = 300.0            # ... within this many seconds, refused for as long
    spf: Literal["off", "tag", "reject"] = "off"
    dkim_verify: bool = False                  # inbound: add Authentication-Results for DKIM
    profile: str | None = None
    header_rules: tuple[HeaderRule, ...] = ()
    structure_checks: tuple[str, ...] = STRUCTURE_LEVELS["standard"]  # strict if auth required
    max_header_size: int = 256 * 1024
    add_missing_headers: bool = True           # Date:, Message-ID: on mail from trusted clients
    sender_ownership: Literal["enforce", "log"] = "enforce"   # authenticated users only
    spf_permerror: Literal["tag", "reject"] = "tag"           # with spf = "reject"
    # IMAP/POP3 proxy listeners
    upstream: str | None = None
    login_timeout: float = 60.0                # pre-login idle timeout
    idle_timeout: float = 1800.0               # post-login idle timeout (IDLE-friendly)
    max_line: int = 8192                       # pre-login command line limit
    # after a reload changes the upstream's proxy, tunnel or credentials: end open
    # sessions at a safe point so clients reconnect the new way, or keep them as they are
    on_upstream_change: Literal["reconnect", "keep"] = "reconnect"
    priority: int = 0                          # within a mailbox's line, higher leaves first
    # Hostile clients: deadlines, session limits, per-network admission (see the README)
    tls_handshake_timeout: float = 30.0        # every client TLS handshake (STARTTLS, implicit)
    data_deadline: float = 600.0               # smtp: the whole DATA may take this long ...
    min_data_rate: int = 500                   # ... plus 1 s per this many bytes (0: fixed)
    max_junk_commands: int = 20                # NOOP, RSET, VRFY, unknown...; then 421 and close
    max_connection_rate_per_client: int = 0    # a minute, per client network (0: no limit)
    reserved_connections: int | None = None    # slots only for networks holding none
                                               # (None: a tenth of max_connections, <= 100)
    client_ipv4_prefix: int = 32               # a client network, for the per-client limits
    client_ipv6_prefix: int = 64
    dangerously_allow_open_relay: bool = False  # accept mail from everywhere to anywhere
    line: int = 0

    @property
    def reserve(self) -> int:
        """Connection slots kept for client networks that hold none yet."""
        if self.reserved_connections is not None:
            return self.reserved_connections
        # A tenth, at most 100: a newcomer needs one slot, and a platform host reading a
        # thousand mailboxes through the proxy (10,000 slots) may hold 9,900 of them.
        return min(self.max_connections // 10, RESERVE_CAP)


RESERVE_CAP = 100          # the default reserved_connections never exceeds this


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    name: str
    kind: Literal["socks5", "ssh"]
    host: str
    port: int
    username: str = ""
    password: Secret | None = None
    remote_dns: bool = True                    # socks5: let the proxy resolve names
    key_file: Path | None = None               # ssh
    known_hosts: Path | None = None            # ssh: required
    connect_timeout: float = 15.0
    line: int = 0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    protocol: Literal["smtp", "imap", "pop3", "outbox"]
    host: str = ""
    port: int = 0
    tls: TlsMode = "starttls"
    ca_file: Path | None = None
    verify_tls: bool = True                    # may only be switched off per upstream, loudly
    tls_server_name: str | None = None
    auth: Literal["none", "password", "xoauth2", "passthrough"] = "none"
    username: str = ""
    password: Secret | None = None
    token_source: str | None = None            # name of a [[token_source]] for xoauth2
    via: str | None = None                     # name of a [[proxy]]; None = direct
    max_connections: int = 4                   # concurrency cap
    max_messages_per_connection: int = 100     # connection reuse
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    helo_name: str | None = None               # default: relay.hostname
    path: Path | None = None                   # outbox: folder for .eml files
    profile: str | None = None
    header_rules: tuple[HeaderRule, ...] = ()
    quotas: tuple[QuotaConfig, ...] = ()       # [[upstream.quota]]: override/add to profile's
    connections_per_mailbox: int | None = None  # default: the profile's; None: no cap
    mailbox: Literal["account", "sender"] = "account"   # whose sending a provider meters
    line: int = 0


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """A sending quota: at most these amounts per window, per mailbox or per upstream."""

    window: float
    scope: Literal["mailbox", "upstream"] = "mailbox"
    messages: int | None = None
    recipients: int | None = None
    bytes: int | None = None
    line: int = 0


@dataclass(frozen=True, slots=True)
class RouteConfig:
    upstream: str
    sender_domain: str | None = None           # None matches any; "*.example.com" wildcards
    recipient_domain: str | None = None
    header_rules: tuple[HeaderRule, ...] = ()
    priority: int | None = None                # None: the listener's
    line: int = 0


@dataclass(frozen=True, slots=True)
class DkimKeyConfig:
    domain: str
    selector: str
    key_file: Path
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"
    on_failure: Literal["refuse", "send-unsigned"] = "refuse"   # when a message cannot be signed
    line: int = 0


@dataclass(frozen=True, slots=True)
class TokenSourceConfig:
    name: str
    kind: Literal["client_credentials", "refresh_token", "static"]
    provider: Literal["microsoft", "google", "custom"] = "microsoft"
    token_url: str = ""                        # default from provider (+ tenant)
    tenant: str = ""
    client_id: str = ""
    client_secret: Secret | None = None
    certificate_file: Path | None = None       # client_credentials with a certificate
    certificate_key_file: Path | None = None
    scope: str = "https://outlook.office365.com/.default"
    refresh_token_file: Path | None = None     # refresh_token: persisted, rotated safely
    token_file: Path | None = None             # static
    via: str | None = None                     # proxy for token requests
    refresh_margin: float = 300.0              # refresh this long before expiry
    request_timeout: float = 30.0              # one token request, connect to last byte
    ca_file: Path | None = None                # CA for the token endpoint (default: system)
    line: int = 0


@dataclass(frozen=True, slots=True)
class AccountConfig:
    """Auth translation: who relay is toward the provider for a client user or sender."""

    upstream: str
    user: str | None = None                    # relay user (users file) this applies to
    sender: str | None = None                  # or envelope sender address
    username: str = ""                         # mailbox at the provider
    password: Secret | None = None             # for auth = "password"
    token_source: str | None = None            # for auth = "xoauth2"
    owns: tuple[str, ...] = ()                 # addresses/domains `user` may send as
    line: int = 0


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    """Provider limits. Hard limits refuse in-session; rate limits only delay."""

    name: str
    max_recipients: int | None = None
    max_subject_chars: int | None = None
    max_local_part: int | None = None
    max_display_name: int | None = None
    max_body_bytes: int | None = None
    max_message_bytes: int | None = None
    allow_attachments: bool = True
    messages_per_minute: int | None = None
    bytes_per_5min: int | None = None
    recipients_per_day: int | None = None
    connections_per_mailbox: int | None = None
    structure_checks: tuple[str, ...] = ()     # turned on for mail this profile applies to
    line: int = 0


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    relay: RelaySection
    metrics: MetricsConfig
    listeners: tuple[ListenerConfig, ...]
    upstreams: tuple[UpstreamConfig, ...]
    routes: tuple[RouteConfig, ...] = ()
    proxies: tuple[ProxyConfig, ...] = ()
    dkim: tuple[DkimKeyConfig, ...] = ()
    token_sources: tuple[TokenSourceConfig, ...] = ()
    accounts: tuple[AccountConfig, ...] = ()
    profiles: tuple[ProfileConfig, ...] = ()   # shipped relay/data/profiles.toml + config's own
    address_sets: dict[str, tuple[Network, ...]] = field(default_factory=dict)
    pacing: PacingSection = field(default_factory=PacingSection)
    throttle_replies: tuple[ThrottleReplyConfig, ...] = ()   # relay/data/throttle_replies.toml

    def upstream(self, name: str) -> UpstreamConfig:
        for u in self.upstreams:
            if u.name == name:
                return u
        raise KeyError(name)

    def proxy(self, name: str) -> ProxyConfig:
        for p in self.proxies:
            if p.name == name:
                return p
        raise KeyError(name)

    def profile(self, name: str) -> ProfileConfig:
        for p in self.profiles:
            if p.name == name:
                return p
        raise KeyError(name)

    def token_source(self, name: str) -> TokenSourceConfig:
        for t in self.token_sources:
            if t.name == name:
                return t
        raise KeyError(name)
