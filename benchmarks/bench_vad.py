#!/usr/bin/env python3
"""Long recordings cut at pauses (Silero VAD) against fixed overlapping windows, side by side
in one run:

1. defaults: WER and time over a grid of ``--vad-threshold`` x ``--min-silence-s`` on a
   *dev* recording (dev clips joined by 0.5-6 s pauses), so that the defaults are not
   picked on the test recording;
2. speed and quality: a ``--minutes`` recording of test clips joined by 0.5-6 s pauses, with
   a 60 s silence in the middle, transcribed with fixed 30 s windows (``vad=None``) and with
   the VAD (defaults), alternately, ``--runs`` times each (best kept); WER against the
   joined transcripts, and whether any segment spans the long silence;
3. memory: peak resident memory and wall time of ``speechtl transcribe`` (a fresh process
   each, VAD on) on a 1-minute and a ``--long-minutes`` recording; the real-time factor.

    .venv/bin/python benchmarks/bench_vad.py --model MODEL_DIR --test TEST.jsonl --dev DEV.jsonl \\
        --json benchmarks/results/vad_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_transcribe import peak_rss_mb
from machine import cpu_label, machine, speechtl_cmd

SR = 16000


def pause_recording(utts, seconds: float, out: Path, seed: int, silence_s: float = 0.0) -> tuple[str, tuple[float, float]]:
    """Clips (shuffled, cycled) joined by pauses of 0.5-6 s into a ``seconds``-long 16 kHz wav,
    with ``silence_s`` of silence once half the length is reached. Returns the joined text
    and the silence's (start, end) in seconds."""
    import soundfile as sf

    from speechtl.data.audio import load_audio

    rng = random.Random(seed)
    order = list(utts)
    rng.shuffle(order)
    texts, total, quiet = [], 0, (0.0, 0.0)
    with sf.SoundFile(str(out), "w", SR, 1, subtype="PCM_16") as f:
        for u in itertools.cycle(order):
            wav = load_audio(u.audio)
            pause = np.zeros(int(rng.uniform(0.5, 6.0) * SR), np.float32)
            if total + wav.size + pause.size > seconds * SR:
                break
            f.write(np.concatenate([wav, pause]))
            total += wav.size + pause.size
            texts.append(u.text)
            if silence_s and not quiet[1] and total > seconds * SR / 2:
                f.write(np.zeros(int(silence_s * SR), np.float32))
                quiet = (total / SR, total / SR + silence_s)
                total += int(silence_s * SR)
    return " ".join(texts), quiet


def add_noise(path: Path, snr_db: float, seed: int) -> None:
    """Add white noise to the whole recording, pauses included, ``snr_db`` below the level of
    its speech (the RMS of its non-silent samples): pauses that are no longer digital
    silence, as in a room or on a line."""
    import soundfile as sf

    wav, sr = sf.read(str(path), dtype="float32")
    speech = wav[np.abs(wav) > 1e-4]
    rms = float(np.sqrt(np.mean(speech ** 2))) if speech.size else 0.1
    noise = np.random.default_rng(seed).standard_normal(wav.size).astype(np.float32) * rms / 10 ** (snr_db / 20)
    sf.write(str(path), np.clip(wav + noise, -1, 1), sr, subtype="PCM_16")


def wer(rec, hyp: str, ref: str) -> float:
    from speechtl.decoding.metrics import UtteranceResult, score

    return score([UtteranceResult("x", ref, hyp, 0.0)], normalize=rec.normalizer).summary()["wer"]


