"""Defaults that depend on the machine relay runs on: how many CPUs it may use.

``usable_cpus`` is the process's CPU affinity, lowered by a cgroup CPU quota (a
container's ``--cpus`` or a Kubernetes CPU limit, cgroup v2 ``cpu.max`` or v1
``cpu.cfs_quota_us``), rounded up. ``auto_smtp_processes`` is ``[relay] smtp_processes``
when the config does not set it: one SMTP listener process per usable CPU, at most
``AUTO_MAX``, since a process costs about 55 MB and each serves hundreds of messages a
second.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

AUTO_MAX = 8
CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs the cgroup quota allows (2.5 for 250000/100000), or None without a quota."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def usable_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may keep busy: its affinity, lowered by a cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def auto_smtp_processes() -> int:
    """The default ``smtp_processes``: one per usable CPU, 1 to ``AUTO_MAX``."""
    return min(AUTO_MAX, usable_cpus())
