"""Papercuts an operator hit: each command fails with its own clear words, no traceback."""

from __future__ import annotations

from pathlib import Path

from tests.operator.support import relay_cli


def test_user_add_without_a_terminal_says_how_to_give_the_password(tmp_path: Path) -> None:
    users = tmp_path / "users"
    out = relay_cli("user", "add", "bob", "-f", str(users), stdin="")
    assert out.returncode == 1
    assert out.stderr == (
        "relay: no terminal to ask for bob's password (standard input is not one)\n"
        "  hint: give it on standard input instead: printf '%s\\n' \"$PASSWORD\" | relay "
        "user add bob --password-stdin\n")
    assert not users.exists()
    ok = relay_cli("user", "add", "bob", "-f", str(users), "--password-stdin",
                   stdin="a long password\n")
    assert ok.returncode == 0, ok.stderr


def test_dkim_keygen_refuses_weak_keys_and_bad_names_itself(tmp_path: Path) -> None:
    for args, words in (
            (["--domain", "example.com", "--selector", "s1", "--bits", "1024"],
             "argument --bits: 1024 bits is out of range: RSA keys for DKIM need at least "
             "2048 bits"),
            (["--domain", "bad domain", "--selector", "s1"],
             "argument --domain: 'bad domain' is not a domain name"),
            (["--domain", "example.com", "--selector", "bad selector"],
             "argument --selector: 'bad selector' is not a DKIM selector")):
        out = relay_cli("dkim", "keygen", *args, cwd=tmp_path)
        assert out.returncode == 2, out.stdout
        assert out.stderr.startswith("usage: relay dkim keygen")
        assert f"relay dkim keygen: error: {words}" in out.stderr
        assert "Traceback" not in out.stderr and "<config>" not in out.stderr
    assert list(tmp_path.iterdir()) == []                 # no key was written
    ok = relay_cli("dkim", "keygen", "--domain", "Example.COM.", "--selector", "s1",
                   cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "s1.example.com.pem").exists()
