"""Helpers for the deploy/ tests: paths, relay's metric names, and checking shipped configs."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest

from relay.config.loader import load_config
from relay.config.schema import Config
from relay.metrics import Metrics
from tests.ops.support import populate

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
METRIC_REF = re.compile(r"\brelay_[a-z0-9_]+\b")


def exposed_names() -> set[str]:
    """Every sample name a populated relay exposes (with _total, _bucket, ... suffixes)."""
    m = Metrics()
    populate(m)
    text = generate_latest(m.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def family_names() -> set[str]:
    """The metric families relay defines (as named in the exposition, e.g. relay_build_info)."""
    m = Metrics()
    names = set()
    for family in m.registry.collect():
        names.add(family.name + ("_info" if family.type == "info" else ""))
    return names


def parse_unit(text: str) -> dict[str, list[str]]:
    """A systemd unit as ``{"Section.Key": [values...]}`` (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def check_shipped_config(text: str, tmp: Path, *, environ: dict[str, str]) -> Config:
    """Load a config shipped in deploy/ as relay would, with image paths mapped to tmp.

    Certificates under ``/etc/relay-tls/`` are made with trustme; other ``/etc/...``
    files become empty private files.
    """
    import trustme

    for path in sorted(set(re.findall(r'"(/etc/[^"]+)"', text))):
        local = tmp / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        if path.endswith((".crt", ".pem")) or path.endswith(".key"):
            ca = trustme.CA()
            cert = ca.issue_cert("relay.example.com")
            cert.cert_chain_pems[0].write_to_path(str(local.with_suffix(".crt")))
            cert.private_key_pem.write_to_path(str(local.with_suffix(".key")))
        else:
            local.write_text("")
        local.chmod(0o600)
        text = text.replace(f'"{path}"', f'"{local}"')
    config = tmp / "relay.toml"
    config.write_text(text)
    return load_config(config, environ=environ)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last:]


def image_env() -> dict[str, str]:
    """The environment the image's final stage sets (``ENV A=1 B=2`` lines)."""
    import shlex

    env: dict[str, str] = {}
    for word, rest in final_stage(DEPLOY / "docker" / "Dockerfile"):
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def dockerfile_command() -> list[str]:
    """The argv the image runs by default (CMD after the relay ENTRYPOINT)."""
    import json

    final = dict(final_stage(DEPLOY / "docker" / "Dockerfile"))
    return list(json.loads(final["CMD"]))
