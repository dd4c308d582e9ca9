"""The README's quick start, command by command, as a new user types it after scripts/run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.peers import free_port, need, running, wait_for_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


def quick_start() -> tuple[str, list[list[str]]]:
    """The section's text and its ```sh blocks after scripts/run (one list of lines each)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quick start"):readme.index("\n## ", readme.index(
        "## Quick start") + 1)]
    blocks = [[line for line in block.splitlines() if line.strip()]
              for block in re.findall(r"```sh\n(.*?)```", section, re.S)]
    return section, blocks[1:]


def test_the_readme_says_where_relay_and_swaks_come_from() -> None:
    section, blocks = quick_start()
    assert "apt-get install swaks" in section          # swaks is not on a fresh machine
    assert "`.venv/bin/relay`" in section and ". .venv/bin/activate" in section
    commands = [line for block in blocks for line in block]
    assert any(line.startswith("swaks ") for line in commands)
    assert any(line.startswith("python3 -c ") for line in commands)   # the no-install way
    for line in commands:
        assert not line.startswith("relay "), f"{line!r} needs relay on PATH; say .venv/bin/"


def test_the_commands_after_scripts_run_work_as_written(tmp_path: Path) -> None:
    """A checkout-like directory: conf/relay.toml (on free ports) and .venv/bin/relay."""
    _, blocks = quick_start()
    smtp, metrics = free_port(), free_port()

    def ported(text: str) -> str:
        return text.replace("127.0.0.1:2525", f"127.0.0.1:{smtp}").replace(
            '"127.0.0.1", 2525', f'"127.0.0.1", {smtp}').replace(
            "127.0.0.1:9325", f"127.0.0.1:{metrics}")

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "relay.toml").write_text(ported((ROOT / "conf" / "relay.toml")
                                                          .read_text()))
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "relay").symlink_to(Path(sys.executable).with_name("relay"))
    env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    need("swaks")
    need("curl")
    log = tmp_path / "relay.log"
    with running([str(venv_bin / "relay"), "run", "-c", "conf/relay.toml"], log=log,
                 cwd=tmp_path, env=env) as proc:
        wait_for_port("127.0.0.1", smtp, proc=proc, log=log)
        wait_until(lambda: "relay started" in log.read_text())
        outputs: dict[str, str] = {}
        for block in blocks:
            for line in block:
                if line.startswith("ls var/outbox/"):    # delivery is asynchronous
                    wait_until(lambda: len(list((tmp_path / "var" / "outbox").glob(
                        "*.eml"))) == 2)
                out = subprocess.run(["bash", "-c", ported(line)], cwd=tmp_path, env=env,
                                     capture_output=True, text=True, timeout=60,
                                     check=False)
                assert out.returncode == 0, f"{line}\n{out.stdout}\n{out.stderr}"
                outputs[line] = out.stdout

    def output(prefix: str) -> str:
        (text,) = [v for k, v in outputs.items() if k.startswith(prefix)]
        return text
    assert "X-Original-To: customer@example.net" in output("ls var/outbox/")
    assert output(".venv/bin/relay queue list").strip() == "Mail queue is empty"
    assert f"relay pid {proc.pid} ready" in output(".venv/bin/relay status")
    assert "relay_messages_received_total" in output("curl ")
