#!/usr/bin/env python3
"""int8 with every transformer layer quantised (``--float-layers ''``) against the first
layer kept in float (``--float-layers 0``, the default for Whisper-shaped encoders), side
by side on one model, with a float32 export for reference:

1. quality: greedy CER, CER with ``--lm``, transcripts equal to float32's, and how far
   sherpa-onnx's transcripts of each file are from speechtl's ONNX path;
2. speed in process: the two int8 folders take turns (ABAB...) over the test files, in one
   process, ``--rounds`` each;
3. whole commands: ``speechtl transcribe DIR FIVE_S.wav -q`` in fresh processes, the torch
   model folder and both int8 folders taking turns.

    .venv/bin/python benchmarks/bench_onnx_float_layers.py --model exp/demo-default/frozen/model \\
        --manifest exp/demo-default/test/manifest.jsonl --lm exp/demo-default/frozen/model/lm.arpa \\
        --out exp/onnx-float-layers --json benchmarks/results/onnx_float_layer0_abab.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

EXPORTS = {"fp32": [], "int8_all": ["--quantize", "int8", "--float-layers", ""],
           "int8_fl0": ["--quantize", "int8", "--float-layers", "0"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a torch CTC model folder of a Whisper-shaped encoder")
    ap.add_argument("--manifest", required=True, help="test manifest")
    ap.add_argument("--lm", help="an ARPA LM for the beam-search row")
    ap.add_argument("--out", required=True, help="work folder (the three exports, a 5 s recording)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from bench_onnx import joined_recording, sherpa_hyps, st

    from speechtl.data.manifest import read_manifest
    from speechtl.decoding.metrics import UtteranceResult, score
    from speechtl.decoding.options import DecodeOptions
    from speechtl.inference.onnx import OnnxRecognizer

    utts = read_manifest(args.manifest)
    files = [u.audio for u in utts]
    seconds = sum(u.duration for u in utts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dirs = {name: out / name for name in EXPORTS}
    for name, extra in EXPORTS.items():
        if not dirs[name].exists():
            st("export", args.model, "--format", "onnx", *extra, "--out", str(dirs[name]), "-q")
    recs = {name: OnnxRecognizer.load(d) for name, d in dirs.items()}
    norm = recs["fp32"].normalizer
    greedy = DecodeOptions()
    ref = recs["fp32"].transcribe(files, options=greedy)
    res: dict = {}
    for name, rec in recs.items():
        ours = rec.transcribe(files, options=greedy)
        r = score([UtteranceResult(u.id, u.text, h, u.duration) for u, h in zip(utts, ours)], normalize=norm)
        sherpa = sherpa_hyps(dirs[name], utts)
        vs = score([UtteranceResult(u.id, o, sherpa[u.id], u.duration) for u, o in zip(utts, ours)], normalize=norm)
        row = {"cer": round(r.cer, 4), "same_as_fp32": sum(a == b for a, b in zip(ours, ref)),
               "sherpa_cer_vs_ours": round(vs.cer, 4), "sherpa_same": sum(sherpa[u.id] == o for u, o in zip(utts, ours)),
               "mb": round(next(dirs[name].glob("model*.onnx")).stat().st_size / 1e6, 2)}
        if args.lm:
            lm = rec.transcribe(files, lm=args.lm)
            row["cer_lm"] = round(score([UtteranceResult(u.id, u.text, h, u.duration) for u, h in zip(utts, lm)],
                                        normalize=norm).cer, 4)
        res[name] = row
        print(name, row, flush=True)

    walls: dict[str, list[float]] = {"int8_all": [], "int8_fl0": []}
    for name in walls:
        recs[name].transcribe(files[:2])  # warm up
    for _ in range(args.rounds):
        for name in walls:
            t = time.perf_counter()
            recs[name].transcribe(files)
            walls[name].append(time.perf_counter() - t)
    for name, w in walls.items():
        res[name].update(x_real_time_best=round(seconds / min(w), 1), walls=[round(x, 3) for x in w])
    res["in_process_ratio_all_over_fl0"] = round(min(walls["int8_fl0"]) / min(walls["int8_all"]), 3)

    five = joined_recording(utts, out / "five_s.wav", 5.0)
    commands: dict[str, list[float]] = {"torch": [], "int8_all": [], "int8_fl0": []}
    for _ in range(args.rounds):
        for name in commands:
            folder = args.model if name == "torch" else str(dirs[name])
            commands[name].append(round(st("transcribe", folder, str(five), "-q")[0], 3))
    res["commands_5s"] = commands
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
