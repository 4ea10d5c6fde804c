#!/usr/bin/env python3
"""Do the bad-input checks slow ``extract`` and ``transcribe``? Two source trees, side by side
in one run: the same whole commands, in fresh processes, taking turns over ``--rounds``
rounds; each tree keeps its best round.

The checks in question: every clip's header is read before a job (as before), now with its
length compared against the manifest, and float WAVs (the only files that can hold NaN) are
scanned for non-finite samples; feature-cache keys hash the audio content without its path;
``transcribe --out`` checks its output names before loading the model. The corpus mixes
16-bit WAVs with float WAVs (``--float-share``) so that the scan is paid where it applies.

    git archive BASE speechtl | tar -x -C /tmp/before     # the tree before the change
    .venv/bin/python benchmarks/bench_checks.py --before /tmp/before --after . \\
        --json benchmarks/results/checks_cpu.json

Needs only the bundled encoder; the transcription model is that encoder with a random CTC
head (speed does not depend on the head's weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(root: Path, clips: int, float_share: float, seed: int = 0) -> Path:
    import numpy as np
    import soundfile as sf

    sys.path.insert(0, str(ROOT))
    from speechtl.data.manifest import Utterance, write_manifest

    rng = np.random.default_rng(seed)
    utts = []
    n_float = int(round(clips * float_share))
    for i in range(clips):
        seconds = float(rng.uniform(2.0, 8.0))
        t = np.arange(int(seconds * 16000)) / 16000
        x = (0.2 * np.sin(2 * np.pi * (150 + 20 * i) * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
        path = root / "wav" / f"c{i:03d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), x, 16000, subtype="FLOAT" if i < n_float else "PCM_16")
        utts.append(Utterance(f"c{i:03d}", str(path), "ab ba", round(x.size / 16000, 4)))
    return write_manifest(root / "m.jsonl", utts)


def make_model(root: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from speechtl.data.text import Normalizer, Vocabulary
    from speechtl.models.ctc import HeadConfig, build_model
    from speechtl.models.model_dir import save_model_dir

    vocab = Vocabulary.build(["ab ba cab abc"])
    model = build_model("default", "frozen", len(vocab), HeadConfig(kind="linear")).eval()
    save_model_dir(model, vocab, Normalizer(), root / "model")
    return root / "model"


def timed(tree: Path, argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "speechtl", *argv], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{tree}: speechtl {' '.join(argv)} failed:\n{p.stderr[-2000:]}")
    return elapsed


def header_checks(trees: dict[str, Path], manifest: Path, repeats: int) -> dict:
    """The per-file part of the checks alone, in one process: each tree's ``check_readable``
    (its ``data/audio.py``, loaded as a module of its own) over the corpus, taking turns,
    best of ``repeats``. This is what ``extract``, ``train`` and ``evaluate`` run before a job."""
    import importlib.util

    from speechtl.data.manifest import read_manifest

    utts = read_manifest(manifest)
    mods = {}
    for name, tree in trees.items():
        spec = importlib.util.spec_from_file_location(f"audio_{name}", tree / "speechtl" / "data" / "audio.py")
        mods[name] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(mods[name])
    best = {name: float("inf") for name in trees}
    for r in range(repeats):
        for name in (trees if r % 2 == 0 else reversed(list(trees))):
            t0 = time.perf_counter()
            good, bad = mods[name].check_readable(utts)
            best[name] = min(best[name], time.perf_counter() - t0)
            assert len(good) == len(utts) and not bad
    return {"clips": len(utts), "before_ms": round(best["before"] * 1e3, 2), "after_ms": round(best["after"] * 1e3, 2),
            "after_over_before": round(best["after"] / best["before"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, type=Path, help="source tree without the checks (holds speechtl/)")
    ap.add_argument("--after", required=True, type=Path, help="source tree with them")
    ap.add_argument("--clips", type=int, default=60)
    ap.add_argument("--float-share", type=float, default=0.25, help="share of the clips written as float WAVs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--header-repeats", type=int, default=20, help="turns of the in-process check_readable timing")
    ap.add_argument("--commands", action=argparse.BooleanOptionalAction, default=True,
                    help="time the whole commands too (--no-commands: the in-process check only)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-checks-"))
    try:
        manifest = make_corpus(work / "corpus", args.clips, args.float_share)
        model = make_model(work)
        audio_s = sum(json.loads(line)["duration"] for line in manifest.read_text().splitlines())
        trees = {"before": args.before.resolve(), "after": args.after.resolve()}
        headers = header_checks(trees, manifest, args.header_repeats)
        print(f"check_readable over {headers['clips']} clips: before {headers['before_ms']:.1f} ms, after "
              f"{headers['after_ms']:.1f} ms ({headers['after_over_before']:.2f}x)", flush=True)
        best: dict[str, dict[str, float]] = {name: {} for name in trees}
        times: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
        for r in range(args.rounds if args.commands else 0):
            for name, tree in (trees.items() if r % 2 == 0 else reversed(list(trees.items()))):
                cache = work / f"cache-{name}-{r}"
                jobs = {"extract": ["extract", "--encoder", "default", "--manifest", str(manifest), "--out", str(cache), "-q"],
                        "transcribe": ["transcribe", str(model), str(manifest), "--out", str(work / f"tr-{name}-{r}"),
                                       "--format", "json", "-q"]}
                for job, argv in jobs.items():
                    s = timed(tree, argv)
                    best[name][job] = min(best[name].get(job, float("inf")), s)
                    times[name].setdefault(job, []).append(s)
                    print(f"round {r + 1} {name:6s} {job:10s} {s:6.2f} s", flush=True)
        # the load on a shared machine drifts over minutes: the ratio of the two runs of one round, which
        # ran back to back (the order alternating between rounds), is steadier than a ratio of bests
        paired = {job: sorted(a / b for a, b in zip(times["after"][job], times["before"][job])) for job in best["before"]}
        rows = {} if not args.commands else {job: {"before_s": round(best["before"][job], 3), "after_s": round(best["after"][job], 3),
                      "after_over_before": round(best["after"][job] / best["before"][job], 3),
                      "paired_ratio_median": round(statistics.median(paired[job]), 3),
                      "paired_ratio_range": [round(paired[job][0], 3), round(paired[job][-1], 3)]} for job in best["before"]}
        print(f"\n{args.clips} clips, {audio_s / 60:.1f} min, {args.float_share:.0%} float WAV; best of {args.rounds} "
              f"rounds; load {os.getloadavg()[0]:.1f}")
        print("| command | before, best (s) | after, best (s) | ratio of bests | median ratio within a round (range) |\n"
              "|---|---:|---:|---:|---:|")
        for job, row in rows.items():
            lo, hi = row["paired_ratio_range"]
            print(f"| {job} | {row['before_s']:.2f} | {row['after_s']:.2f} | {row['after_over_before']:.3f} | "
                  f"{row['paired_ratio_median']:.3f} ({lo:.3f}-{hi:.3f}) |")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"check_readable": headers, "times_s": times, "clips": args.clips, "audio_seconds": round(audio_s, 2),
                                             "float_share": args.float_share, "rounds": args.rounds,
                                             "loadavg_end": os.getloadavg(), "results": rows}, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
