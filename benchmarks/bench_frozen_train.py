#!/usr/bin/env python3
"""Frozen-head training speed: reading an on-disk feature cache against recomputing the
encoder every step, side by side in one run (same data, head, batches and seed).

Steps per second are timed over the training loop only (``wall_time_s`` in
``train_summary.json``); the one-off extraction into the cache is reported separately.

    .venv/bin/python benchmarks/bench_frozen_train.py
    .venv/bin/python benchmarks/bench_frozen_train.py --encoder path/to/hf_encoder --minutes 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="default")
    ap.add_argument("--minutes", type=float, default=3.0, help="training speech to synthesise")
    ap.add_argument("--lang", default="cs")
    ap.add_argument("--head", default="bilstm", choices=["bilstm", "linear"])
    ap.add_argument("--batch-seconds", type=float, default=10.0)
    ap.add_argument("--steps-recompute", type=int, default=30)
    ap.add_argument("--steps-cached", type=int, default=300)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from speechtl.data.corpora.synth import SynthConfig, synthesize
    from speechtl.training.config import load_train_config
    from speechtl.training.train import train

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        synthesize(SynthConfig(lang=args.lang, minutes=args.minutes, out_dir=str(work / "speech"), seed=3), progress=False)
        base = dict(encoder=args.encoder, train=str(work / "speech" / "manifest.jsonl"), mode="frozen", head=args.head,
                    bilstm_hidden=128, bilstm_layers=1, max_batch_seconds=args.batch_seconds, num_workers=0,
                    device=args.device, seed=0, lr=5e-3, lm="none", dev_fraction=0)  # the loop alone
        runs = {
            "recompute": dict(cache_features=False, max_steps=args.steps_recompute),
            "cache": dict(feature_cache=str(work / "cache"), max_steps=args.steps_cached),
        }
        res = {}
        for name, kw in runs.items():
            t0 = time.perf_counter()
            s = train(load_train_config(None, {**base, **kw, "out": str(work / name), "eval_every": kw["max_steps"]}),
                      progress=False)
            total = time.perf_counter() - t0
            res[name] = {"steps": s["steps"], "loop_s": s["wall_time_s"], "steps_per_s": s["steps"] / s["wall_time_s"],
                         "total_s": round(total, 1)}
        ratio = res["cache"]["steps_per_s"] / res["recompute"]["steps_per_s"]
        print(f"{args.minutes:g} min of speech, {args.head} head, batches <= {args.batch_seconds:g} s, encoder {args.encoder}")
        for name, r in res.items():
            print(f"  {name:10s} {r['steps']:5d} steps in {r['loop_s']:7.1f} s: {r['steps_per_s']:7.2f} steps/s "
                  f"(whole run incl. set-up and extraction {r['total_s']} s)")
        print(f"  cache / recompute: {ratio:.1f}x steps per second")
        if args.json:
            args.json.write_text(json.dumps({"runs": res, "ratio": round(ratio, 2), "args": vars(args)}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
