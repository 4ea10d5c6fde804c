#!/usr/bin/env python3
"""The Python steps of recipes/librilight/run.sh (the code is in speechtl.data.corpora.public and
speechtl.cli.recipe_steps).

  fetch    the Libri-light fine-tuning sets, the LibriSpeech dev/test sets and the LM in place
  prepare  manifests of a Libri-light subset and the four LibriSpeech evaluation sets
  lm       LibriSpeech's 4-gram LM cased for the model, or an n-gram LM of the training text
  score    WER/CER of a model on several manifests, greedy and with an LM
  report   the results table, beside the wav2vec 2.0 paper's figures
"""

from __future__ import annotations

import argparse
import sys

from speechtl.cli import recipe_steps
from speechtl.data.corpora import archives
from speechtl.data.corpora import public as corpora

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
    recipe_steps.add_model_steps(sub, lm_order=4, arpa=True)
    s = sub.add_parser("report", help="print and write the results table")
    s.add_argument("--run", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--subset", required=True)
    args = recipe_steps.parse_steps(p, sub, argv)

    def own_steps(args) -> None:
        if args.step == "fetch":
            notes = archives.fetch_archives(args.data, corpora.librilight_archives(args.with_lm), args.download,
                                           args.mirror, args.checksums)
            print("\n".join(notes) if notes else "every file is in place")
        elif args.step == "prepare":
            splits = corpora.prepare_librilight(args.data, args.subset, args.fold)
            corpora.write_normalizer(args.out, "en")
            corpora.write_splits(args.out, splits, {"corpus": "librilight", "lang": "en", "subset": args.subset,
                                                    "fold": args.fold, "source": args.data})
        else:
            published = PUBLISHED.get(args.subset, {})
            print(recipe_steps.report(args.run, args.data, EVAL_SETS, f"Libri-light {args.subset}",
                                 {(name, "lm"): wer for name, wer in published.items()}, PUBLISHED_NOTE))

    return recipe_steps.run_step("librilight", args, own_steps)


if __name__ == "__main__":
    sys.exit(main())
