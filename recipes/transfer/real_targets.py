#!/usr/bin/env python
"""Split one speaker's real recordings (``recipes/pretrain/real_speech.py``'s manifest) into a
transfer target: a test set, a labelled training set of a given length, and the rest as
unlabelled audio (its texts kept aside in ``unlabelled_texts.jsonl``, for scoring pseudo-labels only).

Clips with the same text always fall in the same split, so no test sentence is heard in
training. The split is drawn with ``--seed`` and written as JSONL manifests under ``--out``:
``test.jsonl``, ``train_{M}min.jsonl`` for each ``--minutes``, ``unlabelled.jsonl``.
"""

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="real_speech.py's manifest.jsonl")
    p.add_argument("--speaker", required=True, help="the source to split, e.g. tuxpaint-ro or asterisk-ru")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--test-clips", type=int, default=150)
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 10], help="labelled training sets, nested")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="longer clips are left out (Whisper's window; zero-shot scoring and mode=seq2seq take clips)")
    args = p.parse_args()
    base = Path(args.manifest).resolve().parent
    rows = [json.loads(line) for line in open(args.manifest, encoding="utf-8") if line.strip()]
    rows = [r for r in rows if r.get("speaker") == args.speaker]
    long = [r for r in rows if r["duration"] > args.max_seconds]
    if long:
        print(f"{args.speaker}: {len(long)} clip(s) over {args.max_seconds:g} s left out (first: {long[0]['id']})")
        rows = [r for r in rows if r["duration"] <= args.max_seconds]
    if not rows:
        raise SystemExit(f"real_targets: no clips of speaker {args.speaker!r} in {args.manifest}")
    for r in rows:
        r["audio"] = str((base / r["audio"]).resolve())
        r["lang"] = r.get("lang_code", r.get("lang"))
    groups = defaultdict(list)
    for r in rows:
        groups[r["text"].strip().lower()].append(r)
    keys = sorted(groups)
    random.Random(args.seed).shuffle(keys)
    test, rest = [], []
    for k in keys:
        (test if len(test) < args.test_clips else rest).extend(groups[k])
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / "test.jsonl", test)
    used, start = 0.0, 0
    for minutes in sorted(args.minutes):
        while start < len(rest) and used + rest[start]["duration"] <= minutes * 60:
            used += rest[start]["duration"]
            start += 1
        write(args.out / f"train_{minutes:g}min.jsonl", rest[:start])
    unlabelled = rest[start:]
    write(args.out / "unlabelled_texts.jsonl", unlabelled)
    write(args.out / "unlabelled.jsonl", [{k: v for k, v in r.items() if k != "text"} for r in unlabelled])
    print(f"{args.speaker}: test {len(test)} clips ({sum(r['duration'] for r in test) / 60:.1f} min), "
          f"train {start} clips ({used / 60:.1f} min), unlabelled {len(unlabelled)} clips "
          f"({sum(r['duration'] for r in unlabelled) / 60:.1f} min) in {args.out}")


def write(path: Path, rows: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
