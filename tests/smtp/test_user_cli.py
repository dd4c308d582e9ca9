"""`relay user add|del|list`, run as the real command."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from relay.users import UserDB


def relay(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "user", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def test_add_list_del_with_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "users"
    r = relay("add", "cc1", "--password-stdin", "-f", str(path), stdin="Secr3t pw\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"added cc1 in {path} (mode 0600)"
    assert "note: cc1 owns no address" in r.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "Secr3t" not in path.read_text()
    assert relay("add", "cc2", "--password-stdin", "-f", str(path), stdin="x2").returncode == 0
    db = UserDB.load(path)
    assert db.verify_sync("cc1", b"Secr3t pw") and db.verify_sync("cc2", b"x2")
    r = relay("add", "cc1", "--password-stdin", "-f", str(path), stdin="new\n")
    assert r.stdout.startswith("updated cc1")
    assert UserDB.load(path).verify_sync("cc1", b"new")
    assert relay("list", "-f", str(path)).stdout.split() == ["cc1", "cc2"]
    assert relay("del", "cc1", "-f", str(path)).returncode == 0
    r = relay("del", "cc1", "-f", str(path))
    assert r.returncode == 1 and "no user 'cc1'" in r.stderr
    assert relay("list", "-f", str(path)).stdout.split() == ["cc2"]


def test_owned_addresses(tmp_path: Path) -> None:
    path = tmp_path / "users"
    r = relay("add", "alice", "--password-stdin", "-f", str(path),
              "--owns", "Alice@Example.com, sales.example.com,*.example.net", stdin="pw-a\n")
    assert r.returncode == 0, r.stderr
    assert "note:" not in r.stdout
    line = path.read_text().strip()
    assert line.startswith("alice:$scrypt$")
    assert line.endswith(":alice@example.com,sales.example.com,*.example.net")
    owned = ("alice@example.com", "sales.example.com", "*.example.net")
    assert UserDB.load(path).owns("alice") == owned
    # a new password keeps what the user owns
    assert relay("add", "alice", "--password-stdin", "-f", str(path), stdin="pw-b").returncode == 0
    db = UserDB.load(path)
    assert db.verify_sync("alice", b"pw-b") and db.owns("alice") == owned
    # --keep-password changes only the list
    r = relay("add", "alice", "--keep-password", "--owns", "example.org", "-f", str(path))
    assert r.returncode == 0, r.stderr
    db = UserDB.load(path)
    assert db.verify_sync("alice", b"pw-b") and db.owns("alice") == ("example.org",)
    assert relay("list", "-f", str(path)).stdout == "alice  owns: example.org\n"
    r = relay("add", "alice", "--keep-password", "--owns", "not an address!", "-f", str(path))
    assert r.returncode == 1 and "'not' is not an address or domain" in r.stderr
    r = relay("add", "bob", "--keep-password", "--owns", "example.org", "-f", str(path))
    assert r.returncode == 1 and "existing user" in r.stderr


def test_refusals(tmp_path: Path) -> None:
    path = tmp_path / "users"
    r = relay("add", "bad:name", "--password-stdin", "-f", str(path), stdin="pw\n")
    assert r.returncode == 1 and "invalid user name" in r.stderr
    r = relay("add", "ok", "--password-stdin", "-f", str(path), stdin="\n")
    assert r.returncode == 1 and "empty password refused" in r.stderr
    assert not path.exists()


def test_users_file_from_config(tmp_path: Path) -> None:
    users = tmp_path / "users"
    conf = tmp_path / "relay.toml"
    conf.write_text(f"""
[relay]
hostname = "relay.test"
spool = "{tmp_path / 'spool'}"
default_upstream = "outbox"

[[listener]]
name = "platform"
protocol = "smtp"
listen = "127.0.0.1:2525"
tls = "none"
auth = "required"
allow_plaintext_auth = true
users_file = "{users}"

[[upstream]]
name = "outbox"
protocol = "outbox"
path = "{tmp_path / 'outbox'}"
""")
    r = relay("add", "agent", "--password-stdin", "-c", str(conf), stdin="pw-1\n")
    assert r.returncode == 0, r.stderr
    assert UserDB.load(users).names() == ["agent"]
