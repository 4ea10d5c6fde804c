"""The thread budget: affinity, cgroup quotas (fake cgroup files in a temporary folder),
OMP_NUM_THREADS and requests; what follows it (torch threads, DataLoader workers,
streams); and the tuner that picks one thread or all per training update."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import pytest
import torch

from speechtl.core import cpus
from speechtl.core.cpus import apply_budget, cap_workers, cgroup_cpu_limit, cpu_budget, request_threads
from speechtl.core.threads import ThreadTuner, cpu_streams
from speechtl.data.loader import decode_workers, sorted_loader


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    request_threads(None)
    torch.set_num_threads(before)


def fake_cgroup(tmp_path, files: dict[str, str], proc: str):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc_file = tmp_path / "proc_self_cgroup"
    proc_file.write_text(proc)
    return root, proc_file


def test_cgroup_v2_quota(tmp_path):
    root, proc = fake_cgroup(tmp_path, {"cpu.max": "max 100000\n", "app.slice/job/cpu.max": "150000 100000\n"},
                             "0::/app.slice/job\n")
    assert cgroup_cpu_limit(root, proc) == 1.5
    assert cpu_budget(None, root, proc).threads == min(2, cpus.affinity_cpus())  # 1.5 CPUs: rounded up
    (root / "app.slice" / "cpu.max").write_text("50000 100000\n")  # a parent's limit holds for its children
    assert cgroup_cpu_limit(root, proc) == 0.5
    assert cpu_budget(None, root, proc).threads == 1
    (root / "app.slice" / "cpu.max").write_text("max 100000\n")
    (root / "app.slice" / "job" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(root, proc) is None


def test_cgroup_v1_quota(tmp_path):
    root, proc = fake_cgroup(tmp_path, {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000\n",
                                        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
                                        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
                             "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    assert cgroup_cpu_limit(root, proc) == 1.0
    assert cpu_budget(None, root, proc).threads == 1


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "none.txt") is None
    assert cpu_budget(None, tmp_path / "none", tmp_path / "none.txt").threads == cpus.affinity_cpus()


def test_a_quota_of_one_cpu_sets_one_thread_and_caps_workers(tmp_path, monkeypatch, restore_threads, caplog):
    """The whole path a command takes, with the reader pointed at a fake 1-CPU cgroup."""
    root, proc = fake_cgroup(tmp_path, {"cpu.max": "100000 100000\n"}, "0::/\n")
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "PROC_CGROUP", proc)
    torch.set_num_threads(2)
    with caplog.at_level(logging.DEBUG, logger="speechtl.core.cpus"):
        assert apply_budget() == 1
        apply_budget()
    assert torch.get_num_threads() == 1
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1  # logged once
    assert "cgroup quota 1 CPU" in caplog.records[0].getMessage()
    assert cap_workers(4) == 1
    assert decode_workers("cpu") == 0 and decode_workers("cuda") == 0
    assert cpu_streams("cpu") == 1
    assert sorted_loader(_Clips(), 10.0, list, num_workers=4).num_workers == 1


class _Clips:
    durations = [1.0, 2.0]


def test_omp_num_threads_and_requests(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_budget().threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert cpu_budget().omp is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_budget(1).threads == 1
    request_threads(1)
    assert apply_budget() == 1 and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="threads must be at least 1"):
        cpu_budget(0)


def test_threads_config_key_is_checked():
    from speechtl.training.config import load_train_config

    with pytest.raises(ValueError, match="config key 'threads': must be at least 1"):
        load_train_config(None, {"encoder": "x", "train": "t.jsonl", "out": "o", "threads": 0})


def test_threads_flag_is_checked(capsys):
    from speechtl.cli.app import main

    with pytest.raises(SystemExit):
        main(["transcribe", "m", "a.wav", "--threads", "0"])
    assert "--threads: must be at least 1" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_taskset_one_cpu_runs_one_thread_and_no_workers():
    code = ("import torch\n"
            "torch.set_num_threads(4)\n"  # a pool sized as for the whole host
            "from speechtl.core.cpus import apply_budget, cap_workers\n"
            "from speechtl.core.threads import cpu_streams\n"
            "from speechtl.data.loader import decode_workers\n"
            "print(apply_budget(), torch.get_num_threads(), cap_workers(8), decode_workers('cpu', [100.0] * 500), "
            "cpu_streams('cpu'))\n")
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1", "1", "0", "1"]


class _Clock:
    """Simulated seconds: a block "takes" twice as long on ``slow_on`` threads as on the other count."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, slow_on: int) -> None:
        self.now += 0.02 if torch.get_num_threads() == slow_on else 0.01


