#!/usr/bin/env python
"""Padding overhead of the duration-bucketed sampler against random batching.

Padding overhead = padded seconds that are padding / all padded batch seconds.
Durations come from a manifest (--manifest) or a seeded uniform 1-15 s draw.
"""

import argparse
import random

from speechtl.data.loader import DynamicBucketSampler, padding_overhead, random_batches
from speechtl.data.manifest import read_manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", help="take clip durations from this manifest")
    p.add_argument("--clips", type=int, default=2000, help="clips to draw when no manifest is given")
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--max-seconds", type=float, default=15.0)
    p.add_argument("--batch-seconds", type=float, nargs="+", default=[60.0, 120.0, 240.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    args = p.parse_args()
    if args.manifest:
        durations = [u.duration for u in read_manifest(args.manifest, check_files=False)]
    else:
        rng = random.Random(args.seed)
        durations = [rng.uniform(args.min_seconds, args.max_seconds) for _ in range(args.clips)]
    print(f"{len(durations)} clips, {sum(durations) / 3600:.2f} h, {min(durations):.1f}-{max(durations):.1f} s")
    print(f"{'max batch s':>12s} {'bucketed':>9s} {'random':>9s} {'batches (bucketed/random)':>26s}")
    for cap in args.batch_seconds:
        s = DynamicBucketSampler(durations, cap, shuffle=True, seed=args.seed, world_size=args.world_size)
        rb = random_batches(durations, cap, seed=args.seed)
        print(f"{cap:12.0f} {s.padding_overhead():9.1%} {padding_overhead(rb, durations):9.1%} {len(s._all_batches()):>13d}/{len(rb)}")


if __name__ == "__main__":
    main()
