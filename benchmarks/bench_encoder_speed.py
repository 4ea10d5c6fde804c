#!/usr/bin/env python3
"""Inference cost of encoders per audio second, measured side by side in one run.

Each encoder runs the same clips (one clip at a time and in sorted batches of
``--batch-seconds``), under ``inference_mode`` as transcription and feature extraction
run it, in rounds that alternate the encoders so that a noisy machine affects them
alike. Prints milliseconds per audio second (the median over rounds) and each encoder's
ratio to the first one.

    .venv/bin/python benchmarks/bench_encoder_speed.py default exp/pretrain/run/model/encoder
    .venv/bin/python benchmarks/bench_encoder_speed.py A B --rounds 7 --json benchmarks/results/encoder_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from speechtl.encoders.registry import load_encoder


def clips(seconds: list[float], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(int(s * 16_000), generator=g) * 0.1 for s in seconds]


def run_once(enc, waves: list[torch.Tensor], batch_seconds: float) -> float:
    """Seconds to encode every clip, in duration-sorted batches of at most ``batch_seconds`` padded."""
    order = sorted(range(len(waves)), key=lambda i: waves[i].numel())
    t0 = time.perf_counter()
    with torch.inference_mode():
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and waves[order[j]].numel() * (j - i + 1) <= batch_seconds * 16_000:
                j += 1
            batch = [waves[k] for k in order[i:j]]
            lengths = torch.tensor([w.numel() for w in batch])
            x = torch.zeros(len(batch), int(lengths.max()))
            for k, w in enumerate(batch):
                x[k, : w.numel()] = w
            enc(x, lengths)
            i = j
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("encoders", nargs="+", help="encoder names or folders (the first is the reference)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-seconds", type=float, default=10.0, help="0 = one clip at a time")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    waves = clips([2.0, 3.5, 5.0, 7.5, 4.0, 6.0, 2.5, 9.0, 3.0, 4.5])  # 47 s, the length mix of a test set
    audio = sum(w.numel() for w in waves) / 16_000
    encs = {name: load_encoder(name).eval() for name in args.encoders}
    for enc in encs.values():  # warm-up
        run_once(enc, waves[:2], args.batch_seconds)
    times = {name: [] for name in encs}
    for _ in range(args.rounds):
        for name, enc in encs.items():
            times[name].append(run_once(enc, waves, args.batch_seconds))
    ref = statistics.median(times[args.encoders[0]])
    rows = []
    for name in encs:
        med = statistics.median(times[name])
        params = sum(p.numel() for p in encs[name].parameters())
        rows.append({"encoder": name, "parameters": params, "ms_per_audio_second": 1000 * med / audio,
                     "ratio_to_first": med / ref, "rounds_s": times[name]})
        print(f"{name:50s} {params / 1e6:6.2f}M  {1000 * med / audio:7.2f} ms per audio second  x{med / ref:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"audio_seconds": audio, "batch_seconds": args.batch_seconds, "threads": torch.get_num_threads(),
                       "cpu": platform.processor() or platform.machine(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
