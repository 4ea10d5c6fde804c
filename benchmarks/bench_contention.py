#!/usr/bin/env python3
"""Four speechtl jobs on a shared CPU: alone, beside one busy process, and two at once.

Jobs (small, on the bundled default encoder and a few minutes of espeak-ng speech):

- ``frozen``: a BiLSTM head (the config's default size) trained from an on-disk feature cache;
- ``finetune``: full fine-tuning steps from audio;
- ``extract``: features of every clip into a new cache, three times over;
- ``transcribe``: a frozen model transcribing the clips.

Conditions:

- ``idle``: the job alone;
- ``busy``: beside one process spinning in a pure-Python loop;
- ``pair``: two copies of the job at once (the slower one's time counts).

Each job runs in a fresh process that loads what it needs, waits for the others to be
ready, and then times its work alone (loading is not timed). ``--baseline DIR`` runs every
measurement with a second copy of speechtl too (``PYTHONPATH=DIR``, e.g. a checkout of an
earlier commit), side by side, so that the idle speed of both is measured in one run.
Before each measurement the benchmark waits (up to ``--settle`` seconds) until other
processes use less than ``--max-other`` of a CPU, and records what they used.

    python benchmarks/bench_contention.py [--baseline /path/to/old/checkout] [--rounds 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
JOBS = ("frozen", "finetune", "extract", "transcribe")
CONDITIONS = ("idle", "busy", "pair")
EXTRACT_PASSES = 3


# ---------------------------------------------------------------- the jobs, in a child process

def _wait_for_go(go: Path, me: str) -> None:
    (go.parent / f"ready.{me}").touch()
    while not go.exists():
        time.sleep(0.005)


def _train_cfg(work: Path, out: Path, **kw):
    from speechtl.training.config import load_train_config

    base = dict(encoder="default", train=str(work / "speech" / "manifest.jsonl"), out=str(out), num_workers=0,
                seed=0, device="cpu")
    base.update(kw)
    base["eval_every"] = base["max_steps"]
    return load_train_config(None, base)


def run_job(job: str, work: Path, out: Path, go: Path, me: str, steps: int) -> float:
    """Seconds the job's work takes, after loading and after ``go`` appears."""
    if job in ("frozen", "finetune"):
        from speechtl.training.train import train

        if job == "frozen":
            cfg = _train_cfg(work, out, mode="frozen", head="bilstm", feature_cache=str(work / "cache"), max_steps=steps,
                             max_batch_seconds=30.0, lr=1e-3)
        else:
            cfg = _train_cfg(work, out, mode="finetune", max_steps=max(2, steps // 6), max_batch_seconds=10.0)
        _wait_for_go(go, me)
        return float(train(cfg, progress=False)["wall_time_s"])  # the loop alone
    from speechtl.data.manifest import read_manifest

    utts = read_manifest(work / "speech" / "manifest.jsonl")
    if job == "extract":
        from speechtl.encoders.registry import load_encoder
        from speechtl.features.extract import extract_to_cache

        encoder = load_encoder("default", inference=True)
        _wait_for_go(go, me)
        t0 = time.perf_counter()
        for n in range(EXTRACT_PASSES):  # each pass into a new cache: long enough to time
            extract_to_cache(encoder, utts, out / str(n), progress=False)
        return time.perf_counter() - t0
    from speechtl.inference.recognizer import Recognizer

    rec = Recognizer.load(work / "model" / "model", device="cpu")
    paths = [u.audio for u in utts]
    _wait_for_go(go, me)
    t0 = time.perf_counter()
    rec.transcribe(paths)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- the parent

def other_cpu_use(seconds: float = 1.0) -> float:
    """CPUs kept busy by all processes over ``seconds`` (from /proc/stat); the parent idles meanwhile."""
    def snap():
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = f[3] + f[4]
        return sum(f[:8]), idle
    t1, i1 = snap()
    time.sleep(seconds)
    t2, i2 = snap()
    cpus = os.cpu_count() or 1
    return cpus * (1 - (i2 - i1) / max(t2 - t1, 1))


def settle(max_other: float, limit_s: float) -> float:
    """Wait until other processes use less than ``max_other`` CPUs (at most ``limit_s``); what they used."""
    t0 = time.monotonic()
    use = other_cpu_use()
    while use > max_other and time.monotonic() - t0 < limit_s:
        use = other_cpu_use()
    return use


def child(job: str, work: Path, code: str, tag: str, steps: int, go: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": code}
    out = work / "out" / tag
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", job, "--work", str(work), "--out", str(out),
           "--go", str(go), "--me", tag, "--steps", str(steps)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def measure(job: str, condition: str, code: str, work: Path, steps: int) -> list[float]:
    """Seconds of each copy of ``job`` (two in ``pair``) under ``condition``, run by the speechtl at ``code``."""
    run_dir = Path(tempfile.mkdtemp(dir=work / "runs"))
    go = run_dir / "go"
    copies = 2 if condition == "pair" else 1
    procs = [child(job, work, code, f"{run_dir.name}-{k}", steps, go) for k in range(copies)]
    spinner = None
    try:
        while len(list(run_dir.glob("ready.*"))) < copies:
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.01)
        if condition == "busy":
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.3)  # let it reach the loop
        go.touch()
        seconds = []
        for p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"{job} ({code}) failed:\n{err[-3000:]}")
            seconds.append(json.loads(out.strip().splitlines()[-1])["seconds"])
        return seconds
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
        for p in procs:
            if p.poll() is None:
                p.kill()


