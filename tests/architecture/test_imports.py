"""What importing a room really loads, in a fresh interpreter (the static contracts in
pyproject.toml cannot see a package ``__init__`` or a lazy import that drags a stage in).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config.loader import load_config
from relay.dkim.keys import generate, write_private_key
from tests.peers.relayproc import config as relay_config

ROOT = Path(__file__).resolve().parents[2]
RELAY = ROOT / "relay"


def modules_of(package: str) -> list[str]:
    base = RELAY.joinpath(*package.split(".")[1:])
    names = [package]
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(RELAY.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        if not name.endswith("__main__") and name not in names:
            names.append(name)
    return names


def loaded_by(*modules: str) -> set[str]:
    """The modules a fresh interpreter has loaded after importing ``modules``."""
    code = ("import importlib, json, sys\n"
            f"for m in {list(modules)!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60)
    return set(json.loads(out.stdout))


def offenders(loaded: set[str], forbidden: list[str]) -> list[str]:
    return sorted(m for m in loaded
                  if any(m == f or m.startswith(f + ".") for f in forbidden))


def test_sending_loads_no_smtp_listener() -> None:
    loaded = loaded_by(*modules_of("relay.outbound"))
    assert "relay.outbound.scheduler" in loaded and "relay.outbound.attempt" in loaded
    assert offenders(loaded, ["aiosmtpd", "relay.smtp", "relay.checks",
                              "relay.listenproc"]) == []


def test_a_listener_process_loads_no_delivery_transport_or_proxy() -> None:
    loaded = loaded_by("relay.app.child", "relay.app.logs")
    assert "relay.smtp.protocol" in loaded and "relay.smtp.listener" in loaded
    assert offenders(loaded, ["relay.outbound", "relay.transports", "relay.proxy",
                              "relay.oauth", "relay.probe", "relay.control", "asyncssh",
                              "python_socks", "aiosmtplib", "aiosmtpd"]) == []


# Each of these is megabytes of memory in every process that loads it (cryptography
# about 4, dnspython and pyspf about 6, asyncssh about 7): a process loads them only for
# a config that uses them.
FEATURE_LIBRARIES = ["cryptography", "dns", "spf", "dkim", "asyncssh"]

def loaded_by_listener_process(tmp_path: Path, *, listener: str = "", dkim: str = "") -> set[str]:
    """The modules a fresh interpreter loads to import an SMTP listener process's code and
    build its listeners from a config, as the process does at start: the main process
    loads the config and hands it over pickled (``relay.listenproc``)."""
    (tmp_path / "relay.toml").write_text(
        relay_config(spool=tmp_path / "spool", listen=2525, sink=2526,
                     listener_extra=listener, extra=dkim))
    (tmp_path / "config.pickle").write_bytes(pickle.dumps(load_config(tmp_path / "relay.toml")))
    code = ("import json, pickle, sys\n"
            "from relay.app.child import ListenerProcess\n"
            "from relay.app.listeners import build_listeners\n"
            "from relay.metrics import Metrics\n"
            "from relay.spool.store import Spool\n"
            "config = pickle.loads(open('config.pickle', 'rb').read())\n"
            "side = build_listeners(config, spool=Spool(config.relay.spool), metrics=Metrics(),"
            " smtp_only=True)\n"
            "checks = side.listeners['platform'].checks\n"
            "print(json.dumps([sorted(sys.modules), side.signer is not None,"
            " getattr(checks, '_spf', None) is not None]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    modules, signs, checks_spf = json.loads(out.stdout)
    return set(modules) | ({"<signer>"} if signs else set()) | \
        ({"<spf checker>"} if checks_spf else set())


def test_a_listener_process_without_spf_or_dkim_loads_none_of_their_libraries(
        tmp_path: Path) -> None:
    loaded = loaded_by_listener_process(tmp_path)
    assert "relay.smtp.listener" in loaded
    assert offenders(loaded, FEATURE_LIBRARIES) == []
    assert "<signer>" not in loaded and "<spf checker>" not in loaded


def test_a_listener_process_loads_pyspf_for_spf_and_cryptography_for_dkim(
        tmp_path: Path) -> None:
    loaded = loaded_by_listener_process(tmp_path, listener='spf = "tag"\n')
    assert {"spf", "<spf checker>"} <= loaded and "<signer>" not in loaded
    assert offenders(loaded, ["cryptography", "dkim", "asyncssh"]) == []
    key = tmp_path / "dkim.key"
    write_private_key(generate("ed25519"), key)
    loaded = loaded_by_listener_process(
        tmp_path, dkim=f'[[dkim]]\ndomain = "relay.test"\nselector = "s1"\n'
                       f'algorithm = "ed25519-sha256"\nkey_file = "{key}"\n')
    assert {"cryptography", "<signer>"} <= loaded and "<spf checker>" not in loaded
    assert offenders(loaded, ["spf", "dns", "asyncssh"]) == []


def test_relay_run_loads_asyncssh_and_dkimpy_only_when_a_config_uses_them() -> None:
    """``relay run`` imports every command's argument parser and the main process's code;
    asyncssh comes with the first SSH tunnel, dkimpy with ``relay dkim check|verify``."""
    loaded = loaded_by("relay.cli", "relay.app.runtime", "relay.cli.dkim", "relay.cli.run")
    assert "relay.transports.factory" in loaded
    assert offenders(loaded, ["asyncssh", "dkim"]) == []


LEAVES = ["relay.envelope", "relay.verdict", "relay.errors", "relay.metrics",
          "relay.maillog", "relay.config.loader", "relay.config.schema", "relay.timing",
          "relay.sasl", "relay.throttle", "relay.users", "relay.tls", "relay.headers",
          "relay.connlimits", "relay.atomicfile", "relay.acceptloop", "relay.ratelog",
          "relay.pickling"]
STAGES = ["relay.app", "relay.cli", "relay.smtp", "relay.listenproc", "relay.proxy",
          "relay.outbound", "relay.probe", "relay.control", "relay.checks", "relay.dkim",
          "relay.oauth", "relay.ops", "relay.spool", "relay.routing", "relay.transports",
          "aiosmtpd", "asyncssh", "aiosmtplib"]


@pytest.mark.parametrize("leaf", LEAVES)
def test_a_leaf_loads_no_stage(leaf: str) -> None:
    assert offenders(loaded_by(leaf), STAGES) == []


def test_the_command_line_loads_stages_only_for_the_command_run() -> None:
    code = ("import json, sys\nfrom relay.cli import build_parser\nbuild_parser()\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60)
    loaded = set(json.loads(out.stdout))
    assert offenders(loaded, ["aiosmtpd", "asyncssh", "aiosmtplib", "python_socks",
                              "relay.smtp", "relay.outbound", "relay.proxy",
                              "relay.transports", "relay.probe"]) == []


def test_import_contracts_hold() -> None:
    """The static contracts in pyproject.toml ([tool.importlinter]); scripts/test runs them
    too, this makes a plain pytest run fail on a violation with the import chain."""
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_the_readme_module_table_and_the_tree_agree() -> None:
    """Every room and top-level module of relay/ is in the README's module table, and every
    path the table names exists: a newcomer reading either finds the same floor plan."""
    import re

    readme = (ROOT / "README.md").read_text()
    start = readme.index("| module | job |")
    table = readme[start:readme.index("\n\n", start)]
    named = set(re.findall(r"`(relay/[\w./]*)`", table))
    for path in named:
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
    tree = {f"relay/{p.name}/" for p in RELAY.iterdir()
            if p.is_dir() and (p / "__init__.py").exists()}
    tree |= {f"relay/{p.name}" for p in RELAY.glob("*.py") if p.name != "__init__.py"}
    missing = sorted(tree - named)
    assert not missing, f"relay/ has {missing}, which the README's module table does not list"
