#!/usr/bin/env python3
"""Training throughput of 1 process against 2 processes (torchrun, gloo) on the same CPU
cores, side by side in one run.

All take the same updates: one process accumulates 2 micro-batches per update
(``grad_accum=2``), two processes take one each. One process runs once with one thread
(the per-core baseline) and once with one thread per core (the same cores as the two
processes). Throughput is measured on the training
loop's steady state, from ``metrics.csv`` (audio hours and elapsed seconds between the
first logged update and the last), so process start-up, model loading and the final
evaluation are left out. Clips per second follow from the audio rate and the clips per
audio second seen (``utterances_seen`` in ``train_summary.json``).

    .venv/bin/python benchmarks/bench_ddp.py --json benchmarks/results/ddp_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def steady_rate(out: Path) -> tuple[float, float]:
    """(audio seconds per second, clips per second) between the first and last logged update."""
    rows = list(csv.DictReader(open(out / "metrics.csv", encoding="utf-8")))
    first, last = rows[0], rows[-1]
    audio_s = (float(last["audio_hours"]) - float(first["audio_hours"])) * 3600
    wall = float(last["elapsed_s"]) - float(first["elapsed_s"])
    s = json.loads((out / "train_summary.json").read_text())
    clips_per_audio_s = s["utterances_seen"] / (s["audio_hours_seen"] * 3600)
    return audio_s / wall, audio_s / wall * clips_per_audio_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="default")
    ap.add_argument("--mode", default="finetune", choices=["finetune", "scratch", "frozen"])
    ap.add_argument("--minutes", type=float, default=3.0, help="training speech to synthesise")
    ap.add_argument("--lang", default="cs")
    ap.add_argument("--batch-seconds", type=float, default=10.0, help="max padded seconds per micro-batch")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds of both set-ups")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))

    from speechtl.data.corpora.synth import SynthConfig, synthesize

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        synthesize(SynthConfig(lang=args.lang, minutes=args.minutes, out_dir=str(work / "speech"), seed=3), progress=False)
        common = [f"encoder={args.encoder}", f"train={work / 'speech' / 'manifest.jsonl'}", f"mode={args.mode}",
                  f"max_steps={args.steps}", f"eval_every={args.steps}", "log_every=5", f"max_batch_seconds={args.batch_seconds}",
                  "num_workers=0", "device=cpu", "seed=0", "-q"]
        setups = {
            "1 process x 1 thread, grad_accum=2": ([sys.executable, "-m", "speechtl", "train"], ["grad_accum=2"], 1),
            f"1 process x {cores} threads, grad_accum=2": (
                [sys.executable, "-m", "speechtl", "train"], ["grad_accum=2"], cores),
            f"2 processes x {max(cores // 2, 1)} thread(s), grad_accum=1": (
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "speechtl", "train"],
                ["grad_accum=1"], max(cores // 2, 1)),
        }
        runs: dict[str, list[dict]] = {k: [] for k in setups}
        for r in range(args.repeats):
            for name, (cmd, extra, threads) in setups.items():
                out = work / f"run{r}-{len(runs[name])}-{name[0]}"
                env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                p = subprocess.run(cmd + common + extra + [f"out={out}"], env=env, capture_output=True, text=True)
                if p.returncode != 0:
                    sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
                audio_rate, clip_rate = steady_rate(out)
                runs[name].append({"audio_s_per_s": round(audio_rate, 2), "clips_per_s": round(clip_rate, 3)})
                print(f"round {r + 1}: {name:40s} {audio_rate:7.2f} audio-s/s  {clip_rate:6.3f} clips/s", flush=True)
        best = {k: max(v, key=lambda x: x["audio_s_per_s"]) for k, v in runs.items()}
        single, one, two = (best[k]["audio_s_per_s"] for k in setups)
        print(f"\n{args.mode}, encoder {args.encoder}, {args.minutes:g} min of {args.lang} speech, micro-batches <= "
              f"{args.batch_seconds:g} s, {args.steps} updates, {cores} CPU cores; best of {args.repeats}:")
        for k, b in best.items():
            print(f"  {k:40s} {b['audio_s_per_s']:7.2f} audio-s/s  {b['clips_per_s']:6.3f} clips/s")
        print(f"  2 processes / 1 process on the same cores: {two / one:.2f}x; "
              f"2 processes / 1 single-threaded process: {two / single:.2f}x")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "cpu_cores": cores,
                                             "runs": runs, "best": best, "ratio_2_over_1_same_cores": round(two / one, 3),
                                             "ratio_2_over_1_single_thread": round(two / single, 3)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
