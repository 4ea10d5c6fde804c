#!/usr/bin/env python3
"""The Python steps of recipes/fleurs/run.sh (the code is in speechtl.data.corpora.public and
speechtl.cli.recipe_steps).

  prepare  manifests of one FLEURS language
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
    s = sub.add_parser("prepare", help="train/dev/test manifests")
    s.add_argument("--data", required=True, help="the FLEURS folder (holding data/LANG/ or LANG/) or the language folder")
    s.add_argument("--lang", required=True, help="FLEURS language code: cs_cz, pt_br, cmn_hans_cn, ... (or cs when one matches)")
    s.add_argument("--out", required=True, help="folder for the manifests and skip reports")
    s.add_argument("--text", default="transcription", choices=["transcription", "raw_transcription"],
                   help="which transcript the manifests carry (default: the normalised one FLEURS is scored on)")
    recipe_steps.add_model_steps(sub, lm_order=3)
    s = sub.add_parser("report", help="print and write the results table")
    s.add_argument("--run", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--title", required=True)
    args = recipe_steps.parse_steps(p, sub, argv)

    def own_steps(args) -> None:
        if args.step == "prepare":
            splits = corpora.prepare_fleurs(args.data, args.lang, text=args.text)
            corpora.write_normalizer(args.out, args.lang)
            code = corpora.find_fleurs(args.data, args.lang).name
            corpora.write_splits(args.out, splits, {"corpus": "fleurs", "lang": code, "source": args.data, "text": args.text})
        else:
            print(recipe_steps.report(args.run, args.data, ("dev", "test"), args.title))

    return recipe_steps.run_step("fleurs", args, own_steps)


if __name__ == "__main__":
    sys.exit(main())
