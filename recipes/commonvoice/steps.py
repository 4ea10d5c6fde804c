#!/usr/bin/env python3
"""The Python steps of recipes/commonvoice/run.sh (the code is in speechtl.data.corpora.public and
speechtl.cli.recipe_steps).

  prepare  manifests of one language of a Common Voice release
  lm       an n-gram LM from the training sentences
  score    WER/CER of a model on several manifests, greedy and with an LM
  report   the results table
"""

from __future__ import annotations

import argparse
import sys

from speechtl.cli import recipe_steps
from speechtl.data.corpora import public as corpora


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("prepare", help="train/dev/test manifests, clips decoded to 16 kHz FLAC")
    s.add_argument("--data", required=True, help="the release folder (holding LANG/) or the language folder")
    s.add_argument("--lang", required=True, help="Common Voice language code: cs, pt, zh-CN, ...")
    s.add_argument("--out", required=True, help="folder for the manifests, skip reports and decoded clips")
    s.add_argument("--jobs", type=int, default=1, help="processes decoding clips")
    s.add_argument("--keep-mp3", action="store_true", help="point the manifests at the mp3 clips (decoded at every epoch)")
    recipe_steps.add_model_steps(sub, lm_order=3)
    s = sub.add_parser("report", help="print and write the results table")
    s.add_argument("--run", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--title", required=True)
    args = recipe_steps.parse_steps(p, sub, argv)

    def own_steps(args) -> None:
        if args.step == "prepare":
            splits = corpora.prepare_commonvoice(args.data, args.lang, None if args.keep_mp3 else f"{args.out}/audio",
                                                 jobs=args.jobs)
            corpora.write_normalizer(args.out, args.lang)
            corpora.write_splits(args.out, splits, {"corpus": "commonvoice", "lang": args.lang, "source": args.data})
        else:
            print(recipe_steps.report(args.run, args.data, ("dev", "test"), args.title))

    return recipe_steps.run_step("commonvoice", args, own_steps)


if __name__ == "__main__":
    sys.exit(main())
