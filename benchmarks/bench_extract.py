#!/usr/bin/env python3
"""Feature-extraction throughput: speechtl extract against the plain transformers ways.

For each encoder, over the same clips, side by side in one run:

  (a) plain transformers, one file at a time: load the file, Wav2Vec2FeatureExtractor,
      model(..., output_hidden_states=True), batch size 1
  (b) transformers batched in manifest order, padded to the longest clip of each batch
      (the datasets.map(batched=True) pattern)
  (c) speechtl extract (extract_to_cache: sorted dynamic batches, DataLoader workers,
      inference_mode, sharded float16 cache written to disk), in extract's precision
      (--amp, default auto: bf16 autocast on CUDA and on CPUs with AMX, float32 elsewhere)
  (d) the compute ceiling: the model's forward pass alone on audio already in memory,
      in the same precision as (c), the best of one clip at a time (unpadded) and sorted batches, each with
      transformers' own CNN and with speechtl's time-major CNN, and (on a CPU with
      several threads) each also run as extract runs it: one batch per thread side by
      side, one intra-op thread each

and prints audio seconds per second (x real time) and the ratios c/a, c/b, c/d.

    .venv/bin/python benchmarks/bench_extract.py                       # default + base, 10 min of speech
    .venv/bin/python benchmarks/bench_extract.py --encoders default --minutes 2
    .venv/bin/python benchmarks/bench_extract.py --amp none                            # float32 (c) and (d) on any CPU
    .venv/bin/python benchmarks/bench_extract.py --device cuda --encoders base --minutes 60
    bash benchmarks/gpu_extract.sh prepare; bash benchmarks/gpu_extract.sh run OUT   # a GPU without espeak-ng
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile as sf
import torch

from speechtl.precision import AMP_CHOICES

ROOT = Path(__file__).resolve().parents[1]


def corpus(minutes: float, out: Path, lang: str) -> Path:
    """Synthesise the benchmark's clips into ``out``; returns the manifest."""
    from speechtl.synth import SynthConfig, synthesize

    # word counts chosen so clips run from about 1 s to about 15 s
    synthesize(SynthConfig(lang=lang, minutes=minutes, out_dir=str(out), seed=7, min_words=1, max_words=28), progress=False)
    return out / "manifest.jsonl"


def encoder_dir(name: str, work: Path) -> str:
    if name != "base":
        return name
    out = work / "base"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_random_encoder.py"), "--size", "base",
                        "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return str(out)


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_one_by_one(model, fe, utts, device) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for u in utts:
            wav, sr = sf.read(u.audio, dtype="float32")
            inputs = fe(wav, sampling_rate=sr, return_tensors="pt")
            out = model(inputs.input_values.to(device), output_hidden_states=True)
            _ = [h.cpu() for h in out.hidden_states]
    sync(device)
    return time.perf_counter() - t0


def plain_batched(model, fe, utts, device, batch_size: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(utts), batch_size):
            chunk = utts[i : i + batch_size]
            waves = [sf.read(u.audio, dtype="float32")[0] for u in chunk]
            inputs = fe(waves, sampling_rate=16_000, padding=True, return_attention_mask=True, return_tensors="pt")
            kw = {"attention_mask": inputs.attention_mask.to(device)} if fe.return_attention_mask else {}
            out = model(inputs.input_values.to(device), output_hidden_states=True, **kw)
            _ = [h.cpu() for h in out.hidden_states]
    sync(device)
    return time.perf_counter() - t0


def speechtl_extract(encoder, utts, device, out: Path, batch_seconds: float, workers: int, amp: str) -> float:
    from speechtl.cache import extract_to_cache

    t0 = time.perf_counter()
    extract_to_cache(encoder, utts, out, device=device, amp=amp, max_batch_seconds=batch_seconds, num_workers=workers,
                     progress=False, rank=0, world_size=1)
    return time.perf_counter() - t0


