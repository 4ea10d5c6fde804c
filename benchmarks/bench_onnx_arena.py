#!/usr/bin/env python3
"""onnxruntime's memory arena on and off (``OnnxRecognizer(DIR, arena=...)``), each in its
own fresh process, taking turns (ABAB...). Each process transcribes the test files greedily
as ``speechtl transcribe`` does (short files on side-by-side one-thread streams) once to
warm up, then ``--rounds`` more times, and reports its best round; the parent prints all
of them and checks that both settings give the same frame log-probabilities. Fresh
processes matter: how the C library hands memory back depends on what the process did
before, so two settings in one process measure each other's history.

    .venv/bin/python benchmarks/bench_onnx_arena.py exp/onnx-gen1b/int8 exp/demo/test/manifest.jsonl \\
        --json benchmarks/results/onnx_arena.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def one(folder: str, manifest: str, arena: bool, rounds: int, out: str) -> None:
    from speechtl.data.audio import load_audio
    from speechtl.data.manifest import read_manifest
    from speechtl.decoding.options import DecodeOptions
    from speechtl.inference.onnx import OnnxRecognizer

    files = [u.audio for u in read_manifest(manifest)]
    rec = OnnxRecognizer(folder, arena=arena)
    first = [rec.model.log_probs([load_audio(f)])[0] for f in files]
    greedy = DecodeOptions()
    rec.transcribe(files, options=greedy)  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        rec.transcribe(files, options=greedy)
        times.append(round(time.perf_counter() - t, 3))
    np.savez(out, *first)
    print(json.dumps({"best_s": min(times), "rounds_s": times}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="an exported ONNX folder")
    ap.add_argument("manifest", help="test manifest")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds in each process")
    ap.add_argument("--processes", type=int, default=3, help="fresh processes for each setting")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--one", choices=("arena", "no-arena"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.folder, args.manifest, args.one == "arena", args.rounds, args.out)
        return 0
    res: dict[str, list] = {"arena": [], "no-arena": []}
    with tempfile.TemporaryDirectory() as tmp:
        for p in range(args.processes):
            for name in (("arena", "no-arena") if p % 2 == 0 else ("no-arena", "arena")):
                out = str(Path(tmp) / f"{name}.npz")
                line = subprocess.run([sys.executable, __file__, args.folder, args.manifest, "--one", name, "--out", out,
                                       "--rounds", str(args.rounds)], check=True, capture_output=True, text=True).stdout
                res[name].append(json.loads(line.strip().splitlines()[-1]))
        a, b = np.load(str(Path(tmp) / "arena.npz")), np.load(str(Path(tmp) / "no-arena.npz"))
        worst = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
    best = {name: min(r["best_s"] for r in runs) for name, runs in res.items()}
    summary = {"folder": args.folder, "processes": res, "best_s": best,
               "no_arena_over_arena": round(best["no-arena"] / best["arena"], 2), "largest_log_prob_difference": worst}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
