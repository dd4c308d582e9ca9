"""deploy/systemd: the unit verifies with systemd-analyze, is sandboxed, and matches relay."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from relay.config.schema import RelaySection
from tests.ops.deploy_support import DEPLOY, parse_unit
from tests.peers import need

UNIT = DEPLOY / "systemd" / "relay.service"


def local_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this machine's relay entry point."""
    relay = shutil.which("relay")
    assert relay, "relay's console script is not installed (pip install -e .)"
    unit = tmp_path / "relay.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/relay", relay))
    return unit


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    proc = subprocess.run([need("systemd-analyze"), "verify", str(local_unit(tmp_path))],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    # Unknown keys or bad values are warnings with exit 0: there must be none.
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stderr


def test_unit_exposure_is_low(tmp_path: Path) -> None:
    # --threshold is in tenths: fail if the overall exposure is above 2.0 ("OK").
    proc = subprocess.run([need("systemd-analyze"), "security", "--offline=true",
                           "--threshold=20", "--no-pager", str(local_unit(tmp_path))],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr


@pytest.mark.fast
def test_unit_contract() -> None:
    unit = parse_unit(UNIT.read_text())
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.NotifyAccess"] == ["main"]
    assert unit["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Service.User"] == ["relay"] and unit["Service.Group"] == ["relay"]
    assert unit["Service.ProtectSystem"] == ["strict"]
    spool = str(RelaySection().spool)
    assert unit["Service.ReadWritePaths"] == [spool]
    assert unit["Service.NoNewPrivileges"] == ["yes"]
    assert unit["Service.CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["Service.RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert "@system-service" in unit["Service.SystemCallFilter"]
    assert unit["Service.Restart"] == ["on-failure"]
    stop = float(unit["Service.TimeoutStopSec"][0])
    assert stop > RelaySection().shutdown_grace + 10, "drain needs more than the grace period"


def test_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    sysusers = DEPLOY / "systemd" / "relay.sysusers"
    proc = subprocess.run([need("systemd-sysusers"), "--dry-run", f"--root={tmp_path}",
                           str(sysusers)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Creating user 'relay'" in proc.stdout + proc.stderr
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("relay:x:990:990::/var/spool/relay:/bin/false\n")
    (tmp_path / "etc" / "group").write_text("relay:x:990:\n")
    proc = subprocess.run([need("systemd-tmpfiles"), "--create", f"--root={tmp_path}",
                           str(DEPLOY / "systemd" / "relay.tmpfiles")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    spool = tmp_path / str(RelaySection().spool).lstrip("/")
    st = spool.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (990, 990, 0o750)


@pytest.mark.fast
def test_bare_commands_on_the_host_find_the_services_config() -> None:
    """A bare `relay status` looks in /etc/relay/relay.toml first: the file the unit runs."""
    from relay.config.lookup import SYSTEM_CONFIG

    unit = parse_unit(UNIT.read_text())
    argv = unit["Service.ExecStart"][0].split()
    assert argv[argv.index("-c") + 1] == str(SYSTEM_CONFIG)
    assert "RELAY_CONFIG" not in " ".join(unit.get("Service.Environment", []))


@pytest.mark.fast
def test_the_unit_hands_secrets_over_as_systemd_credentials() -> None:
    unit = parse_unit(UNIT.read_text())
    (load,) = unit["Service.LoadCredential"]
    name, _, directory = load.partition(":")
    assert (name, directory) == ("secret", "/etc/relay/credentials")
    assert f'"$CREDENTIALS_DIRECTORY/{name}_FILENAME"' in UNIT.read_text()
    tmpfiles = (DEPLOY / "systemd" / "relay.tmpfiles").read_text().split()
    at = tmpfiles.index(directory)
    assert tmpfiles[at - 1:at + 4] == ["d", directory, "0700", "root", "root"]