def ceiling(encoder, utts, device, batch_seconds: float, amp_setting: str) -> tuple[float, str, dict]:
    from speechtl.audio import load_audio
    from speechtl.features import cpu_streams
    from speechtl.precision import encoder_autocast_dtype
    from speechtl.loader import cut_batches, pad_waveforms

    waves = [torch.from_numpy(load_audio(u.audio)) for u in utts]
    durs = [u.duration for u in utts]
    order = sorted(range(len(utts)), key=lambda i: durs[i])
    batches = [pad_waveforms([waves[i] for i in b]) for b in cut_batches(order, durs, batch_seconds)]
    singles = [(w[None].to(device), torch.tensor([w.numel()], device=device)) for w in waves]
    batches = [(x.to(device), n.to(device)) for x, n in batches]
    timings = {}
    cnn_paths = {"transformers' CNN": False, "time-major CNN": True} if encoder.fast_cnn else {"transformers' CNN": False}
    amp = encoder_autocast_dtype(device, amp_setting)  # the precision extract runs the encoder in
    threads = torch.get_num_threads()
    streams = cpu_streams(device)

    def forward(item, one_thread: bool = False) -> None:
        if one_thread:
            torch.set_num_threads(1)
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            encoder(*item, all_layers=True)

    for cnn, fast in cnn_paths.items():
        encoder.fast_cnn = fast
        ways = [("one clip at a time", singles, 1), (f"sorted batches <= {batch_seconds:g} s", batches, 1)]
        if streams > 1 and fast == ("time-major CNN" in cnn_paths):  # with the CNN extract uses
            # as extract runs on a CPU: batches side by side, one intra-op thread each, each
            # thread taking the next batch when it is free
            ways += [(f"{label}, {streams} side by side", items, streams) for label, items, _ in ways]
        for name, items, n_streams in ways:
            sync(device)
            t0 = time.perf_counter()
            if n_streams == 1:
                for item in items:
                    forward(item)
            else:
                with ThreadPoolExecutor(n_streams) as pool:
                    list(pool.map(lambda item: forward(item, one_thread=True), items))
                torch.set_num_threads(threads)
            sync(device)
            timings[f"{name}, {cnn}"] = time.perf_counter() - t0
    encoder.fast_cnn = "time-major CNN" in cnn_paths
    best = min(timings, key=timings.get)
    return timings[best], best, timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", default="default,base", help="comma-separated: default, base (random 95M), or a path")
    ap.add_argument("--minutes", type=float, default=10.0, help="speech to synthesise (clips of about 1-15 s)")
    ap.add_argument("--lang", default="cs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-seconds", type=float, default=None, help="batch cap for (c) and (d) (default: 10 on CPU, 400 on GPU)")
    ap.add_argument("--batch-size", type=int, default=8, help="clips per batch in (b)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers for (c) (default: speechtl's)")
    ap.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                    help="precision of (c) and (d), as speechtl extract --amp; (a) and (b) run float32")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all four methods, taken in turn; each keeps its best")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--manifest", type=Path, help="time these clips instead of synthesising (e.g. on a machine without espeak-ng)")
    ap.add_argument("--synth-only", type=Path, metavar="DIR", help="only synthesise the clips into DIR (for --manifest elsewhere)")
    args = ap.parse_args()
    if args.synth_only:
        print(corpus(args.minutes, args.synth_only, args.lang))
        return

    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    from speechtl.encoder import load_encoder, resolve_encoder
    from speechtl.precision import compute_dtype_name

    device = torch.device(args.device)
    batch_seconds = args.batch_seconds or (400.0 if device.type == "cuda" else 10.0)
    results = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "cpu": cpu_name(), "amx": "amx_tile" in cpu_flags(),
                           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
               "batch_seconds": batch_seconds, "rounds": args.rounds, "amp": args.amp,
               "c_and_d_compute": compute_dtype_name(device, args.amp), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from speechtl.manifest import read_manifest

        utts = read_manifest(args.manifest or corpus(args.minutes, work / "speech", args.lang))
        audio = sum(u.duration for u in utts)
        print(f"{len(utts)} clips, {audio / 60:.1f} min, {min(u.duration for u in utts):.1f}-{max(u.duration for u in utts):.1f} s;"
              f" {device}, {torch.get_num_threads()} threads, batch cap {batch_seconds:g} s;"
              f" (c) and (d) compute in {results['c_and_d_compute']}")
        for name in args.encoders.split(","):
            path = encoder_dir(name, work)
            encoder = load_encoder(path).to(device).eval()
            if encoder.config.model_type == "whisper":
                raise SystemExit(f"{name}: this benchmark compares against transformers' wav2vec2-style feature "
                                 "extraction; Whisper encoders are not covered by it")
            model = AutoModel.from_pretrained(resolve_encoder(path)).to(device).eval()
            fe = Wav2Vec2FeatureExtractor(sampling_rate=16_000, do_normalize=encoder.normalize_waveform,
                                          return_attention_mask=encoder.config.feat_extract_norm == "layer")
            params = sum(p.numel() for p in model.parameters()) / 1e6
            with torch.inference_mode():  # first calls allocate and pick kernels; keep that out of every timing
                model(torch.zeros(1, 16_000, device=device), output_hidden_states=True)
                encoder(torch.zeros(1, 16_000, device=device), torch.tensor([16_000], device=device))
            # the methods take turns, round after round, and each keeps its best round: a slow
            # spell of a noisy machine then hits every method alike rather than one of them
            rounds: dict[str, list[float]] = {k: [] for k in "abcd"}
            ceilings: dict[str, float] = {}
            for r in range(args.rounds):
                rounds["a"].append(plain_one_by_one(model, fe, utts, device))
                rounds["b"].append(plain_batched(model, fe, utts, device, args.batch_size))
                cache_dir = work / f"cache-{name}-{r}"
                rounds["c"].append(speechtl_extract(encoder, utts, device, cache_dir, batch_seconds, args.workers, args.amp))
                shutil.rmtree(cache_dir)
                _, _, cands = ceiling(encoder, utts, device, batch_seconds, args.amp)
                for k, v in cands.items():
                    ceilings[k] = min(ceilings.get(k, v), v)
                rounds["d"].append(min(cands.values()))
            t = {k: min(v) for k, v in rounds.items()}
            how = min(ceilings, key=ceilings.get)
            x = {k: audio / v for k, v in t.items()}
            row = {"encoder": name, "parameters_m": round(params, 2), "audio_s": round(audio, 1),
                   "x_real_time": {k: round(v, 2) for k, v in x.items()}, "ceiling": how,
                   "ceiling_candidates_x_real_time": {k: round(audio / v, 2) for k, v in ceilings.items()},
                   "rounds_x_real_time": {k: [round(audio / x, 2) for x in v] for k, v in rounds.items()},
                   "c_over_a": round(x["c"] / x["a"], 2), "c_over_b": round(x["c"] / x["b"], 2),
                   "c_over_d": round(x["c"] / x["d"], 2)}
            if device.type == "cuda":
                row["audio_hours_per_gpu_minute"] = round(x["c"] * 60 / 3600, 2)
            results["runs"].append(row)
            print(f"\n{name} ({params:.1f}M parameters), audio seconds per second:")
            labels = {"a": "(a) transformers, one file at a time", "b": f"(b) transformers, batches of {args.batch_size}, manifest order",
                      "c": "(c) speechtl extract", "d": f"(d) forward pass alone ({how})"}
            for k, label in labels.items():
                print(f"  {label:55s} {x[k]:8.1f}x")
            print(f"  c/a {row['c_over_a']:.2f}   c/b {row['c_over_b']:.2f}   c/d {row['c_over_d']:.2f}")
            del model, encoder
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
