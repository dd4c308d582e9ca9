"""The loader on valid configs: defaults, inference, paths, secrets, sets, profiles."""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
from pathlib import Path

import pytest

from relay.config.loader import load_config
from relay.config.reader import Table
from relay.config.schema import HostPort
from relay.errors import ConfigError
from tests.config.conftest import BASE, CONF, EXAMPLE_ENV, FILES

pytestmark = pytest.mark.fast


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_example_config_is_valid(example_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = load_config(example_dir / "relay.toml", environ=EXAMPLE_ENV)
    assert [x.name for x in c.listeners] == ["platform", "cxone-inbound", "mailbox-imap",
                                             "mailbox-pop3"]
    assert c.upstream("office365").auth == "xoauth2"
    assert c.upstream("gmail").auth == "password"
    assert c.upstream("gmail").port == 465
    assert c.upstream("gmail").password is not None
    assert c.upstream("gmail").password.reveal() == "app-password"
    assert c.upstream("o365-imap").auth == "xoauth2"           # from its [[account]]
    assert c.upstream("o365-imap").port == 993
    assert c.proxy("dante").password is not None
    assert c.proxy("bastion").kind == "ssh"
    assert c.token_source("o365").client_secret is not None
    hq = ipaddress.ip_network("192.0.2.0/28")
    assert hq in c.listeners[0].allow
    assert ipaddress.ip_network("207.166.95.11/32") in c.listeners[1].allow
    assert c.listeners[0].header_rules[0].header == "X-Relay-Listener"
    assert c.listeners[0].header_rules[0].line > 0
    assert {p.name for p in c.profiles} >= {"genesys-agentless", "exchange-online",
                                            "zendesk-exchange-connector",
                                            "exchange-online-150mb"}


def test_example_documents_every_option(example_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key the loader reads in any section appears (set or commented) in the example."""
    seen: dict[str, set[str]] = {}
    finish = Table.finish

    def spy(self: Table, **kw: object) -> None:
        section = ".".join(str(p) for p in self.path if isinstance(p, str)) or "(top)"
        seen.setdefault(section, set()).update(self.known)
        finish(self, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Table, "finish", spy)
    load_config(example_dir / "relay.toml", environ=EXAMPLE_ENV)
    text = (CONF / "relay.example.toml").read_text()
    written = set(re.findall(r"^#?\s*([a-z_0-9]+)\s*=", text, re.MULTILINE))
    written |= set(re.findall(r"^\[\[?(?:[a-z_]+\.)?([a-z_]+)\]", text, re.MULTILINE))
    missing = {f"{s}.{k}" for s, keys in seen.items() for k in keys
               if k not in written and k != "password" and k != "client_secret"}
    assert not missing, f"conf/relay.example.toml does not document: {sorted(missing)}"
    for section in ("relay", "metrics", "listener", "upstream", "route", "proxy", "dkim",
                    "token_source", "account", "profile", "address_set",
                    "listener.header_rule", "route.header_rule", "upstream.header_rule",
                    "pacing", "throttle_reply", "upstream.quota"):
        assert section in seen, section


def test_defaults_and_inference(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, BASE + '''
[[upstream]]
name = "o365"
protocol = "smtp"
host = "smtp.office365.com"
username = "cc@example.com"
password_env = "PW"

[[upstream]]
name = "direct"
protocol = "smtp"
host = "mx.example.net"
tls = "none"

[[upstream]]
name = "imaps"
protocol = "imap"
host = "imap.example.net"
tls = "implicit"
auth = "passthrough"
'''), environ={"PW": "pw"})
    o = c.upstream("o365")
    assert (o.port, o.tls, o.auth, o.username) == (587, "starttls", "password", "cc@example.com")
    assert o.password is not None and o.password.origin == "env PW"
    assert "pw" not in repr(o)
    assert (c.upstream("direct").port, c.upstream("direct").auth) == (25, "none")
    assert c.upstream("imaps").port == 993
    assert c.listeners[0].max_message_size == 35 * 2**20
    assert c.relay.retry.lifetime == 5 * 86400


def test_listen_without_port_uses_protocol_default(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, BASE.replace('"127.0.0.1:2525"', '"127.0.0.1"')))
    assert c.listeners[0].listen == HostPort("127.0.0.1", 25)


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    (tmp_path / "sub").mkdir()
    p = write(tmp_path / "sub", BASE.replace('path = "outbox"', 'path = "../mail/out"'))
    monkeypatch.chdir("/")
    c = load_config(p)
    assert c.relay.spool == tmp_path / "sub" / "spool"
    assert c.upstreams[0].path == tmp_path / "mail" / "out"


def test_secret_file_is_read_and_group_access_is_fine(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    text = BASE + f'''
[[upstream]]
name = "o365"
protocol = "smtp"
host = "smtp.office365.com"
username = "cc@example.com"
password_file = "{secret}"
verify_tls = false
'''
    # Kubernetes mounts secrets root-owned, 0440, for the pod's group: no warning.
    for mode in (0o600, 0o640, 0o440):
        secret.chmod(mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="relay.config"):
            c = load_config(write(tmp_path, text))
        pw = c.upstream("o365").password
        assert pw is not None and pw.reveal() == "s3cret"
        messages = "\n".join(r.getMessage() for r in caplog.records)
        assert "password_file" not in messages and "chmod" not in messages, oct(mode)
        assert "verification is OFF" in messages
        assert "s3cret" not in messages
        assert re.search(r"relay\.toml:\d+: upstream\[1\]\.verify_tls:", messages)


@pytest.mark.parametrize(("mode", "what"), [(0o644, "readable"), (0o602, "writable"),
                                            (0o666, "readable and writable")])
def test_secret_file_every_user_may_read_or_change_is_refused(tmp_path: Path, mode: int,
                                                              what: str) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(mode)
    path = write(tmp_path, BASE + f'''
[[upstream]]
name = "o365"
protocol = "smtp"
host = "smtp.office365.com"
username = "cc@example.com"
password_file = "{secret}"
''')
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.explain() == (
        f"{path}:{exc.value.line}: upstream[1].password_file: file is {what} by every user "
        f"(got mode {mode:04o}); expected no access for others (e.g. 0600, 0640 or 0440)\n"
        f"  hint: run: chmod o-rwx {secret}")
    assert "s3cret" not in exc.value.explain()


def test_config_sets_and_profiles_replace_shipped_ones(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, BASE.replace('allow = ["127.0.0.0/8"]',
                                                 'allow = ["127.0.0.0/8", "cxone-uk", "lab"]')
                          + '''
[[address_set]]
name = "cxone-uk"
networks = ["198.51.100.0/24"]

[[address_set]]
name = "lab"
networks = ["203.0.113.0/24", "2001:db8::/32"]

[[profile]]
name = "exchange-online"
max_message_bytes = "150MB"
'''))
    allow = c.listeners[0].allow
    assert ipaddress.ip_network("198.51.100.0/24") in allow
    assert ipaddress.ip_network("52.56.74.209/32") not in allow
    assert ipaddress.ip_network("2001:db8::/32") in allow
    assert c.profile("exchange-online").max_message_bytes == 150 * 2**20
    assert c.profile("exchange-online").messages_per_minute is None


def test_explicit_data_files_and_none(tmp_path: Path) -> None:
    text = BASE.replace('[relay]\n', '[relay]\naddress_sets = []\nprofiles = []\n')
    c = load_config(write(tmp_path, text))
    assert c.address_sets == {} and c.profiles == ()
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, BASE.replace('allow = ["127.0.0.0/8"]',
                                                 'allow = ["cxone-na1"]').replace(
            '[relay]\n', '[relay]\naddress_sets = []\n')))
    assert exc.value.key == "listener[0].allow[0]"
    assert "[[address_set]]" in exc.value.hint


def test_accounts_infer_auth_and_are_checked(tmp_path: Path) -> None:
    text = BASE + '''
[[upstream]]
name = "o365"
protocol = "smtp"
host = "smtp.office365.com"

[[account]]
upstream = "o365"
sender = "Sales@Example.com"
username = "sales@example.com"
password_env = "PW"
'''
    c = load_config(write(tmp_path, text), environ={"PW": "x"})
    assert c.upstream("o365").auth == "password"
    assert c.accounts[0].sender == "sales@example.com"
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text.replace('host = "smtp.office365.com"',
                                                 'host = "smtp.office365.com"\nauth = "none"')),
                    environ={"PW": "x"})
    assert exc.value.key == "account[0].upstream"


def test_header_rules_keep_their_lines(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, BASE + '''
[[upstream.header_rule]]
action = "add"
header = "X-Relay"
value = "yes"
'''))
    (rule,) = c.upstreams[0].header_rules
    assert (rule.action, rule.header, rule.value, rule.line) == ("add", "X-Relay", "yes", 18)


def test_error_lines_inside_multiline_arrays(tmp_path: Path) -> None:
    text = BASE.replace('allow = ["127.0.0.0/8"]', 'allow = [\n  "127.0.0.0/8",\n'
                        '  "10.0.0.0/8",\n  "192.168.1.1/24",\n]')
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    assert exc.value.line == 14
    assert str(exc.value).startswith(f"{tmp_path}/relay.toml:14: listener[0].allow[2]: ")


def test_toml_error_at_end_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, 'a = """\nnever closed\n'))
    assert exc.value.line is not None and "TOML syntax error" in str(exc.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("/nonexistent/relay.toml")
    assert str(exc.value) == "/nonexistent/relay.toml: config file not found"


def test_fixture_files_are_what_the_bad_configs_expect() -> None:
    assert (FILES / "tls.crt").read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_token_sources_fill_provider_defaults(tmp_path: Path) -> None:
    rt = tmp_path / "google.refresh"
    rt.write_text("1//refresh\n")
    c = load_config(write(tmp_path, BASE + f'''
[[token_source]]
name = "ms"
kind = "client_credentials"
tenant = "contoso.onmicrosoft.com"
client_id = "id"
client_secret_env = "SECRET"

[[token_source]]
name = "google"
kind = "refresh_token"
provider = "google"
client_id = "id.apps.googleusercontent.com"
refresh_token_file = "{rt}"

[[token_source]]
name = "local"
kind = "client_credentials"
provider = "custom"
token_url = "http://127.0.0.1:8080/token"
client_id = "id"
client_secret_env = "SECRET"
'''), environ={"SECRET": "s"})
    ms, google, local = c.token_sources
    assert ms.token_url == ("https://login.microsoftonline.com/contoso.onmicrosoft.com"
                            "/oauth2/v2.0/token")
    assert ms.scope == "https://outlook.office365.com/.default"
    assert (google.token_url, google.scope) == ("https://oauth2.googleapis.com/token",
                                                "https://mail.google.com/")
    assert local.token_url == "http://127.0.0.1:8080/token"
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, BASE + '''
[[token_source]]
name = "remote"
kind = "client_credentials"
provider = "custom"
token_url = "http://idp.example.com/token"
client_id = "id"
client_secret_env = "SECRET"
'''), environ={"SECRET": "s"})
    assert exc.value.key == "token_source[0].token_url"


def test_proxies(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    shutil.copy(FILES / "id_ed25519", key)
    key.chmod(0o600)
    c = load_config(write(tmp_path, BASE + f'''
[[proxy]]
name = "dante"
url = "socks5://relay%40corp@[::1]"
password_env = "SOCKS_PW"
remote_dns = false

[[proxy]]
name = "bastion"
url = "ssh://relay@127.0.0.1:2222"
key_file = "{key}"
known_hosts = "{FILES / 'known_hosts'}"
'''), environ={"SOCKS_PW": "pw"})
    dante, bastion = c.proxies
    assert (dante.kind, dante.host, dante.port, dante.username, dante.remote_dns) == (
        "socks5", "::1", 1080, "relay@corp", False)
    assert dante.password is not None and dante.password.reveal() == "pw"
    assert (bastion.kind, bastion.port, bastion.username) == ("ssh", 2222, "relay")
    assert bastion.known_hosts == FILES / "known_hosts"


def test_imap_passthrough_needs_no_users_file(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, BASE + '''
[[listener]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:1143"
allow_plaintext_auth = true
upstream = "provider"

[[upstream]]
name = "provider"
protocol = "imap"
host = "imap.example.com"
tls = "implicit"
auth = "passthrough"
'''))
    assert c.listeners[1].users_file is None
    assert c.listeners[1].listen == HostPort("127.0.0.1", 1143)
    assert c.upstream("provider").port == 993


@pytest.mark.parametrize(("extra", "key", "dotted"), [
    ('[metrics]\nlisten = "127,0,0,1:9325"\n', "metrics.listen", '"127.0.0.1:9325"'),
    ('[[upstream]]\nname = "x"\nprotocol = "smtp"\nhost = "69,169,228,209"\n',
     "upstream[1].host", '"69.169.228.209"'),
    ('[[proxy]]\nname = "p"\nurl = "socks5://relay@23,251,235,248:1080"\n', "proxy[0].url",
     '"socks5://relay@23.251.235.248:1080"'),
    ('[[address_set]]\nname = "s"\nnetworks = ["35,183,152,216/32"]\n',
     "address_set[0].networks[0]", '"35.183.152.216/32"'),
    ('[relay]\n', "listener[0].allow[0]", '"69.169.235.171"'),
])
def test_comma_ipv4_in_every_address_field(tmp_path: Path, extra: str, key: str,
                                           dotted: str) -> None:
    text = BASE + "\n" + extra if not extra.startswith("[relay]") else BASE.replace(
        '"127.0.0.0/8"', '"69,169,235,171"')
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    assert exc.value.key == key
    assert exc.value.detail == "IPv4 address written with commas"
    assert exc.value.expected == dotted
    assert exc.value.line is not None


def test_token_source_ca_file_is_read_and_checked(tmp_path: Path) -> None:
    import trustme

    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    source = '''
[[token_source]]
name = "local"
kind = "client_credentials"
provider = "custom"
token_url = "https://127.0.0.1:8443/token"
client_id = "id"
client_secret_env = "SECRET"
ca_file = "{ca}"
'''
    c = load_config(write(tmp_path, BASE + source.format(ca=ca)), environ={"SECRET": "s"})
    assert c.token_sources[0].ca_file == ca
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, BASE + source.format(ca=garbage)), environ={"SECRET": "s"})
    assert "token_source[0].ca_file: cannot load CA certificates" in str(exc.value)
