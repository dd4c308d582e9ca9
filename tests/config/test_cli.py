"""`relay config check|show`: verdicts, exit codes, masked secrets."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from relay.cli import main
from tests.config.conftest import BASE, CONF

REPO = CONF.parent


@pytest.mark.fast
def test_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(CONF / "relay.toml")]) == 0
    out = capsys.readouterr().out
    assert out == (f"{CONF / 'relay.toml'}: ok (1 listener, 1 upstream, 0 routes, 0 proxies, "
                   "0 DKIM keys, 0 token sources, 0 accounts, 5 profiles, 12 address sets)\n")


@pytest.mark.fast
def test_check_bad_prints_file_line_and_hint(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "relay.toml"
    p.write_text(BASE.replace('allow = ["127.0.0.0/8"]', 'allow = ["69,169,235,170"]'))
    assert main(["config", "check", str(p)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f'{p}:11: listener[0].allow[0]: IPv4 address written with commas '
        '(got "69,169,235,170"); expected "69.169.235.170"\n'
        '  hint: write "69.169.235.170": IPv4 addresses are separated by dots '
        "(vendor pages sometimes print commas)\n")


@pytest.mark.fast
def test_check_prints_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "relay.toml"
    p.write_text(BASE + '\n[[upstream]]\nname = "x"\nprotocol = "smtp"\nhost = "mx.example.net"'
                 '\nverify_tls = false\n')
    assert main(["config", "check", str(p)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {p}:22: upstream[1].verify_tls: TLS certificate "
                          "verification is OFF")


@pytest.mark.fast
def test_show_masks_secrets_and_is_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "relay.toml"
    p.write_text(BASE + '\n[[upstream]]\nname = "o365"\nprotocol = "smtp"\n'
                 'host = "smtp.office365.com"\nusername = "cc@example.com"\n'
                 'password_env = "RELAY_SHOW_PW"\n')
    monkeypatch.setenv("RELAY_SHOW_PW", "very-secret-value")
    assert main(["config", "show", str(p)]) == 0
    out = capsys.readouterr().out
    assert "very-secret-value" not in out
    data = tomllib.loads(out)
    o365 = data["upstream"][1]
    assert o365["password_env"] == "RELAY_SHOW_PW"
    assert (o365["port"], o365["auth"]) == (587, "password")
    assert data["listener"][0]["max_message_size"] == 35 * 1024 * 1024


def test_console_script_end_to_end(tmp_path: Path) -> None:
    """The real entry point in a child process, from another working directory.

    ``-P`` keeps the working directory off sys.path: from tests/, the test package
    tests/dkim would otherwise shadow dkimpy's ``dkim``.
    """
    ok = subprocess.run([sys.executable, "-P", "-m", "relay", "config", "check",
                         str(CONF / "relay.toml")], capture_output=True, text=True,
                        cwd=tmp_path, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    assert ": ok (1 listener" in ok.stdout
    bad = subprocess.run([sys.executable, "-P", "-m", "relay", "config", "check",
                          "bad_configs/open_relay.toml"], capture_output=True, text=True,
                         cwd=REPO / "tests", timeout=60, check=False)
    assert bad.returncode == 1
    assert bad.stderr == (REPO / "tests/bad_configs/open_relay.err").read_text()


@pytest.mark.fast
def test_check_loads_dkim_keys_like_start_up(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "example.com.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    key.chmod(0o600)
    p = tmp_path / "relay.toml"
    p.write_text(BASE + f'\n[[dkim]]\ndomain = "example.com"\nselector = "s1"\n'
                 f'key_file = "{key}"\n')
    assert main(["config", "check", str(p)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{p}:18: dkim[0].key_file: ")
    assert str(key) in err