def test_tuner_picks_the_faster_thread_count_and_follows_a_change(restore_threads):
    torch.set_num_threads(1)
    clock = _Clock()
    tuner = ThreadTuner(2, explore_every=4, explore_max=8, clock=clock)
    _work = clock.work
    slow = 2  # a busy machine: two threads stall
    used = []
    for _ in range(12):
        with tuner.run(1.0) as n:
            used.append(n)
            _work(slow)
        assert torch.get_num_threads() == 1  # the caller's count comes back
    assert tuner.choice == 1 and used[-3:] == [1, 1, 1]
    slow = 1  # the other job ended: two threads win again
    for _ in range(40):
        with tuner.run(1.0) as n:
            used.append(n)
            _work(slow)
    assert tuner.choice == 2 and used[-3:] == [2, 2, 2]
    assert used.count(1) < 25  # mostly on the faster count


def test_tuner_with_one_thread_or_told_not_to_tune_only_runs(restore_threads):
    for threads, tune in ((1, True), (2, False)):
        clock = _Clock()
        tuner = ThreadTuner(threads, tune=tune, clock=clock)
        for _ in range(10):
            with tuner.run(1.0) as n:
                assert n == threads == torch.get_num_threads()
                clock.work(slow_on=threads)


def test_tuner_beside_busy_processes_never_risks_all_threads(restore_threads):
    torch.set_num_threads(1)
    clock = _Clock()
    busy = [1.0]  # one other process holds one of the two CPUs
    tuner = ThreadTuner(2, explore_every=4, explore_max=8, clock=clock, others=lambda: busy[0], cpus=2)
    used = []
    for _ in range(30):
        with tuner.run(1.0) as n:
            used.append(n)
            clock.work(slow_on=2)
    assert set(used) == {1} and tuner.postponed >= 2  # tries of two threads were put off, none made
    busy[0] = 0.1  # the other process ended: two threads are tried, and win
    for _ in range(30):
        with tuner.run(1.0) as n:
            used.append(n)
            clock.work(slow_on=1)
    assert tuner.choice == 2 and used[-3:] == [2, 2, 2]
    # nothing known about others (no /proc/stat): the measured probe decides, as before
    tuner = ThreadTuner(2, clock=clock, others=lambda: None, cpus=2)
    probe = []
    for _ in range(3):
        with tuner.run(1.0) as n:
            probe.append(n)
            clock.work(slow_on=1)
    assert probe == [1, 1, 2] and tuner.choice == 2


def test_others_meter_subtracts_this_process(tmp_path):
    import os

    from speechtl.core.cpus import OthersMeter

    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    now, own = [0.0], [0.0]

    def write(busy_s, idle_s):  # user nice system idle iowait irq softirq steal
        stat.write_text(f"cpu  {int(busy_s * hz)} 0 0 {int(idle_s * hz)} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")

    write(100, 1000)
    meter = OthersMeter(stat, min_window=0.25, clock=lambda: now[0], own=lambda: own[0])
    now[0], own[0] = 2.0, 1.0  # 2 s on 2 CPUs: 3 busy CPU-seconds, 1 of them ours
    write(103, 1001)
    assert meter.read() == pytest.approx(1.0)
    now[0] += 0.1  # too short a window: the last figure stands
    write(200, 1001)
    assert meter.read() == pytest.approx(1.0)
    assert OthersMeter(tmp_path / "missing").read() is None


def test_trim_heap_returns_memory_on_glibc():
    import platform

    from speechtl.core.memory import trim_heap

    done = trim_heap()
    assert isinstance(done, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert done
