"""How many CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota.

A container limited to 2 CPUs (Kubernetes `resources.limits.cpu: 2`, `docker run --cpus 2`) still sees every core
of its node in `os.cpu_count()` and usually in its affinity mask; the limit is a CFS quota: cgroup v2's `cpu.max`
("quota period", or "max") or cgroup v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none). The quota counts
whole CPUs rounded down (1.5 CPUs: 1 thread, so that the threads are not throttled mid-step), at least 1. The
fused step's default thread count (`SHORTCUT_DECODE_THREADS=0`) is this number.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ancestors(root: Path, cgroup: str) -> list[Path]:
    """`root` joined with `cgroup` and each of its parents up to `root` itself (a quota anywhere above limits us)."""
    parts = [p for p in cgroup.split("/") if p and p not in (".", "..")]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _quota_v2(root: Path, cgroup: str) -> float | None:
    limits = []
    for folder in _ancestors(root, cgroup):
        text = _read(folder / "cpu.max")
        if text is None:
            continue
        quota, _, period = text.partition(" ")
        if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
            limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def _quota_v1(root: Path, cgroup: str) -> float | None:
    limits = []
    for name in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
        # the cgroup's folder under the controller's mount, or the mount itself (a container sees only its own)
        for folder in [*_ancestors(root / name, cgroup), root / name]:
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota is None or period is None:
                continue
            try:
                q, p = int(quota), int(period)
            except ValueError:
                continue
            if q > 0 and p > 0:
                limits.append(q / p)
    return min(limits) if limits else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup (v2, else v1) in CPUs, or None where there is none."""
    text = _read(proc_cgroup) or ""
    v2 = v1 = None
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    if v2 is not None and (limit := _quota_v2(root, v2)) is not None:
        return limit
    if v1 is not None:
        return _quota_v1(root, v1)
    return None


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP, affinity: int | None = None) -> int:
    """The CPUs this process may use: its affinity mask's size (`affinity` overrides it, for tests), capped by the
    cgroup quota rounded down; at least 1."""
    n = affinity if affinity is not None else _affinity()
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        n = min(n, math.floor(limit))
    return max(1, n)