def prepare(work: Path, minutes: float, steps: int) -> None:
    """Speech, its feature cache (for ``frozen``) and a small frozen model (for ``transcribe``)."""
    from speechtl.data.corpora.synth import SynthConfig, synthesize
    from speechtl.encoders.registry import load_encoder
    from speechtl.features.extract import extract_to_cache
    from speechtl.training.train import train

    synthesize(SynthConfig(lang="cs", minutes=minutes, out_dir=str(work / "speech"), seed=3), progress=False)
    from speechtl.data.manifest import read_manifest

    extract_to_cache(load_encoder("default", inference=True), read_manifest(work / "speech" / "manifest.jsonl"),
                     work / "cache", progress=False)
    train(_train_cfg(work, work / "model", mode="frozen", head="bilstm", feature_cache=str(work / "cache"), max_steps=5,
                     lm="none"),  # greedy: the code before words-by-default reads no LM, and threads are what is timed
          progress=False)
    (work / "runs").mkdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="a second speechtl checkout, measured side by side")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--conditions", default=",".join(CONDITIONS), help="idle must be among them (the ratios' base)")
    ap.add_argument("--rounds", type=int, default=1, help="measurements of each job, condition and code (best kept)")
    ap.add_argument("--minutes", type=float, default=2.0, help="speech to synthesise")
    ap.add_argument("--steps", type=int, default=30, help="frozen-head updates (finetune runs a sixth as many)")
    ap.add_argument("--max-other", type=float, default=0.3, help="CPUs others may use before a measurement")
    ap.add_argument("--settle", type=float, default=60.0, help="seconds to wait for them at most")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", choices=JOBS, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--go", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--me", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        seconds = run_job(args.child, args.work, args.out, args.go, args.me, args.steps)
        print(json.dumps({"seconds": seconds}))
        return

    codes = {"new": str(HERE.parent)}
    if args.baseline:
        codes["baseline"] = str(args.baseline.resolve())
    jobs = [j for j in args.jobs.split(",") if j]
    conditions = [c for c in CONDITIONS if c in args.conditions.split(",")]
    if "idle" not in conditions:
        ap.error("--conditions must include idle")
    sys.path.insert(0, str(HERE))
    from machine import cpu_label

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.minutes, args.steps)
        for r in range(args.rounds):
            for job in jobs:
                for condition in conditions:
                    for name, code in codes.items():
                        other = settle(args.max_other, args.settle)
                        load = os.getloadavg()[0]
                        seconds = measure(job, condition, code, work, args.steps)
                        entry = results.setdefault(name, {}).setdefault(job, {}).setdefault(condition, [])
                        entry.append({"seconds": [round(s, 3) for s in seconds], "other_cpus_before": round(other, 2),
                                      "loadavg_1min": round(load, 2)})
                        print(f"round {r + 1} {name:8s} {job:10s} {condition:5s} "
                              f"{' + '.join(f'{s:.2f}' for s in seconds)} s  (others used {other:.2f} CPU before; "
                              f"load {load:.2f})", flush=True)

    def best(name, job, condition):  # a pair counts as its slower copy
        runs = results[name][job].get(condition)
        return min(max(m["seconds"]) for m in runs) if runs else float("nan")

    print(f"\nCPU: {cpu_label()}, {os.cpu_count()} CPUs; best of {args.rounds} round(s); seconds of the timed work")
    head = "| code | job | idle s | busy s | pair s | busy / idle | pair / idle |"
    print(head + "\n|" + "---|" * 7)
    table = {}
    for name in codes:
        for job in jobs:
            i, b, p = (best(name, job, c) for c in CONDITIONS)
            table.setdefault(name, {})[job] = {"idle": i, "busy": b, "pair": p, "busy_ratio": round(b / i, 2),
                                               "pair_ratio": round(p / i, 2)}
            print(f"| {name} | {job} | {i:.2f} | {b:.2f} | {p:.2f} | {b / i:.2f}x | {p / i:.2f}x |")
    if "baseline" in codes:
        print("\nidle, new / baseline time (below 1: new is faster):")
        for job in jobs:
            print(f"  {job:10s} {table['new'][job]['idle'] / table['baseline'][job]['idle']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_label(), "args": vars(args), "runs": results, "table": table},
                                        indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
