"""How many CPUs this process may really use, and so how many threads to run.

torch sizes its thread pool from the host's cores. A process pinned to fewer
(``taskset``, a cpuset) or given a share of them by a cgroup CPU quota (Docker's
``--cpus``, a Kubernetes CPU limit) then runs more threads than it has CPUs, and every
parallel region waits for threads that are not running. :func:`cpu_budget` takes the
smallest of the CPUs in the affinity mask, the cgroup quota (v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, rounded up) and an explicit request
(``OMP_NUM_THREADS``, ``--threads``, ``threads=``); :func:`apply_budget` sets torch's
intra-op threads to it. Every command, training run, extraction and transcription goes
through them, and DataLoader workers and parallel streams are capped by the same figure.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")
_logged: tuple | None = None  # the last choice logged: each is logged once
_requested: int | None = None  # the process's request (``--threads``), when a call names none


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``taskset``, cpusets); all CPUs where unknown."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _v2_quota(folder: Path) -> float | None:
    """CPUs allowed by ``folder/cpu.max`` ("QUOTA PERIOD" or "max PERIOD"), None without a limit."""
    try:
        fields = (folder / "cpu.max").read_text().split()
    except OSError:
        return None
    if len(fields) < 1 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(folder: Path) -> float | None:
    """CPUs allowed by ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in ``folder`` (quota -1: none)."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text().strip())
        period = int((folder / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _with_ancestors(base: Path, rel: str) -> list[Path]:
    """``base/rel`` and each folder above it up to ``base``: a limit on a parent cgroup
    holds for its children too."""
    parts = [p for p in rel.strip("/").split("/") if p and p != ".."]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cpu_limit(root: str | os.PathLike | None = None, proc_cgroup: str | os.PathLike | None = None) -> float | None:
    """CPUs this process's cgroup quota allows (1.5 = one and a half CPUs), or None without one.

    ``root`` is where the cgroup file systems are mounted and ``proc_cgroup`` the file
    naming this process's cgroups (``/proc/self/cgroup``); tests point both into a
    temporary folder. Both hierarchies are read: v2 (``cpu.max`` in the unified tree,
    at ``root`` or ``root/unified``) and v1 (the ``cpu`` controller's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), in this process's cgroup, every
    cgroup above it, and ``root`` itself (inside a container the container's own cgroup
    is mounted there). The smallest quota found wins."""
    root = Path(CGROUP_ROOT if root is None else root)
    proc_cgroup = PROC_CGROUP if proc_cgroup is None else proc_cgroup
    v2_paths, v1_paths = ["/"], ["/"]
    try:
        for line in Path(proc_cgroup).read_text().splitlines():
            hier, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hier == "0" and controllers == "":
                v2_paths.append(path)
            elif "cpu" in controllers.split(","):
                v1_paths.append(path)
    except OSError:
        pass
    limits = []
    for base in (root, root / "unified"):
        for rel in v2_paths:
            limits += [_v2_quota(d) for d in _with_ancestors(base, rel)]
    for mount in _V1_CPU_MOUNTS:
        for rel in v1_paths:
            limits += [_v1_quota(d) for d in _with_ancestors(root / mount, rel)]
    found = [q for q in limits if q is not None]
    return min(found) if found else None


def omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a whole number (its first level when nested, "4,2"), else None."""
    text = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        n = int(text)
    except ValueError:
        return None
    return n if n >= 1 else None


@dataclass(frozen=True)
class CpuBudget:
    """The threads to run and where the figure came from."""

    threads: int
    affinity: int  # CPUs in the affinity mask
    quota: float | None  # the cgroup quota in CPUs, None without one
    omp: int | None  # OMP_NUM_THREADS
    requested: int | None  # --threads / threads=

    def describe(self) -> str:
        quota = "none" if self.quota is None else f"{self.quota:g} CPU"
        return (f"{self.threads} thread(s): {self.affinity} CPU(s) in the affinity mask, cgroup quota {quota}, "
                f"OMP_NUM_THREADS {self.omp or 'unset'}, threads requested {self.requested or 'unset'}")


def cpu_budget(requested: int | None = None, root: str | os.PathLike | None = None,
               proc_cgroup: str | os.PathLike | None = None) -> CpuBudget:
    """The smallest of the CPUs this process may run on, its cgroup quota (rounded up:
    a 1.5-CPU quota runs 2 threads, a 0.5-CPU one runs 1), ``OMP_NUM_THREADS`` and
    ``requested``. At least 1."""
    requested = _requested if requested is None else requested
    if requested is not None and requested < 1:
        raise ValueError(f"threads must be at least 1 (got {requested})")
    affinity, quota, omp = affinity_cpus(), cgroup_cpu_limit(root, proc_cgroup), omp_threads()
    limits = [affinity] + [n for n in (omp, requested) if n is not None]
    if quota is not None:
        limits.append(max(1, math.ceil(quota - 1e-9)))
    return CpuBudget(max(1, min(limits)), affinity, quota, omp, requested)


def request_threads(n: int | None) -> None:
    """Ask for ``n`` threads in this process (the ``--threads`` flag), for every later
    :func:`cpu_budget` that names no request of its own; None withdraws the request."""
    global _requested
    if n is not None and n < 1:
        raise ValueError(f"threads must be at least 1 (got {n})")
    _requested = n


def requested() -> int | None:
    """The process's request (:func:`request_threads`), None without one."""
    return _requested


def cpu_threads(requested: int | None = None) -> int:
    """:func:`cpu_budget`'s thread count."""
    return cpu_budget(requested).threads


def apply_budget(requested: int | None = None) -> int:
    """Set torch's intra-op threads to :func:`cpu_budget` and return the count.

    Without ``requested`` a caller that already set fewer threads keeps them; with it the
    request is run as asked, up to the budget. The choice is logged at debug level the
    first time it is made (and again when it changes). A process that has not imported
    torch (the ONNX runtime) gets the count and no torch."""
    import sys

    global _logged
    requested = _requested if requested is None else requested
    budget = cpu_budget(requested)
    torch = sys.modules.get("torch")
    if torch is None:
        return budget.threads
    n = budget.threads if requested is not None else min(budget.threads, torch.get_num_threads())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if _logged != (n, budget):
        _logged = (n, budget)
        logger.debug("intra-op threads: %s", budget.describe() if n == budget.threads else f"{n} (set by the caller; budget {budget.describe()})")
    return n


def cap_workers(workers: int) -> int:
    """DataLoader worker processes, at most one per CPU of the budget."""
    capped = max(0, min(workers, cpu_threads()))
    if capped != workers:
        logger.debug("DataLoader workers: %d, not %d (%s)", capped, workers, cpu_budget().describe())
    return capped


def _busy_seconds(stat: Path) -> float | None:
    """CPU seconds spent busy by every process since boot (``/proc/stat``'s first line:
    all but idle and iowait), None where unreadable."""
    try:
        fields = [int(x) for x in stat.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    if len(fields) < 5:
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class OthersMeter:
    """CPUs kept busy by other processes: the machine's busy time (``/proc/stat``) less
    this process's own (``os.times``, all its threads), per second of wall time, averaged
    since the previous reading of at least ``min_window`` seconds.

    Our own DataLoader workers count as others: they compete for the same cores. Where
    ``/proc/stat`` cannot be read, :meth:`read` returns None (nothing known)."""

    def __init__(self, stat: str | os.PathLike = "/proc/stat", min_window: float = 0.25,
                 clock=None, own=None):
        import time

        self.stat = Path(stat)
        self.min_window = min_window
        self.clock = clock or time.monotonic
        self.own = own or (lambda: sum(os.times()[:2]))
        self.last = self._snap()
        self.value: float | None = None

    def _snap(self):
        busy = _busy_seconds(self.stat)
        return None if busy is None else (self.clock(), busy, self.own())

    def read(self) -> float | None:
        """Others' CPUs since the last reading (the previous figure when less than
        ``min_window`` has passed)."""
        now = self._snap()
        if now is None or self.last is None:
            self.last = now
            return self.value
        wall = now[0] - self.last[0]
        if wall < self.min_window:
            return self.value
        others = ((now[1] - self.last[1]) - (now[2] - self.last[2])) / wall
        self.value, self.last = max(0.0, others), now
        return self.value
