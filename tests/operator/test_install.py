"""A normal install: the wheel, in a fresh virtualenv outside the checkout, runs the README's
production example through `relay config check` with its shipped data found as package data.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import trustme

from tests.peers import refuse_in_fast_lane

ROOT = Path(__file__).resolve().parents[2]


def readme_production_example() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("A typical production config:")
    match = re.search(r"```toml\n(.*?)```", readme[start:], re.S)
    assert match, "the README's production example is not a ```toml block"
    return match.group(1)


def run(argv: list[str], *, cwd: Path, env: dict[str, str],
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    refuse_in_fast_lane(Path(argv[0]).name)
    return subprocess.run(argv, cwd=cwd, env=env, input=stdin, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(the fresh venv, a clean environment): relay from its wheel, nothing from here."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"                         # build from a copy: the checkout stays clean
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(["cp", "-r", str(ROOT / "relay"), str(src / "relay")], check=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RELAY_CONFIG")}
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                 str(tmp / "wheels"), str(src)], cwd=tmp, env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp / "wheels").glob("relay-*.whl")
    venv = tmp / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)], cwd=tmp, env=env)
    assert made.returncode == 0, made.stderr
    # relay's dependencies come from the test environment's site-packages (a .pth file,
    # so no network is needed); relay itself only from the wheel.
    site = Path(run([str(venv / "bin" / "python"), "-c",
                     "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp, env=env).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "relay-test-deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    done = run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q",
                str(wheel)], cwd=tmp, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return venv, env


def test_the_wheel_ships_its_data_and_checks_the_readme_example(
        installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    venv, env = installed
    where = run([str(venv / "bin" / "python"), "-c",
                 "import relay, importlib.resources as r; print(relay.__file__); "
                 "print(sorted(p.name for p in r.files('relay.data').iterdir()))"],
                cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr
    module, data = where.stdout.splitlines()
    assert module.startswith(str(venv)), f"relay was imported from {module}, not the wheel"
    assert "'address_sets.toml'" in data and "'profiles.toml'" in data
    meta = run([str(venv / "bin" / "python"), "-c",
                "import importlib.metadata as m; d = m.distribution('relay'); "
                "print(d.metadata['License-Expression']); "
                "print(any(str(f).endswith('/LICENSE') for f in d.files))"],
               cwd=tmp_path, env=env)
    assert meta.stdout.split() == ["Apache-2.0", "True"], meta.stdout + meta.stderr
    deps = run([str(venv / "bin" / "python"), "-m", "pip", "check"], cwd=tmp_path, env=env)
    assert deps.returncode == 0, deps.stdout

    etc = tmp_path / "etc" / "relay"
    (etc / "dkim").mkdir(parents=True)
    cert = trustme.CA().issue_cert("relay.example.com")
    cert.cert_chain_pems[0].write_to_path(str(etc / "tls.crt"))
    cert.private_key_pem.write_to_path(str(etc / "tls.key"))
    (etc / "tls.key").chmod(0o600)
    text = readme_production_example().replace("/etc/relay/", f"{etc}/")
    config = tmp_path / "relay.toml"                # no address_sets.toml or profiles.toml
    config.write_text(text)                         # beside it: the shipped ones count
    relay = str(venv / "bin" / "relay")
    keygen = run([relay, "dkim", "keygen", "--domain", "example.com", "--selector",
                  "relay2026", "--out", str(etc / "dkim" / "example.com.key")],
                 cwd=tmp_path, env=env)
    assert keygen.returncode == 0, keygen.stderr
    user = run([relay, "user", "add", "platform", "--password-stdin", "-c", str(config)],
               cwd=tmp_path, env=env, stdin="a long platform password\n")
    assert user.returncode == 0, user.stderr
    secrets = {"SOCKS_PASSWORD": "socks-secret", "O365_CLIENT_SECRET": "client-secret"}
    check = run([relay, "config", "check", str(config)], cwd=tmp_path, env={**env, **secrets})
    assert check.returncode == 0, check.stderr
    assert check.stderr == ""                       # not even a warning
    assert check.stdout == (
        f"{config}: ok (1 listener, 1 upstream, 1 route, 1 proxy, 1 DKIM key, 1 token "
        "source, 0 accounts, 5 profiles, 12 address sets)\n")
