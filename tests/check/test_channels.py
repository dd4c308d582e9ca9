"""`relay check` per channel: every [[account]], --account, --user for pass-through, steps as
they end, a hung step named, --timeout, --json for scripts, hints only for known providers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.check.servers import auth_smtp
from tests.peers.dovecot import Dovecot, dovecot
from tests.transports.helpers import TLS_NAME

ROOT = Path(__file__).resolve().parents[2]
MAILBOX, OTHER = "cc@example.com", "sales@example.com"


class World:
    def __init__(self, tmp: Path, ca_file: Path, smtp: int, refusing: int, mute: int,
                 dove: Dovecot) -> None:
        self.config = tmp / "relay.toml"
        self.outbox = tmp / "outbox"
        self.outbox.mkdir()
        self.env = dict(os.environ, OWN_PW="own-pw", ALICE_PW="alice-pw", SALES_PW="wrong-pw")
        up = (f'protocol = "smtp"\nhost = "127.0.0.1"\ntls = "starttls"\n'
              f'ca_file = "{ca_file}"\ntls_server_name = "{TLS_NAME}"\nauth = "password"\n')
        self.config.write_text(f"""[relay]
hostname = "relay.test"
spool = "{tmp / 'spool'}"

[[upstream]]
name = "mailhost"
{up}port = {smtp}
username = "{MAILBOX}"
password_env = "OWN_PW"

[[account]]
upstream = "mailhost"
user = "alice"
username = "alice@example.com"
password_env = "ALICE_PW"

[[account]]
upstream = "mailhost"
sender = "{OTHER}"
username = "{OTHER}"
password_env = "SALES_PW"

[[upstream]]
name = "custom"
{up}port = {refusing}
username = "{MAILBOX}"
password_env = "OWN_PW"

[[upstream]]
name = "mute"
protocol = "smtp"
host = "127.0.0.1"
port = {mute}
tls = "none"

[[upstream]]
name = "mailbox"
protocol = "imap"
host = "127.0.0.1"
port = {dove.imap}
tls = "starttls"
ca_file = "{dove.ca_file}"
tls_server_name = "localhost"
auth = "passthrough"

