"""deploy/kubernetes: a StatefulSet with a spool PVC, probes and secrets that fit relay.toml."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.cli import build_parser
from relay.config.schema import Config
from tests.ops.deploy_support import (
    DEPLOY,
    check_shipped_config,
    dockerfile_command,
    image_env,
    parse_unit,
)

pytestmark = pytest.mark.fast

K8S = DEPLOY / "kubernetes"
SECRET_ENV = {"RELAY_SOCKS_PASSWORD": "x", "RELAY_O365_CLIENT_SECRET": "y"}


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def by_kind() -> dict[str, list[dict[str, Any]]]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out: dict[str, list[dict[str, Any]]] = {}
    for res in kust["resources"]:
        for d in docs(res):
            out.setdefault(d["kind"], []).append(d)
    return out


def relay_toml(kinds: dict[str, list[dict[str, Any]]]) -> str:
    (cm,) = kinds["ConfigMap"]
    return str(cm["data"]["relay.toml"])


def loaded(tmp_path: Path) -> tuple[dict[str, list[dict[str, Any]]], Config]:
    kinds = by_kind()
    return kinds, check_shipped_config(relay_toml(kinds), tmp_path, environ=SECRET_ENV)


def container(sts: dict[str, Any], name: str = "relay") -> dict[str, Any]:
    (c,) = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def test_every_manifest_parses_and_has_a_name() -> None:
    for path in K8S.glob("*.yaml"):
        for d in docs(path.name):
            assert d["apiVersion"] and d["kind"], path
            if d["kind"] != "Kustomization":
                assert d["metadata"]["name"], path


def test_spool_is_a_persistent_volume_never_an_emptydir(tmp_path: Path) -> None:
    kinds, cfg = loaded(tmp_path)
    (sts,) = kinds["StatefulSet"]
    spool = str(cfg.relay.spool)
    mounts = {m["mountPath"]: m for m in container(sts)["volumeMounts"]}
    volume = mounts[spool]["name"]
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert volume in claims
    pod_volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volume not in pod_volumes, "the spool must come from the volumeClaimTemplate"
    for v in pod_volumes.values():
        if "emptyDir" in v:
            paths = [m["mountPath"] for m in mounts.values() if m["name"] == v["name"]]
            assert all(not p.startswith(spool) for p in paths)
    # The config is a directory mount, so ConfigMap updates reach the pod for SIGHUP.
    args = container(sts)["args"]
    config = args[args.index("-c") + 1] if "-c" in args else image_env()["RELAY_CONFIG"]
    config_dir = str(Path(config).parent)
    assert "subPath" not in mounts[config_dir]


def test_probes_ports_and_grace_match_the_config(tmp_path: Path) -> None:
    kinds, cfg = loaded(tmp_path)
    (sts,) = kinds["StatefulSet"]
    c = container(sts)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == cfg.metrics.listen.port
    assert cfg.metrics.listen.host == "0.0.0.0", "probes come from the kubelet, not loopback"
    for lc in cfg.listeners:
        assert lc.listen.port in ports.values(), lc.name
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    pause = float(pre_stop[1]) if pre_stop[0] == "sleep" else 0.0
    grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pause + cfg.relay.shutdown_grace + 10
    for svc in kinds["Service"]:
        if svc["spec"]["selector"] != sts["spec"]["selector"]["matchLabels"]:
            continue                                 # another workload's (Redis)
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, f"{svc['metadata']['name']}: {p}"


def test_security_context_and_secrets(tmp_path: Path) -> None:
    kinds, _ = loaded(tmp_path)
    (sts,) = kinds["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    c = container(sts)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert ":" in c["image"] and not c["image"].endswith(":latest")
    # Every secret the config reads from the environment is a secretKeyRef.
    env = {e["name"]: e for e in c.get("env", [])}
    for name in re.findall(r'_env = "(\w+)"', relay_toml(kinds)):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    # ... and the example Secrets have those keys.
    example = {d["metadata"]["name"]: d for d in docs("secrets.example.yaml")}
    for e in env.values():
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["key"] in example[ref["name"]]["stringData"]
    for v in pod["volumes"]:
        if "secret" in v:
            assert v["secret"]["secretName"] in example


def test_replicas_share_quotas_through_one_redis(tmp_path: Path) -> None:
    """Several pods, each its own spool volume, one Redis for the quotas (README)."""
    kinds, cfg = loaded(tmp_path)
    (sts,) = kinds["StatefulSet"]
    assert sts["spec"]["replicas"] >= 2 and sts["spec"]["volumeClaimTemplates"]
    assert cfg.pacing.backend == "redis"
    assert cfg.pacing.replicas == sts["spec"]["replicas"]
    (redis,) = kinds["Deployment"]
    assert redis["spec"]["replicas"] == 1
    services = {s["metadata"]["name"]: s for s in kinds["Service"]}
    host_port = cfg.pacing.redis_url.split("//")[1].split("/")[0]
    host, port = host_port.split(":")
    svc = services[host]
    assert svc["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["port"] == int(port)
    pod = redis["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert {p["name"] for p in c["ports"]} == {svc_port["targetPort"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "--save" in c["args"] and "--appendonly" in c["args"]      # nothing to persist


def test_reload_sidecar_runs_relay_reload_and_signals_no_pid_file(tmp_path: Path) -> None:
    """The sidecar reloads the way an operator does (`relay reload`: the control socket),
    never with a kill on a pid read from a file (issue 12: reload never signals a
    stranger); it mounts what that command reads, and relay stays PID 1."""
    kinds, cfg = loaded(tmp_path)
    (patch,) = docs("reload-sidecar.yaml")
    pod = patch["spec"]["template"]["spec"]
    assert not pod.get("shareProcessNamespace"), "relay would no longer be PID 1"
    (sidecar,) = pod["containers"]
    script = sidecar["command"][-1]
    commands = [line.strip() for line in script.splitlines()]
    assert any(c.startswith("relay reload") for c in commands), script
    assert "kill" not in script and "relay.pid" not in script
    (sts,) = kinds["StatefulSet"]
    assert sidecar["image"] == container(sts)["image"]     # `relay` and RELAY_CONFIG
    assert "args" not in sidecar and "-c" not in script    # the image's RELAY_CONFIG
    volumes = {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    volumes |= {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert set(mounts.values()) <= volumes
    relay_mounts = {m["mountPath"]: m["name"] for m in container(sts)["volumeMounts"]}
    # The control socket is on the spool volume, the same one relay writes it to.
    socket_dir = str((cfg.relay.control_socket or cfg.relay.spool / "control.sock").parent)
    assert mounts[socket_dir] == relay_mounts[socket_dir]
    # `relay reload` checks the file first: the config and every file it names are there.
    wanted = {str(Path(image_env()["RELAY_CONFIG"]).parent)}
    wanted |= {str(Path(p).parent) for p in re.findall(r'"(/etc/[^"]+)"', relay_toml(kinds))}
    for path in wanted:
        assert mounts.get(path) == relay_mounts[path], f"the sidecar does not mount {path}"
        assert f"readlink {path}/..data" in script, f"changes under {path} are not watched"


def test_commands_in_deploy_files_are_relay_commands() -> None:
    """systemd ExecStart, the image's CMD and the pod's args are commands relay's CLI has."""
    parser = build_parser()
    unit = parse_unit((DEPLOY / "systemd" / "relay.service").read_text())
    (sts,) = by_kind()["StatefulSet"]
    commands = {
        "systemd ExecStart": shlex.split(unit["Service.ExecStart"][0])[1:],
        "Dockerfile CMD": dockerfile_command(),
        "StatefulSet args": container(sts)["args"],
    }
    missing = []
    for where, argv in commands.items():
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            missing.append(f"{where}: relay {' '.join(argv)}")
            continue
        assert callable(getattr(args, "func", None)), where
    assert not missing, "relay's CLI does not accept: " + "; ".join(missing)
