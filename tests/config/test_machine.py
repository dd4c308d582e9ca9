"""The machine-dependent default: ``smtp_processes = "auto"`` from CPUs and cgroup quotas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay.config import machine
from relay.config.loader import load_config
from relay.config.machine import AUTO_MAX, auto_smtp_processes, cgroup_cpu_quota, usable_cpus
from tests.config.conftest import BASE

pytestmark = pytest.mark.fast


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "50000 100000\n"}, 0.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
    ({"cpu.max": "garbage\n"}, None),
    ({}, None),
], ids=["v2-none", "v2-1.5", "v2-half", "v1-none", "v1-3", "unreadable", "no-cgroup"])
def test_cgroup_quota(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    assert cgroup_cpu_quota(tree(tmp_path, files)) == quota


def test_a_quota_lowers_the_cpus_and_never_below_one(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert usable_cpus(tmp_path) == 16
    assert usable_cpus(tree(tmp_path / "a", {"cpu.max": "250000 100000"})) == 3
    assert usable_cpus(tree(tmp_path / "b", {"cpu.max": "10000 100000"})) == 1


def test_auto_is_one_process_per_cpu_at_most_eight(monkeypatch: pytest.MonkeyPatch) -> None:
    for cpus, expected in ((1, 1), (2, 2), (6, 6), (64, AUTO_MAX)):
        monkeypatch.setattr(machine, "usable_cpus", lambda cpus=cpus: cpus)
        assert auto_smtp_processes() == expected


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("line", ["", 'smtp_processes = "auto"\n'], ids=["unset", "auto"])
def test_the_default_and_auto_start_a_process_per_cpu(tmp_path: Path, line: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "usable_cpus", lambda: 3)
    text = BASE.replace('default_upstream = "out"\n', f'default_upstream = "out"\n{line}')
    assert load_config(write(tmp_path, text)).relay.smtp_processes == 3


@pytest.mark.parametrize("count", [0, 1, 5])
def test_a_number_is_taken_as_it_is(tmp_path: Path, count: int) -> None:
    text = BASE.replace('default_upstream = "out"\n',
                        f'default_upstream = "out"\nsmtp_processes = {count}\n')
    assert load_config(write(tmp_path, text)).relay.smtp_processes == count
