"""Hostile configs: files that would open a relay to the world, or break the loader.

Every case is a config text (or bytes) and the error it must produce: a ConfigError at
FILE:LINE naming the key, with a message an operator can act on (printable, short),
never a traceback. The override case loads, and warns loudly. One table, one runner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.config.loader import load_config
from relay.errors import ConfigError

pytestmark = pytest.mark.fast

HEAD = """[relay]
spool = "spool"
default_upstream = "out"

[[upstream]]
name = "out"
protocol = "outbox"
path = "outbox"
"""


def smtp(extra: str, *, auth: str = "none") -> str:
    users = 'users_file = "users"\nallow_plaintext_auth = true\n' if auth == "required" else ""
    return (HEAD + '\n[[listener]]\nname = "in"\nprotocol = "smtp"\nlisten = "0.0.0.0:2525"\n'
            f'tls = "none"\nauth = "{auth}"\n{users}{extra}\n')


@dataclass(frozen=True)
class Bad:
    name: str
    text: str | bytes
    error: str                      # a fragment of the message, "" when the file must load
    key: str = ""                   # the key path the error names
    at: str = ""                    # text on the line it must point at (first match)
    warning: str = ""               # a fragment of a warning the file must give


CASES = [
    # -- an open relay by accident ---------------------------------------------------------
    Bad("allow_every_ipv4", smtp('allow = ["0.0.0.0/0"]'), "would be an open relay",
        "listener[0].allow", "allow ="),
    Bad("allow_every_ipv6", smtp('allow = ["::/0"]'), "IPv6 address", "listener[0].allow",
        "allow ="),
    Bad("allow_two_halves_of_ipv4", smtp('allow = ["0.0.0.0/1", "128.0.0.0/1"]'),
        "would be an open relay", "listener[0].allow", "allow ="),
    Bad("allow_ipv4_mapped_everything", smtp('allow = ["::ffff:0:0/96"]'),
        "every IPv4 address", "listener[0].allow", "allow ="),
    Bad("allow_everyone_even_with_auth_required", smtp('allow = ["0.0.0.0/0"]', auth="required"),
        "would be an open relay", "listener[0].allow", "allow ="),
    Bad("allow_a_named_set_of_everything",
        smtp('allow = ["everyone"]') + '\n[[address_set]]\nname = "everyone"\n'
        'networks = ["0.0.0.0/0", "::/0"]\n', "would be an open relay", "listener[0].allow",
        "allow ="),
    Bad("override_loads_and_warns",
        smtp('allow = ["0.0.0.0/0"]\ndangerously_allow_open_relay = true'), "",
        warning="IS AN OPEN RELAY"),
    Bad("override_without_an_open_relay_warns",
        smtp('allow = ["10.0.0.0/8"]\ndangerously_allow_open_relay = true'), "",
        warning="not an open relay"),
    Bad("override_on_an_imap_listener",
        HEAD.replace('protocol = "outbox"\npath = "outbox"',
                     'protocol = "imap"\nhost = "imap.example.com"\nauth = "passthrough"') +
        '\n[[listener]]\nname = "m"\nprotocol = "imap"\nlisten = "127.0.0.1:1143"\n'
        'tls = "none"\nallow_plaintext_auth = true\nupstream = "out"\n'
        "dangerously_allow_open_relay = true\n",
        "only applies to smtp listeners", "listener[0].dangerously_allow_open_relay",
        "dangerously"),
    Bad("relay_domains_a_whole_tld", smtp('relay_domains = [".com"]'), "domains such as",
        "listener[0].relay_domains[0]", "relay_domains"),
    # -- limits that make no sense ---------------------------------------------------------
    Bad("reserve_takes_every_slot",
        smtp('allow = ["10.0.0.0/8"]\nmax_connections = 10\nreserved_connections = 10'),
        "leaves no slot", "listener[0].reserved_connections", "reserved_connections"),
    Bad("negative_deadline", smtp('allow = ["10.0.0.0/8"]\ndata_deadline = "-5s"'),
        "", "listener[0].data_deadline", "data_deadline"),
    Bad("zero_junk_commands", smtp('allow = ["10.0.0.0/8"]\nmax_junk_commands = 0'),
        "out of range", "listener[0].max_junk_commands", "max_junk"),
    Bad("client_prefix_too_wide", smtp('allow = ["10.0.0.0/8"]\nclient_ipv4_prefix = 4'),
        "out of range", "listener[0].client_ipv4_prefix", "prefix"),
    Bad("negative_account_limit", HEAD.replace('spool = "spool"',
                                               'spool = "spool"\naccount_fail_limit = -1'),
        "out of range", "relay.account_fail_limit", "account_fail_limit"),
    # -- files that are not configs at all -----------------------------------------------------
    Bad("nul_byte", HEAD + "x = 1\x00\n", "TOML syntax error", at="x = 1"),
    Bad("not_utf8", HEAD.encode() + b"\n# caf\xe9\n", "not UTF-8", at="# caf"),
    Bad("deeply_nested_arrays", HEAD + "x = " + "[" * 5000 + "]" * 5000 + "\n",
        "nested too deeply", at="x = [[["),
    Bad("deeply_nested_inline_tables", HEAD + "x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n",
        "nested too deeply", at="x = {"),
    Bad("huge_string_value", smtp('allow = ["10.0.0.0/8"]\nprofile = "' + "p" * 200_000 + '"'),
        "unknown profile", "listener[0].profile"),
    Bad("control_characters_in_a_key", HEAD + '"ev\\u001bil" = 1\n', '"ev\\u001bil": unknown key'),
    Bad("control_characters_in_a_value", smtp('allow = ["10.0.0.0/8"]\nprofile = "a\\u001b[2J"'),
        'got "a\\u001b[2J"', "listener[0].profile", "profile ="),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_config(case: Bad, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "relay.toml"
    if isinstance(case.text, bytes):
        path.write_bytes(case.text)
    else:
        path.write_text(case.text)
    (tmp_path / "users").write_text("")
    caplog.set_level(logging.WARNING, logger="relay.config")
    if not case.error and not case.key:
        load_config(path)
        warnings = [r.getMessage() for r in caplog.records]
        assert any(case.warning in w for w in warnings), warnings
        return
    with pytest.raises(ConfigError) as exc:       # never anything else: no traceback
        load_config(path)
    text = exc.value.explain()
    assert case.error in text, text
    assert text.replace("\n", "").isprintable(), text
    assert len(text) < 2000, f"an error of {len(text)} characters"
    assert exc.value.file == str(path)
    if case.key:
        assert f": {case.key}:" in text, text
    if case.at:
        text_lines = (case.text.decode("latin-1") if isinstance(case.text, bytes)
                      else case.text).splitlines()
        line = next(i for i, t in enumerate(text_lines, 1) if case.at in t)
        assert exc.value.line == line, text
