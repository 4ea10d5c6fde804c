#!/usr/bin/env python3
"""The Python steps of recipes/librilight/run.sh (the code is in speechtl.corpora and
speechtl.recipe_steps).

  fetch    the Libri-light fine-tuning sets, the LibriSpeech dev/test sets and the LM in place
  prepare  manifests of a Libri-light subset and the four LibriSpeech evaluation sets
  lm       LibriSpeech's 4-gram LM cased for the model, or an n-gram LM of the training text
  score    WER/CER of a model on several manifests, greedy and with an LM
  report   the results table, beside the wav2vec 2.0 paper's figures
"""

from __future__ import annotations

import argparse
import logging
import sys

from speechtl import archives, corpora, recipe_steps
from speechtl.audio import AudioError

EVAL_SETS = corpora.LIBRISPEECH_EVAL
# Baevski et al. (2020), "wav2vec 2.0", Table 1: WER (%) of wav2vec 2.0 BASE (pretrained on
# the LibriSpeech audio, LS-960) fine-tuned on each Libri-light subset and decoded with the
# official LibriSpeech 4-gram LM
PUBLISHED = {
    "10min": {"dev-clean": 8.9, "dev-other": 15.7, "test-clean": 9.1, "test-other": 15.6},
    "1h": {"dev-clean": 5.0, "dev-other": 10.8, "test-clean": 5.5, "test-other": 11.3},
    "10h": {"dev-clean": 3.8, "dev-other": 9.1, "test-clean": 4.3, "test-other": 9.5},
}
PUBLISHED_NOTE = ("Published: wav2vec 2.0 BASE (pretrained on LibriSpeech's 960 h of audio, `facebook/wav2vec2-base`) "
                  "fine-tuned on the same subset, beam search with LibriSpeech's 4-gram LM (Baevski et al., 2020, "
                  "Table 1). They compare with this recipe's beam + LM rows when it runs that encoder with --lm "
                  "librispeech.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("fetch", help="check the archives are in place; download (optionally) and extract them")
    s.add_argument("--data", required=True)
    s.add_argument("--download", action="store_true", help="download what is missing")
    s.add_argument("--mirror", help="download from MIRROR/NAME instead of the publishers' addresses")
    s.add_argument("--checksums", help="md5 or sha256 sums to check the archives against (HASH  NAME per line)")
    s.add_argument("--with-lm", action="store_true", help="also LibriSpeech's 4-gram LM (4-gram.arpa.gz)")
    s = sub.add_parser("prepare", help="manifests of a subset and the evaluation sets")
    s.add_argument("--data", required=True)
    s.add_argument("--subset", required=True, help="10min, 1h or 10h")
    s.add_argument("--fold", type=int, default=0, help="which 10-minute fold of 1h/ is the 10min subset (0-5)")
    s.add_argument("--out", required=True)
    s = sub.add_parser("lm", help="an LM for the model")
    s.add_argument("--model", required=True)
    s.add_argument("--text", help="training manifest: build an n-gram LM of its text")
    s.add_argument("--arpa", help="an ARPA LM (.arpa or .arpa.gz) to case for the model")
    s.add_argument("--order", type=int, default=4)
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
    s.add_argument("--subset", required=True)
    for s in sub.choices.values():
        s.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        if args.step == "fetch":
            notes = archives.fetch_archives(args.data, corpora.librilight_archives(args.with_lm), args.download,
                                           args.mirror, args.checksums)
            print("\n".join(notes) if notes else "every file is in place")
        elif args.step == "prepare":
            splits = corpora.prepare_librilight(args.data, args.subset, args.fold)
            corpora.write_normalizer(args.out, "en")
            corpora.write_splits(args.out, splits, {"corpus": "librilight", "lang": "en", "subset": args.subset,
                                                    "fold": args.fold, "source": args.data})
        elif args.step == "lm":
            recipe_steps.build_lm(args.out, args.model, text=args.text, arpa=args.arpa, order=args.order)
        elif args.step == "score":
            recipe_steps.score_sets(args.model, dict(s.split("=", 1) for s in args.set), args.out, lm=args.lm,
                               tune_on=args.tune_on, alpha=args.alpha, beta=args.beta, beam_width=args.beam_width)
        else:
            published = PUBLISHED.get(args.subset, {})
            print(recipe_steps.report(args.run, args.data, EVAL_SETS, f"Libri-light {args.subset}",
                                 {(name, "lm"): wer for name, wer in published.items()}, PUBLISHED_NOTE))
    except (ValueError, OSError, AudioError) as e:
        print(f"librilight {args.step}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
