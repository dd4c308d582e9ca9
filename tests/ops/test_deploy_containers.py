"""deploy/docker and deploy/compose: a non-root slim image and a demo stack that fit relay.

No container engine runs here, so the files are read and checked against relay itself:
its config loader, its CLI, its metrics port, and the real Dante and promtool.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ops.deploy_support import (
    DEPLOY,
    ROOT,
    check_shipped_config,
    dockerfile_command,
    final_stage,
    image_env,
    instructions,
)
from tests.peers import need

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE_DIR = DEPLOY / "compose"


def pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return (bool(name) and "/" not in tag and tag not in ("", "latest")) or "@sha256:" in image


@pytest.mark.fast
def test_dockerfile_is_non_root_slim_and_pinned() -> None:
    ins = instructions(DOCKERFILE)
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    froms = [a.split(" ")[0] for w, a in ins if w == "FROM"]
    assert len(froms) >= 2, "multi-stage: wheels are built apart from the runtime image"
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert pinned(image) and "slim" in image, image
    final = final_stage(DOCKERFILE)
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    assert re.fullmatch(r"\d+:\d+", users[-1]), "numeric uid:gid so runAsNonRoot can check it"
    words = dict(final)
    assert words["STOPSIGNAL"] == "SIGTERM"
    assert "/healthz" in json.dumps([a for w, a in final if w in ("HEALTHCHECK", "ENV")])
    assert '"/var/spool/relay"' in words["VOLUME"]
    assert json.loads(words["ENTRYPOINT"]) == ["relay"]


@pytest.mark.fast
def test_dockerfile_copies_what_exists_and_the_ignore_file_keeps() -> None:
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    kept = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    assert "*" in ignore, "the context is a whitelist"
    for word, rest in instructions(DOCKERFILE):
        if word != "COPY" or "--from" in rest:
            continue
        *sources, _dest = rest.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: missing from the source tree"
            assert any(src == k or src.startswith(k + "/") for k in kept), \
                f"COPY {src} is excluded by Dockerfile.dockerignore"


@pytest.mark.fast
def test_dockerfile_exposes_the_compose_ports() -> None:
    exposed = {int(p) for w, a in final_stage(DOCKERFILE) if w == "EXPOSE" for p in a.split()}
    config = (COMPOSE_DIR / "relay.toml").read_text()
    ports = {int(p) for p in re.findall(r'listen = "[^"]*:(\d+)"', config)}
    assert ports and ports <= exposed


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())


@pytest.mark.fast
def test_compose_stack_is_complete_and_consistent(tmp_path: Path) -> None:
    doc = compose()
    services = doc["services"]
    assert {"relay", "dante", "prometheus", "sink"} <= set(services)
    cfg = check_shipped_config((COMPOSE_DIR / "relay.toml").read_text(), tmp_path,
                               environ={"DANTE_PASSWORD": "x"})
    relay = services["relay"]
    # The spool is a named volume at the config's spool path.
    mounts = {v.split(":")[1]: v.split(":")[0] for v in relay["volumes"]}
    assert mounts[str(cfg.relay.spool)] in doc["volumes"]
    assert relay["read_only"] is True and relay["cap_drop"] == ["ALL"]
    grace = relay["stop_grace_period"]
    assert int(grace.rstrip("s")) > cfg.relay.shutdown_grace
    # Secrets named in the config come from the environment.
    for env in re.findall(r'_env = "(\w+)"', (COMPOSE_DIR / "relay.toml").read_text()):
        assert env in relay["environment"]
    # Upstream through the proxy to the sink, by service name.
    assert cfg.proxy("dante").host == "dante" and cfg.upstream("sink").host == "sink"
    assert cfg.upstream("sink").via == "dante"
    # Images pinned; local files mounted or built exist.
    for name, svc in services.items():
        if "image" in svc and "build" not in svc:
            assert pinned(svc["image"]), name
        if "build" in svc:
            ctx = (COMPOSE_DIR / svc["build"]["context"]).resolve()
            assert (ctx / svc["build"]["dockerfile"]).exists(), name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (COMPOSE_DIR / src).exists(), f"{name}: {src}"
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_prometheus_scrapes_relay_and_loads_rules(tmp_path: Path) -> None:
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    metrics_port = re.search(r'\[metrics\]\s*\n(?:#.*\n)*listen = "[^"]*:(\d+)"',
                             (COMPOSE_DIR / "relay.toml").read_text())
    assert metrics_port
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"relay:{metrics_port.group(1)}"]
    # Check the config with promtool, the container's rule path mapped to the repo's file.
    mounted = {v.split(":")[1]: v.split(":")[0]
               for v in compose()["services"]["prometheus"]["volumes"]}
    text = (COMPOSE_DIR / "prometheus.yml").read_text()
    for rule in prom["rule_files"]:
        text = text.replace(rule, str((COMPOSE_DIR / mounted[rule]).resolve()))
    local = tmp_path / "prometheus.yml"
    local.write_text(text)
    proc = subprocess.run([need("promtool"), "check", "config", str(local)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_dante_config_is_valid(tmp_path: Path) -> None:
    conf = (COMPOSE_DIR / "danted.conf").read_text()
    assert "socksmethod: username" in conf
    # The container's interface is eth0; check the rest on whatever this host has.
    local = tmp_path / "danted.conf"
    local.write_text(conf.replace("external: eth0", "external: 127.0.0.1"))
    proc = subprocess.run([need("danted"), "-V", "-f", str(local)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    script = COMPOSE_DIR / "dante-entrypoint.sh"
    assert script.stat().st_mode & 0o111, "the entrypoint must be executable"
    subprocess.run(["sh", "-n", str(script)], check=True, timeout=30)
    sink = [a for w, a in instructions(COMPOSE_DIR / "sink.Dockerfile") if w == "CMD"]
    argv = json.loads(sink[0])
    assert argv[0] == "/usr/sbin/smtp-sink"
    sink_port = argv[-2].rsplit(":", 1)[1]                 # [host]:port backlog
    assert f"port = {sink_port}" in (COMPOSE_DIR / "relay.toml").read_text()


@pytest.mark.fast
def test_commands_run_in_the_container_find_the_running_relays_config() -> None:
    """`docker exec relay relay queue list` and `kubectl exec ... relay status` use the
    config the image's relay runs on: the image names it in RELAY_CONFIG, which every
    command reads, and its default command gives no other -c."""
    config = image_env()["RELAY_CONFIG"]
    assert config == "/etc/relay/relay.toml"       # where the docker run line mounts it
    assert f"{config}:ro" in DOCKERFILE.read_text()
    argv = dockerfile_command()
    assert "-c" not in argv and "--config" not in argv, argv
    assert "docker exec relay relay queue list" in DOCKERFILE.read_text()
