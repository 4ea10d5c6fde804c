#!/usr/bin/env python3
"""The Python steps of recipes/commonvoice/run.sh (the code is in speechtl.corpora and
speechtl.recipe_steps).

  prepare  manifests of one language of a Common Voice release
  lm       an n-gram LM from the training sentences
  score    WER/CER of a model on several manifests, greedy and with an LM
  report   the results table
"""

from __future__ import annotations

import argparse
import logging
import sys

from speechtl import corpora, recipe_steps
from speechtl.audio import AudioError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("prepare", help="train/dev/test manifests, clips decoded to 16 kHz FLAC")
    s.add_argument("--data", required=True, help="the release folder (holding LANG/) or the language folder")
    s.add_argument("--lang", required=True, help="Common Voice language code: cs, pt, zh-CN, ...")
    s.add_argument("--out", required=True, help="folder for the manifests, skip reports and decoded clips")
    s.add_argument("--jobs", type=int, default=1, help="processes decoding clips")
    s.add_argument("--keep-mp3", action="store_true", help="point the manifests at the mp3 clips (decoded at every epoch)")
    s = sub.add_parser("lm", help="an n-gram LM from the training sentences")
    s.add_argument("--model", required=True)
    s.add_argument("--text", required=True, help="training manifest")
    s.add_argument("--order", type=int, default=3)
    s.add_argument("--out", required=True)
    s = sub.add_parser("score", help="score a model on several sets")
    s.add_argument("--model", required=True)
    s.add_argument("--set", action="append", required=True, metavar="NAME=MANIFEST")
    s.add_argument("--out", required=True)
    s.add_argument("--lm", help="also decode with this ARPA LM")
    s.add_argument("--tune-on", help="choose the LM weight and word bonus on this set (a grid search)")
    s.add_argument("--alpha", type=float, default=0.5, help="LM weight, without --tune-on")
    s.add_argument("--beta", type=float, default=1.0, help="word bonus, without --tune-on")
    s.add_argument("--beam-width", type=int, default=32)
    s = sub.add_parser("report", help="print and write the results table")
    s.add_argument("--run", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--title", required=True)
    for s in sub.choices.values():
        s.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        if args.step == "prepare":
            splits = corpora.prepare_commonvoice(args.data, args.lang, None if args.keep_mp3 else f"{args.out}/audio",
                                                 jobs=args.jobs)
            corpora.write_normalizer(args.out, args.lang)
            corpora.write_splits(args.out, splits, {"corpus": "commonvoice", "lang": args.lang, "source": args.data})
        elif args.step == "lm":
            recipe_steps.build_lm(args.out, args.model, text=args.text, order=args.order)
        elif args.step == "score":
            recipe_steps.score_sets(args.model, dict(s.split("=", 1) for s in args.set), args.out, lm=args.lm,
                               tune_on=args.tune_on, alpha=args.alpha, beta=args.beta, beam_width=args.beam_width)
        else:
            print(recipe_steps.report(args.run, args.data, ("dev", "test"), args.title))
    except (ValueError, OSError, AudioError) as e:
        print(f"commonvoice {args.step}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
