#!/usr/bin/env python
"""Merge per-language synth manifests into one phoneme-target manifest.

Each utterance's ``text`` becomes the IPA phonemes espeak-ng spoke (``phonemes`` field
written by ``speechtl synth``), with stress marks removed; the orthographic text is
kept as ``orth``. ``--opus DIR`` also transcodes the audio to Ogg/Opus (about 9x smaller
than 16-bit wav) so the corpus can travel to another machine.
"""

import argparse
import dataclasses
from pathlib import Path

import soundfile as sf

from speechtl.manifest import read_manifest, write_manifest

DROP = str.maketrans("", "", "ˈˌ?")  # primary/secondary stress; '?' = espeak's unrenderable phoneme


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifests", nargs="+", help="synth manifests (with a phonemes field)")
    p.add_argument("--out", required=True, help="merged manifest to write")
    p.add_argument("--opus", help="also write Ogg/Opus copies of the audio under this folder and point the manifest at them")
    args = p.parse_args()
    utts = []
    for m in args.manifests:
        for u in read_manifest(m):
            phon = " ".join(u.extra["phonemes"].translate(DROP).split())
            if not phon:
                continue
            audio = u.audio
            if args.opus:
                dst = Path(args.opus) / f"{u.id}.ogg"
                if not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    wav, sr = sf.read(u.audio, dtype="float32")
                    sf.write(dst, wav, sr, format="OGG", subtype="OPUS")
                audio = str(dst.resolve())
            extra = {k: v for k, v in u.extra.items() if k != "phonemes"}
            utts.append(dataclasses.replace(u, audio=audio, text=phon, extra={**extra, "orth": u.text}))
    write_manifest(args.out, utts)
    hours = sum(u.duration for u in utts) / 3600
    print(f"wrote {len(utts)} utterances ({hours:.2f} h, {len({u.lang for u in utts})} languages) to {args.out}")


if __name__ == "__main__":
    main()
