"""systemd credentials: a path under $CREDENTIALS_DIRECTORY names a LoadCredential= file."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config.loader import load_config
from relay.errors import ConfigError
from tests.config.conftest import BASE

pytestmark = pytest.mark.fast

UPSTREAM = '''
[[upstream]]
name = "o365"
protocol = "smtp"
host = "smtp.office365.com"
username = "cc@example.com"
password_file = "{path}"
'''


@pytest.mark.parametrize("path", ["$CREDENTIALS_DIRECTORY/o365-password",
                                  "${CREDENTIALS_DIRECTORY}/o365-password"])
def test_a_credential_is_read_from_the_directory_systemd_gives(tmp_path: Path,
                                                                path: str) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "o365-password").write_text("from-systemd\n")
    (creds / "o365-password").chmod(0o400)
    cfg = tmp_path / "relay.toml"
    cfg.write_text(BASE + UPSTREAM.format(path=path))
    c = load_config(cfg, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    pw = c.upstream("o365").password
    assert pw is not None and pw.reveal() == "from-systemd"
    assert pw.origin == f"file {creds / 'o365-password'}"


def test_outside_systemd_the_error_says_where_credentials_come_from(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(BASE + UPSTREAM.format(path="$CREDENTIALS_DIRECTORY/o365-password"))
    with pytest.raises(ConfigError) as exc:
        load_config(cfg, environ={})
    line = cfg.read_text().splitlines().index(
        'password_file = "$CREDENTIALS_DIRECTORY/o365-password"') + 1
    assert str(exc.value) == (
        f"{cfg}:{line}: upstream[1].password_file: $CREDENTIALS_DIRECTORY is not set (got "
        '"$CREDENTIALS_DIRECTORY/o365-password"); expected a path that exists here')
    assert "LoadCredential=" in exc.value.hint and "relay reload" in exc.value.hint


def test_a_credential_that_systemd_did_not_load(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(BASE + UPSTREAM.format(path="$CREDENTIALS_DIRECTORY/o365-password"))
    with pytest.raises(ConfigError) as exc:
        load_config(cfg, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert "password_file: file does not exist" in str(exc.value)
    assert exc.value.hint == (f"looked for {tmp_path / 'o365-password'} (a systemd "
                              "credential: is it named in the unit's LoadCredential=?)")
