#!/usr/bin/env python3
"""Transcription benchmark, side by side in one run:

1. speed and parity: ``speechtl`` (duration-sorted batches) against
   ``transformers.pipeline("automatic-speech-recognition", batch_size=B)`` on the same
   exported model and the same files; audio-seconds per second, the ratio, and how many
   greedy transcripts agree. Both sides decode the files with the same reader
   (``speechtl.load_audio``; the pipeline would otherwise need ffmpeg for file names),
   and that time is counted on both sides.
2. chunking: CER of a ~2-minute recording (test clips joined with short pauses) decoded
   whole and in overlapping windows.
3. memory: peak resident memory of ``speechtl transcribe`` (a fresh process each) on a
   1-minute and a 60-minute recording.
4. LM: greedy against beam search with an n-gram LM built from the training text, on the
   test set; the LM weights are picked on the dev set.

Before these, which run inside one warmed-up process (``--commands on``, the default), it
times what a user times, whole commands in fresh processes, from start to exit:

0. ``speechtl transcribe MODEL TEST.jsonl`` against the plain way as a whole process (this
   script's ``--plain-run``: import transformers, build the exported model's ``pipeline``,
   transcribe the files one at a time), and ``speechtl transcribe`` of one 5-second file
   (the test clips joined) against the plain process on that file. Each runs
   ``--command-runs`` times: the first "cold" (the OS file cache is not dropped), the
   others "warm" (best kept).

Every figure is printed with the CPU's AVX2 / AVX-512 / AMX flags (from /proc/cpuinfo).

    .venv/bin/python benchmarks/bench_transcribe.py --model MODEL_DIR --manifest TEST.jsonl \\
        --lm-model MODEL_DIR --lm-text TRAIN.jsonl --dev DEV.jsonl --json benchmarks/results/transcribe_cpu.json
    .venv/bin/python benchmarks/bench_transcribe.py --model MODEL_DIR --manifest TEST.jsonl --commands only
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cold_and_warm, cpu_label, cpu_name, machine, speechtl_cmd


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` in a fresh process; its peak resident memory (MB) and wall time (s).

    Linux carries a parent's peak RSS into a forked child's ``ru_maxrss``, so the command is
    started by a small launcher process rather than by this (large) one."""
    launcher = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", launcher, *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")
    return int(r.stdout.split()[-1]) / 1024, time.perf_counter() - t0


def joined_recording(utts, seconds: float, out: Path, pause_s: float = 0.3) -> str:
    """Join clips (cycling through them) into one ``seconds``-long 16 kHz wav; returns its text."""
    import soundfile as sf

    from speechtl.data.audio import load_audio

    gap = np.zeros(int(pause_s * 16000), np.float32)
    texts, total = [], 0
    with sf.SoundFile(str(out), "w", 16000, 1, subtype="PCM_16") as f:
        for u in itertools.cycle(utts):
            wav = load_audio(u.audio)
            if total + wav.size > seconds * 16000:
                break
            f.write(np.concatenate([wav, gap]))
            total += wav.size + gap.size
            texts.append(u.text)
    return " ".join(texts)


def exact_recording(utts, seconds: float, out: Path) -> None:
    """Clips joined (cycling through them) and cut to exactly ``seconds``: one 16 kHz wav."""
    import soundfile as sf

    from speechtl.data.audio import load_audio

    need, parts = int(seconds * 16000), []
    for u in itertools.cycle(utts):
        parts.append(load_audio(u.audio))
        if sum(p.size for p in parts) >= need:
            break
    sf.write(str(out), np.concatenate(parts)[:need], 16000, subtype="PCM_16")


def plain_run(hf_dir: str, manifest: str) -> None:
    """The plain way as a whole process: transformers' pipeline on the exported model, one
    file at a time, each file read with ``speechtl.load_audio`` as in section 1."""
    from transformers import pipeline

    from speechtl.data.audio import load_audio
    from speechtl.data.manifest import read_manifest

    pipe = pipeline("automatic-speech-recognition", model=hf_dir, device="cpu")
    for u in read_manifest(manifest):
        pipe({"raw": load_audio(u.audio), "sampling_rate": 16000})


