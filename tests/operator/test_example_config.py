"""conf/relay.example.toml passes `relay config check` in the environment it documents, and
what `relay config show` prints of it passes too, without a warning."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import trustme

from tests.operator.support import relay_cli, without
from tests.peers import need

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "conf" / "relay.example.toml"
FILES = ROOT / "tests" / "bad_configs" / "files"


def documented_variables() -> list[str]:
    """The environment variables the example's header says it needs."""
    header = EXAMPLE.read_text().split("\n[relay]")[0]
    text = " ".join(line.lstrip("# ") for line in header.splitlines())
    part = text[text.index("given what it names:"):].split("and the files")[0]
    return re.findall(r"\b[A-Z][A-Z0-9_]{3,}\b", part)


def test_the_example_checks_clean_in_its_documented_environment(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    variables = documented_variables()
    used = re.findall(r'^[a-z_]+_env = "(\w+)"', text, re.M)
    assert sorted(variables) == sorted(used), "the header names every variable the file uses"
    etc, var = tmp_path / "etc" / "relay", tmp_path / "var" / "lib" / "relay"
    (etc / "ssh").mkdir(parents=True)
    (etc / "dkim").mkdir()
    var.mkdir(parents=True)
    cert = trustme.CA().issue_cert("relay.example.com")
    cert.cert_chain_pems[0].write_to_path(str(etc / "tls.crt"))
    cert.private_key_pem.write_to_path(str(etc / "tls.key"))
    shutil.copy(etc / "tls.crt", etc / "ca.pem")
    shutil.copy(FILES / "known_hosts", etc / "ssh" / "known_hosts")
    subprocess.run([need("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f",
                    str(etc / "ssh" / "id_ed25519")], check=True)
    (etc / "token").write_text("an access token\n")
    (var / "o365.refresh").write_text("a refresh token\n")
    config = tmp_path / "relay.toml"
    config.write_text(text.replace("/etc/relay/", f"{etc}/")
                      .replace("/var/lib/relay/", f"{var}/"))
    for kind, name in (("rsa", "example.com.rsa.key"), ("ed25519", "example.com.ed25519.key")):
        made = relay_cli("dkim", "keygen", "--domain", "example.com", "--selector", "relay2025",
                         "--algorithm", kind, "--out", str(etc / "dkim" / name), cwd=tmp_path)
        assert made.returncode == 0, made.stderr
    user = relay_cli("user", "add", "platform", "--password-stdin", "-f", str(etc / "users"),
                     stdin="a long password\n")
    assert user.returncode == 0, user.stderr
    for p in etc.rglob("*"):
        if p.is_file():
            p.chmod(0o600)

    env = {**without("RELAY_CONFIG"), **dict.fromkeys(variables, "a secret value")}
    check = relay_cli("config", "check", str(config), env=env, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert check.stderr == "", check.stderr            # not even a warning
    summary = check.stdout.split(": ok ", 1)[1]

    shown = relay_cli("config", "show", str(config), env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    again = tmp_path / "shown.toml"
    again.write_text(shown.stdout)
    check = relay_cli("config", "check", str(again), env=env, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert check.stderr == "", check.stderr
    assert check.stdout == f"{again}: ok {summary}"