def timed(rec, path: Path, vad) -> tuple[float, object]:
    t0 = time.perf_counter()
    t = rec.transcribe(str(path), return_timestamps=True, vad=vad)
    return time.perf_counter() - t0, t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--test", required=True, help="manifest of the clips the test recordings are made of")
    ap.add_argument("--dev", required=True, help="manifest of the clips the dev recording (for the defaults) is made of")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--dev-minutes", type=float, default=6.0)
    ap.add_argument("--long-minutes", type=float, default=60.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--thresholds", default="0.35,0.5,0.65")
    ap.add_argument("--silences", default="0.1,0.3,0.6")
    ap.add_argument("--parts", default="grid,speed,memory")
    ap.add_argument("--memory-vad", default="on", help="on, off or on,off: the settings timed in the memory part")
    ap.add_argument("--noise-snr-db", type=float, help="grid: add white noise this many dB below the speech")
    ap.add_argument("--json")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    import torch

    from speechtl.data.manifest import read_manifest
    from speechtl.inference.recognizer import Recognizer
    from speechtl.inference.vad import VadOptions

    result: dict = {"machine": machine(), "cpu": cpu_label(), "torch_threads": torch.get_num_threads(),
                    "load_before": os.getloadavg()}
    print(f"{cpu_label()}; {torch.get_num_threads()} torch threads; load {os.getloadavg()}")
    rec = Recognizer.load(args.model, device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench_vad_"))

    if "grid" in parts:
        dev_path = tmp / "dev.wav"
        dev_ref, _ = pause_recording(read_manifest(args.dev), args.dev_minutes * 60, dev_path, seed=1)
        if args.noise_snr_db is not None:
            add_noise(dev_path, args.noise_snr_db, seed=1)
            print(f"white noise added to the dev recording, {args.noise_snr_db:g} dB below its speech")
        s, t = timed(rec, dev_path, None)
        grid = [{"vad": "off", "seconds": round(s, 2), "wer": round(wer(rec, t.text, dev_ref), 4)}]
        print(f"\ndev recording {args.dev_minutes:g} min: fixed windows WER {grid[0]['wer']:.4f} in {s:.1f} s")
        print(f"{'threshold':>9s} {'min silence':>11s} {'WER':>7s} {'seconds':>8s}")
        for th in map(float, args.thresholds.split(",")):
            for ms in map(float, args.silences.split(",")):
                s, t = timed(rec, dev_path, VadOptions(threshold=th, min_silence_s=ms))
                row = {"threshold": th, "min_silence_s": ms, "seconds": round(s, 2), "wer": round(wer(rec, t.text, dev_ref), 4)}
                grid.append(row)
                print(f"{th:9.2f} {ms:11.2f} {row['wer']:7.4f} {s:8.1f}")
        result["grid"] = grid

    if "speed" in parts:
        path = tmp / "talk.wav"
        ref, quiet = pause_recording(read_manifest(args.test), args.minutes * 60, path, seed=2, silence_s=60.0)
        duration = __import__("soundfile").info(str(path)).frames / SR
        rows = {"fixed 30 s windows": None, "VAD (defaults)": VadOptions()}
        best: dict[str, tuple[float, object]] = {}
        for _ in range(args.runs):
            for name, vad in rows.items():
                s, t = timed(rec, path, vad)
                if name not in best or s < best[name][0]:
                    best[name] = (s, t)
        print(f"\ntest recording {duration / 60:.1f} min, 60 s silence at {quiet[0]:.1f}-{quiet[1]:.1f} s "
              f"(best of {args.runs}); load {os.getloadavg()}")
        print(f"{'':20s} {'seconds':>8s} {'x real time':>11s} {'WER':>7s} {'segments':>8s} {'span the silence':>16s}")
        speed = {}
        for name, (s, t) in best.items():
            spanning = sum(seg.start < quiet[0] and seg.end > quiet[1] for seg in t.segments)
            speed[name] = {"seconds": round(s, 2), "x_real_time": round(duration / s, 2), "wer": round(wer(rec, t.text, ref), 4),
                           "segments": len(t.segments), "segments_spanning_silence": spanning}
            print(f"{name:20s} {s:8.1f} {duration / s:11.1f} {speed[name]['wer']:7.4f} {len(t.segments):8d} {spanning:16d}")
        ratio = speed["fixed 30 s windows"]["seconds"] / speed["VAD (defaults)"]["seconds"]
        print(f"VAD is {ratio:.2f}x as fast; WER {speed['VAD (defaults)']['wer'] - speed['fixed 30 s windows']['wer']:+.4f}")
        result["speed"] = {"minutes": round(duration / 60, 2), "silence": quiet, "rows": speed, "ratio": round(ratio, 3),
                           "load_after": os.getloadavg()}

    if "memory" in parts:
        mem = {}
        for minutes in (1.0, args.long_minutes):
            p = tmp / f"m{minutes:g}.wav"
            pause_recording(read_manifest(args.test), minutes * 60, p, seed=3)
            duration = __import__("soundfile").info(str(p)).frames / SR
            for vad in args.memory_vad.split(","):
                rss, wall = peak_rss_mb(speechtl_cmd("transcribe", args.model, str(p), "--format", "json", "--vad", vad,
                                                     "--device", "cpu", "-q"))
                mem[f"{minutes:g} min, vad {vad}"] = {"peak_rss_mb": round(rss, 1), "wall_s": round(wall, 2),
                                                      "audio_s": round(duration, 1), "rtf": round(wall / duration, 4)}
        print(f"\nspeechtl transcribe (fresh process each); load {os.getloadavg()}")
        print(f"{'':18s} {'peak RSS MB':>11s} {'wall s':>7s} {'real-time factor':>16s}")
        for k, v in mem.items():
            print(f"{k:18s} {v['peak_rss_mb']:11.1f} {v['wall_s']:7.1f} {v['rtf']:16.4f}")
        for vad in args.memory_vad.split(","):
            r = mem[f"{args.long_minutes:g} min, vad {vad}"]["peak_rss_mb"] / mem[f"1 min, vad {vad}"]["peak_rss_mb"]
            print(f"vad {vad}: {args.long_minutes:g}-min peak RSS is {r:.2f}x the 1-min one")
            mem[f"ratio_vad_{vad}"] = round(r, 3)
        result["memory"] = mem

    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