def whole_commands(model: str, hf_dir: Path, manifest: Path, audio_s: float, five: Path, runs: int, cpu: str) -> dict:
    """Section 0: ``speechtl transcribe`` and the plain process, on the test set and on one
    5-second file, each ``runs`` times in fresh processes."""
    from speechtl.data.manifest import Utterance, write_manifest

    one = write_manifest(five.with_suffix(".jsonl"), [Utterance("five", str(five), "", 5.0)], absolute=True)
    here = str(Path(__file__).resolve())
    jobs = {"test_set": (manifest, audio_s), "one_5s_file": (one, 5.0)}
    out: dict = {}
    print(f"whole commands, wall seconds (a fresh process each, start to exit) [{cpu}]:", flush=True)
    for job, (m, seconds) in jobs.items():
        target = str(m) if job == "test_set" else str(five)
        ours_cmd = speechtl_cmd("transcribe", model, target, "--device", "cpu", "-q")
        plain_cmd = [sys.executable, here, "--plain-run", str(hf_dir), str(m)]
        ours = cold_and_warm(lambda n, cmd=ours_cmd: cmd, runs)
        theirs = cold_and_warm(lambda n, cmd=plain_cmd: cmd, runs)
        row = {"audio_s": round(seconds, 1), "speechtl_transcribe": ours, "plain_pipeline_process": theirs}
        for k in ("cold", "warm"):
            if ours[k] and theirs[k]:
                row[f"{k}_speechtl_speedup"] = round(theirs[k]["wall_s"] / ours[k]["wall_s"], 2)
        out[job] = row
        label = "test set" if job == "test_set" else "one 5-second file"
        for name, r in (("speechtl transcribe", ours), ("plain pipeline, whole process", theirs)):
            warm = f"warm {r['warm']['wall_s']:7.2f} s ({seconds / r['warm']['wall_s']:.1f}x)" if r["warm"] else ""
            print(f"  {label}: {name:32s} cold {r['cold']['wall_s']:7.2f} s ({seconds / r['cold']['wall_s']:.1f}x)  {warm}  [{cpu}]")
        warm = f", warm {row['warm_speechtl_speedup']:.2f}x" if "warm_speechtl_speedup" in row else ""
        print(f"  {label}: speechtl is cold {row['cold_speechtl_speedup']:.2f}x{warm} as fast  [{cpu}]", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a finetune/scratch speechtl model directory (exportable); required")
    ap.add_argument("--manifest", help="test manifest; at least 200 files; required")
    ap.add_argument("--batch-size", type=int, default=16, help="pipeline batch size")
    ap.add_argument("--batch-seconds", type=float, default=None, help="speechtl batch cap (padded seconds; default: speechtl's)")
    ap.add_argument("--lm-model", help="model for the LM comparison (default: --model)")
    ap.add_argument("--lm-text", nargs="+", help="training manifests or text files; one LM is built from each")
    ap.add_argument("--dev", help="dev manifest to pick alpha/beta on")
    ap.add_argument("--lm-order", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--commands", choices=["on", "off", "only"], default="on",
                    help="also time whole commands in fresh processes, section 0 (on); not (off); only them (only)")
    ap.add_argument("--command-runs", type=int, default=3, help="runs of each whole command: the first cold, the rest warm")
    ap.add_argument("--plain-run", nargs=2, metavar=("HF_DIR", "MANIFEST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_run:
        plain_run(*args.plain_run)
        return
    if not (args.model and args.manifest):
        ap.error("--model and --manifest are required")

    import torch
    from transformers import pipeline

    import speechtl
    from speechtl.data.audio import load_audio
    from speechtl.data.manifest import read_manifest
    from speechtl.decoding.metrics import cer, wer
    from speechtl.inference.transcribe import Item
    from speechtl.models.export import export_hf

    cpu = cpu_label()
    res: dict = {"machine": machine(), "torch_threads": torch.get_num_threads(), "model": args.model, "manifest": args.manifest}
    print(f"{cpu_name()} [{cpu}], {torch.get_num_threads()} torch threads", flush=True)
    utts = read_manifest(args.manifest)
    audio_s = sum(u.duration for u in utts)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_hf(args.model, tmp / "hf")
        # ---- 0. whole commands, before this process has loaded the model
        if args.commands != "off":
            five = tmp / "five.wav"
            exact_recording(utts, 5.0, five)
            res["whole_commands"] = whole_commands(args.model, tmp / "hf", Path(args.manifest).resolve(), audio_s, five,
                                                   args.command_runs, cpu)
            if args.commands == "only":
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(res, indent=2) + "\n")
                return
        rec = speechtl.load(args.model, device="cpu")
        # ---- 1. speed and parity
        pipe = pipeline("automatic-speech-recognition", model=str(tmp / "hf"), device="cpu")
        tr = rec.transcriber(max_batch_seconds=args.batch_seconds)
        items = [Item(u.id, u.audio) for u in utts]

        def run_speechtl(its):
            out = {}
            for i, t in tr.run_indexed(its):
                out[i] = t.text
            return [out[i] for i in range(len(its))]

        def run_pipeline(us, batch_size):
            inputs = ({"raw": load_audio(u.audio), "sampling_rate": 16000} for u in us)
            return [r["text"] for r in pipe(inputs, batch_size=batch_size)]

        def same(a: str, b: str) -> bool:  # the tokenizer keeps a double space where "|" repeats
            return a.split() == b.split()

        run_speechtl(items[:8]), run_pipeline(utts[:8], 1), run_pipeline(utts[:8], args.batch_size)  # warm-up
        t0 = time.perf_counter()
        ours = run_speechtl(items)
        t_ours = time.perf_counter() - t0
        speed = {"files": len(utts), "audio_s": round(audio_s, 1), "speechtl_s": round(t_ours, 2),
                 "speechtl_x_realtime": round(audio_s / t_ours, 1)}
        for bs in (1, args.batch_size):
            t0 = time.perf_counter()
            theirs = run_pipeline(utts, bs)
            t = time.perf_counter() - t0
            agree = sum(same(a, b) for a, b in zip(ours, theirs))
            speed[f"pipeline_bs{bs}"] = {"seconds": round(t, 2), "x_realtime": round(audio_s / t, 1),
                                         "speechtl_speedup": round(t / t_ours, 2), "identical_transcripts": agree,
                                         "first_differences": [(a, b) for a, b in zip(ours, theirs) if not same(a, b)][:2]}
            print(f"speed, inside one process: {len(utts)} files, {audio_s / 60:.1f} min: speechtl {audio_s / t_ours:.1f}x real time, "
                  f"pipeline(batch_size={bs}) {audio_s / t:.1f}x; speechtl is {t / t_ours:.2f}x as fast; "
                  f"identical transcripts {agree}/{len(utts)}  [{cpu}]", flush=True)
        res["speed"] = speed

        # ---- 2. chunked against whole-file decoding of a ~2-minute recording
        two = tmp / "two_min.wav"
        ref = joined_recording(utts, 120.0, two)
        chunking = {}
        for name, chunk, stride in (("whole", 200.0, None), ("chunk30_stride5", 30.0, 5.0), ("chunk10_stride2", 10.0, 2.0)):
            hyp = rec.transcribe(two, chunk_length_s=chunk, stride_length_s=stride)
            chunking[name] = {"cer": round(cer([ref], [hyp]), 4), "wer": round(wer([ref], [hyp]), 4)}
        res["chunking"] = {"seconds": round(len(load_audio(two)) / 16000, 1), **chunking}
        print(f"chunking: {json.dumps(res['chunking'])}  [{cpu}]", flush=True)

        # ---- 3. peak memory, 1 min against 60 min
        if not args.skip_memory:
            mem = {}
            for minutes in (1, 60):
                path = tmp / f"long_{minutes}.wav"
                joined_recording(utts, minutes * 60.0, path)
                rss, wall = peak_rss_mb([sys.executable, "-m", "speechtl", "transcribe", args.model, str(path), "-q"])
                mem[f"{minutes}min"] = {"peak_rss_mb": round(rss, 1), "wall_s": round(wall, 1)}
                path.unlink()
            mem["ratio_60_to_1"] = round(mem["60min"]["peak_rss_mb"] / mem["1min"]["peak_rss_mb"], 3)
            res["memory"] = mem
            print(f"memory: {json.dumps(mem)}  [{cpu}]", flush=True)

    # ---- 4. LM beam search against greedy
    if args.lm_text:
        from speechtl.decoding.decoders import BeamDecoder, GreedyDecoder
        from speechtl.decoding.lm import read_sentences, write_arpa

        lm_rec = speechtl.load(args.lm_model or args.model, device="cpu")
        norm = lm_rec.normalizer
        tr = lm_rec.transcriber()

        def log_probs(manifest):
            us = read_manifest(manifest)
            return us, [tr.file_log_probs(Item(u.id, u.audio)) for u in us]

        def score(us, lps, decoder):
            hyps = [" ".join(w.word for w in decoder(lp, tr.frame_s)) for lp in lps]
            refs = [norm(u.text) for u in us]
            return {"wer": round(wer(refs, hyps), 4), "cer": round(cer(refs, hyps), 4)}

        test_us, test_lps = log_probs(args.manifest)
        dev_us, dev_lps = log_probs(args.dev) if args.dev else (None, None)
        res["lm"] = {"model": args.lm_model or args.model, "beam_width": 32,
                     "greedy": score(test_us, test_lps, GreedyDecoder(lm_rec.vocab)),
                     "beam_no_lm": score(test_us, test_lps, BeamDecoder(lm_rec.vocab, None, beam_width=32)), "lms": []}
        grid = [(a, b) for a in (0.3, 0.5, 1.0, 1.5) for b in (0.0, 1.0, 2.0)]
        for text in args.lm_text:
            lines = read_sentences(text, norm)
            with tempfile.TemporaryDirectory() as tmp:
                lm_path = write_arpa(lines, Path(tmp) / "lm.arpa", order=args.lm_order)
                best = (0.5, 1.0)
                if dev_us is not None:
                    dev = {ab: score(dev_us, dev_lps, BeamDecoder(lm_rec.vocab, lm_path, ab[0], ab[1], 32)) for ab in grid}
                    best = min(grid, key=lambda ab: (dev[ab]["wer"], dev[ab]["cer"]))
                res["lm"]["lms"].append({"text": text, "sentences": len(lines), "order": args.lm_order, "alpha": best[0],
                                         "beta": best[1], **score(test_us, test_lps, BeamDecoder(lm_rec.vocab, lm_path, *best, 32))})
        print(f"lm: {json.dumps(res['lm'])}  [{cpu}]", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
