"""What the benchmarks print beside every figure (the CPU and its vector and matrix units),
and timing of whole commands the way a user times them: a fresh process each, from start
to exit."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from speechtl.features.cpu_plan import cpu_name  # noqa: F401  (the benchmarks' CPU name is the schedule key's)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_units() -> dict[str, bool]:
    """Whether the CPU has AVX2, AVX-512 (foundation) and AMX (tiles), from /proc/cpuinfo."""
    flags = cpu_flags()
    return {"avx2": "avx2" in flags, "avx512": "avx512f" in flags, "amx": "amx_tile" in flags}


def cpu_label() -> str:
    """``AVX2 yes, AVX-512 no, AMX no``: printed beside every figure, since the same code
    runs at very different speeds on CPUs with and without these units."""
    u = cpu_units()
    return ", ".join(f"{name} {'yes' if u[key] else 'no'}" for key, name in (("avx2", "AVX2"), ("avx512", "AVX-512"), ("amx", "AMX")))


def machine() -> dict:
    """The machine, for a results file: CPU name, cores, flags, load average at the start."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_name(), "cores": cores, **cpu_units(), "python": platform.python_version(), "load_average": load}


def time_command(cmd: list[str], env: dict | None = None, cwd: str | os.PathLike | None = None) -> dict:
    """Run ``cmd`` in a fresh process; its wall time and the CPU time it (and its children)
    used, in seconds. Raises with the end of its stderr when it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}


def cold_and_warm(make_cmd, runs: int, env: dict | None = None, cwd=None) -> dict:
    """Time a command ``runs`` times, one after another: the first run is "cold" (the caller
    gives it a fresh per-user cache and output folder), the others "warm"; ``make_cmd(n)``
    builds run n's command. Returns every run and the cold time with the best warm one."""
    timings = [time_command(make_cmd(n), env=env, cwd=cwd) for n in range(runs)]
    warm = min(timings[1:], key=lambda t: t["wall_s"]) if len(timings) > 1 else None
    return {"cold": timings[0], "warm": warm, "runs": timings}


def speechtl_cmd(*args: str) -> list[str]:
    """``speechtl ARGS`` as a user runs it, with this interpreter."""
    return [sys.executable, "-m", "speechtl", *args]
