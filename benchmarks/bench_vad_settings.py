#!/usr/bin/env python
"""How ``--vad-threshold`` and ``--min-silence-s`` cut a recording, measured without a
recogniser: clips joined by pauses of 0.5-6 s (``bench_vad.pause_recording``), white noise
added at several levels, and for each setting the share of speech left outside every piece
(lost to the recogniser), the share of pause kept inside pieces (computed for nothing),
and how many pieces speech is cut into.

Speech is where the clean recording's 32 ms frames have energy within 40 dB of its
loudest; the pauses are the joins.

    python benchmarks/bench_vad_settings.py --clips MANIFEST.jsonl --minutes 6 --json results/vad_settings.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from bench_vad import add_noise, pause_recording

SR = 16000
FRAME = 512


def speech_mask(wav: np.ndarray) -> np.ndarray:
    n = len(wav) // FRAME
    energy = (wav[: n * FRAME].reshape(n, FRAME) ** 2).mean(1)
    return 10 * np.log10(energy + 1e-12) > 10 * np.log10(energy.max() + 1e-12) - 40


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", required=True, help="manifest of the clips the recording is made of")
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--snr-db", default="none,20,10", help="noise levels below the speech ('none': clean)")
    ap.add_argument("--thresholds", default="0.35,0.5,0.65")
    ap.add_argument("--silences", default="0.1,0.3,0.6")
    ap.add_argument("--max-piece-s", type=float, default=29.5)
    ap.add_argument("--json")
    args = ap.parse_args()
    from speechtl.data.manifest import read_manifest
    from speechtl.inference.vad import VadOptions, find_pieces

    tmp = Path(tempfile.mkdtemp(prefix="vad_settings_"))
    clean = tmp / "clean.wav"
    pause_recording(read_manifest(args.clips), args.minutes * 60, clean, seed=1)
    wav0, _ = sf.read(str(clean), dtype="float32")
    speech = speech_mask(wav0)
    rows = []
    print(f"{args.minutes:g} min, speech in {speech.mean():.1%} of the 32 ms frames")
    print(f"{'noise':>6s} {'threshold':>9s} {'min silence':>11s} {'speech lost':>11s} {'pause kept':>10s} {'pieces':>6s}")
    for snr in args.snr_db.split(","):
        path = clean
        if snr != "none":
            path = tmp / f"snr{snr}.wav"
            path.write_bytes(clean.read_bytes())
            add_noise(path, float(snr), seed=2)
        wav, _ = sf.read(str(path), dtype="float32")
        for th in map(float, args.thresholds.split(",")):
            for ms in map(float, args.silences.split(",")):
                pieces = find_pieces(lambda a, n, w=wav: w[a:a + n], len(wav), VadOptions(threshold=th, min_silence_s=ms),
                                     args.max_piece_s)
                kept = np.zeros(len(speech), bool)
                for p in pieces:
                    kept[p.start // FRAME: -(-p.end // FRAME)] = True
                row = {"snr_db": snr, "threshold": th, "min_silence_s": ms,
                       "speech_lost": round(float((speech & ~kept[: len(speech)]).sum() / speech.sum()), 4),
                       "pause_kept": round(float((~speech & kept[: len(speech)]).sum() / (~speech).sum()), 4),
                       "pieces": len(pieces)}
                rows.append(row)
                print(f"{snr:>6s} {th:9.2f} {ms:11.2f} {row['speech_lost']:11.2%} {row['pause_kept']:10.2%} {len(pieces):6d}")
    if args.json:
        Path(args.json).write_text(json.dumps({"minutes": args.minutes, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
