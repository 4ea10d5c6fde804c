#!/usr/bin/env python
"""Merge per-language synth manifests into one phoneme-target manifest.

Each utterance's ``text`` becomes the IPA phonemes espeak-ng spoke (``phonemes`` field
written by ``speechtl synth``), with stress marks removed; the orthographic text is
kept as ``orth``. Utterances without a ``phonemes`` field (real recordings) are
phonemised here by espeak-ng in their ``lang`` voice, and clips whose rate of phoneme
symbols per second falls outside ``--min-rate``..``--max-rate`` are dropped: their
recording does not match the text. ``--opus DIR`` also transcodes the audio to Ogg/Opus (about 9x smaller
than 16-bit wav) so the corpus can travel to another machine.
"""

import argparse
import dataclasses
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile as sf

from speechtl.data.manifest import read_manifest, write_manifest

DROP = str.maketrans("", "", "ˈˌ?")  # primary/secondary stress; '?' = espeak's unrenderable phoneme


def espeak_phonemes(text: str, voice: str) -> str:
    proc = subprocess.run(["espeak-ng", "-q", "-b", "1", "--ipa", "-v", voice, "--stdin"], input=text.encode("utf-8"),
                          capture_output=True, timeout=60, check=True)
    return " ".join(proc.stdout.decode("utf-8", "replace").split())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifests", nargs="+", help="synth manifests (with a phonemes field)")
    p.add_argument("--out", required=True, help="merged manifest to write")
    p.add_argument("--opus", help="also write Ogg/Opus copies of the audio under this folder and point the manifest at them")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of each speaker's clips (chosen by a hash of the id) written to --holdout-out instead")
    p.add_argument("--holdout-out", help="manifest for the held-out clips")
    p.add_argument("--min-rate", type=float, default=0.0, help="fewest phoneme symbols per second to keep a clip")
    p.add_argument("--max-rate", type=float, default=1e9, help="most phoneme symbols per second to keep a clip")
    args = p.parse_args()
    todo = [u for m in args.manifests for u in read_manifest(m)]
    with ThreadPoolExecutor(4) as pool:
        spoken = list(pool.map(lambda u: u.extra.get("phonemes") or espeak_phonemes(u.text, u.lang), todo))
    utts, off_rate = [], 0
    for u, said in zip(todo, spoken):
        phon = " ".join(said.translate(DROP).split())
        if not phon:
            continue
        if not args.min_rate <= len(phon.replace(" ", "")) / u.duration <= args.max_rate:
            off_rate += 1
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
    if args.holdout:
        if not args.holdout_out:
            p.error("--holdout needs --holdout-out")
        held = [u for u in utts if zlib.crc32(u.id.encode()) % 1000 < args.holdout * 1000]
        utts = [u for u in utts if zlib.crc32(u.id.encode()) % 1000 >= args.holdout * 1000]
        write_manifest(args.holdout_out, held)
        print(f"held out {len(held)} utterances ({sum(u.duration for u in held) / 3600:.2f} h) in {args.holdout_out}")
    if off_rate:
        print(f"dropped {off_rate} clip(s) whose phoneme rate lies outside {args.min_rate}..{args.max_rate} per second")
    write_manifest(args.out, utts)
    hours = sum(u.duration for u in utts) / 3600
    print(f"wrote {len(utts)} utterances ({hours:.2f} h, {len({u.lang for u in utts})} languages) to {args.out}")


if __name__ == "__main__":
    main()
