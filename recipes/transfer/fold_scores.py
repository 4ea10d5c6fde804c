#!/usr/bin/env python
"""WER and CER of ``hyps.jsonl`` files (``speechtl evaluate --out-dir``, ``speechtl zeroshot
--out-dir``) against a manifest, with speechtl's default normaliser, and again with
diacritics removed from both sides: scores that leave a transcript's accent convention out
(Asterisk's Spanish prompts are transcribed without accents; Whisper writes them).

    python recipes/transfer/fold_scores.py data/t/aes/test.jsonl data/t/aes/zs/hyps.jsonl exp/aes/test/hyps.jsonl
"""

import argparse
import json
import unicodedata

import jiwer

from speechtl.data.manifest import read_manifest
from speechtl.data.text import Normalizer


def fold(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="the test manifest (its texts are the references)")
    p.add_argument("hyps", nargs="+", help="hyps.jsonl files with an id and a hyp per line")
    args = p.parse_args()
    refs = {u.id: u.text for u in read_manifest(args.manifest)}
    norm = Normalizer()
    for path in args.hyps:
        hyps = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                hyps[row["id"]] = row.get("hyp", "")
        pairs = [(norm(refs[i]), norm(hyps.get(i, ""))) for i in sorted(refs)]
        pairs = [(r, h) for r, h in pairs if r.strip()]
        r, h = [a for a, _ in pairs], [b for _, b in pairs]
        rf, hf = [fold(x) for x in r], [fold(x) for x in h]
        print(f"{path}: WER {jiwer.wer(r, h):.4f} CER {jiwer.cer(r, h):.4f} | diacritics folded: "
              f"WER {jiwer.wer(rf, hf):.4f} CER {jiwer.cer(rf, hf):.4f}")


if __name__ == "__main__":
    main()