[[upstream]]
name = "files"
protocol = "outbox"
path = "{self.outbox}"
""")

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", "check", "-c", str(self.config),
                               *args], input=stdin, capture_output=True, text=True,
                              env=self.env, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA,
          ca_file: Path) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("channels")
    users = {MAILBOX: "own-pw", "alice@example.com": "alice-pw", OTHER: "sales-pw"}
    mute = socket.create_server(("127.0.0.1", 0))        # accepts, never says a word
    with auth_smtp(ca, users=users) as (smtp, _h), \
            auth_smtp(ca, refuse="535 5.7.8 Error: authentication failed: bad password"
                      ) as (refusing, _r), \
            dovecot(users={"agent@example.com": "app-password-16c"}) as dove:
        try:
            yield World(tmp, ca_file, smtp, refusing, mute.getsockname()[1], dove)
        finally:
            mute.close()


def reports(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    data = json.loads(proc.stdout)                       # stdout is the JSON, and only it
    assert data["ok"] is (proc.returncode == 0)
    return list(data["upstreams"])


def test_every_account_of_an_upstream_is_walked(world: World) -> None:
    proc = world.run("mailhost", "--json")
    assert proc.returncode == 1
    got = [(r["identity"], r["username"], r["ok"]) for r in reports(proc)]
    assert got == [("its own credentials", MAILBOX, True),
                   ("[[account]] for user alice", "alice@example.com", True),
                   (f"[[account]] for sender {OTHER}", OTHER, False)]
    bad = reports(proc)[2]["steps"][-1]
    assert bad["step"] == "auth" and bad["reason"] == "auth_failed"


def test_account_picks_one(world: World) -> None:
    proc = world.run("--account", "alice", "--json")
    assert proc.returncode == 0, proc.stdout
    assert [r["identity"] for r in reports(proc)] == ["[[account]] for user alice"]
    none = world.run("--account", "bob")
    assert none.returncode == 1
    assert "no [[account]] matches 'bob'" in none.stderr
    assert f"these exist: sender {OTHER}, user alice" in none.stderr


def test_user_and_password_stdin_test_a_passthrough_channel(world: World) -> None:
    ok = world.run("mailbox", "--user", "agent@example.com", "--password-stdin",
                   stdin="app-password-16c\n")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "mailbox (imap 127.0.0.1:" in ok.stdout
    assert "as agent@example.com (--user agent@example.com)" in ok.stdout
    assert "logged in as agent@example.com (LOGIN)" in ok.stdout
    bad = world.run("mailbox", "--user", "agent@example.com", "--password-stdin", "--json",
                    stdin="not-it\n")
    assert bad.returncode == 1
    step = reports(bad)[0]["steps"][-1]
    assert step["step"] == "auth" and step["reason"] == "auth_failed"
    # Dovecot on loopback is nobody's Gmail or Exchange: the hint says neither.
    assert "check the username and password" in step["hint"]
    assert "Gmail" not in step["hint"] and "Exchange" not in step["hint"]
    assert "not-it" not in bad.stdout + bad.stderr
    alone = world.run("mailbox", "--user", "agent@example.com")
    assert alone.returncode == 1 and "--user needs --password-stdin" in alone.stderr


def test_a_hint_names_a_provider_only_when_relay_knows_it(world: World) -> None:
    proc = world.run("custom", "--json")
    step = reports(proc)[0]["steps"][-1]
    assert "535 5.7.8" in step["detail"]
    assert step["hint"].startswith("the provider refused the credentials")
    assert "Google" not in step["hint"]


def test_steps_print_as_they_end_and_a_hung_step_says_so(world: World) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "check", "-c", str(world.config), "files", "mute",
         "mailhost", "--timeout", "7"], stdout=subprocess.PIPE, text=True, env=world.env,
        cwd=ROOT)
    assert proc.stdout is not None
    lines: list[tuple[float, str, bool]] = []
    start = time.monotonic()
    for line in proc.stdout:
        lines.append((time.monotonic() - start, line.rstrip("\n"), proc.poll() is None))
    assert proc.wait(30) == 1
    text = [line for _, line, _ in lines]
    files = text.index(next(t for t in text if t.startswith("files (outbox ")))
    assert text[files + 1].startswith("  ok    outbox")
    waiting = next(i for i, t in enumerate(text) if "still waiting after" in t)
    when, line, running = lines[waiting]
    assert line.startswith("  ...   greeting") and "the greeting and EHLO" in line
    assert running and when > 4              # printed while the step hung, not at the end
    assert lines[files + 1][2]               # the outbox's step came out while running
    fail = text[waiting + 1]
    assert fail.startswith("  FAIL  greeting") and "--timeout of 7 s" in fail
    assert any(t.startswith("mailhost (smtp ") for t in text)
    assert "not checked: the --timeout of 7 s ran out" in "\n".join(text)


def test_json_is_only_json_even_when_the_walk_times_out(world: World) -> None:
    proc = world.run("mute", "files", "--timeout", "1", "--json")
    assert proc.returncode == 1
    first, second = reports(proc)
    assert first["reason"] == "timeout" and second["reason"] == "timeout"
    assert "still waiting for greeting" in first["steps"][-1]["detail"]
    assert "still waiting after" not in proc.stdout + proc.stderr    # no progress lines


def test_send_test_on_an_outbox_says_what_it_did(world: World) -> None:
    proc = world.run("files", "--send-test", "ops@example.net")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (written,) = list(world.outbox.glob("relay-check-*.eml"))
    assert f"test message from postmaster@relay.test to ops@example.net written to " \
           f"{written}" in proc.stdout
    assert "nothing was sent" in proc.stdout
    assert b"X-Original-To: ops@example.net" in written.read_bytes()
