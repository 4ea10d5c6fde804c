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

and prints audio seconds per second (x real time) and the ratios c/a, c/b, c/d. Those
figures come from inside one warmed-up process. Next to them (``--commands on``, the
default) it times what a user times, whole commands in fresh processes, from start to exit:

  (e) ``speechtl extract`` on the same manifest and encoder
  (f) the plain way as a whole process: this script's ``--plain-run``, which imports
      torch and transformers, loads the model and runs (a)'s per-file loop, keeping the
      features in memory (for a Whisper encoder, such as the bundled one, the loop of
      ``WhisperFeatureExtractor``, which pads each clip to 30 s, and ``WhisperModel``'s
      encoder; the in-process part (a)-(d) covers wav2vec2-style encoders only)

each run ``--command-runs`` times: the first "cold" (an empty per-user cache,
``$SPEECHTL_CACHE``, so the encoder's fingerprint is hashed; the OS file cache is not
dropped), the others "warm" (best kept); every run writes a new cache folder. Every
figure is printed with the CPU's AVX2 / AVX-512 / AMX flags (from /proc/cpuinfo).

    .venv/bin/python benchmarks/bench_extract.py                       # default + base, 10 min of speech
    .venv/bin/python benchmarks/bench_extract.py --encoders default --minutes 2
    .venv/bin/python benchmarks/bench_extract.py --amp none                            # float32 (c) and (d) on any CPU
    .venv/bin/python benchmarks/bench_extract.py --commands only --encoders default    # whole commands only
    .venv/bin/python benchmarks/bench_extract.py --device cuda --encoders base --minutes 60
    bash benchmarks/gpu_extract.sh prepare; bash benchmarks/gpu_extract.sh run OUT   # a GPU without espeak-ng
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile as sf
import torch
from machine import cold_and_warm, cpu_label, cpu_name, cpu_units, machine, speechtl_cmd

from speechtl.core.precision import AMP_CHOICES

ROOT = Path(__file__).resolve().parents[1]


def corpus(minutes: float, out: Path, lang: str) -> Path:
    """Synthesise the benchmark's clips into ``out``; returns the manifest."""
    from speechtl.data.corpora.synth import SynthConfig, synthesize

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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_one_by_one(model, fe, utts, device, keep: list | None = None) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for u in utts:
            wav, sr = sf.read(u.audio, dtype="float32")
            inputs = fe(wav, sampling_rate=sr, return_tensors="pt")
            out = model(inputs.input_values.to(device), output_hidden_states=True)
            feats = [h.cpu() for h in out.hidden_states]
            if keep is not None:
                keep.append(feats)
    sync(device)
    return time.perf_counter() - t0


def model_type(encoder: str) -> str | None:
    """The ``model_type`` in a local encoder folder's config.json (None for a hub id)."""
    try:
        return json.loads((Path(encoder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def plain_run(encoder: str, manifest: str, device: str) -> None:
    """(f): the plain way as a whole process, as a user's script would do it: for a Whisper
    encoder, ``WhisperFeatureExtractor`` (which pads every clip to 30 s) and the encoder of
    ``WhisperModel``; for the others, (a)'s loop."""
    from speechtl.data.manifest import read_manifest

    utts, kept = read_manifest(manifest), []
    if model_type(encoder) == "whisper":
        from transformers import WhisperFeatureExtractor, WhisperModel

        model = WhisperModel.from_pretrained(encoder).get_encoder().to(device).eval()
        fe = WhisperFeatureExtractor.from_pretrained(encoder)
        with torch.inference_mode():
            for u in utts:
                wav, sr = sf.read(u.audio, dtype="float32")
                inputs = fe(wav, sampling_rate=sr, return_tensors="pt")
                out = model(inputs.input_features.to(device), output_hidden_states=True)
                kept.append([h.cpu() for h in out.hidden_states])
        return
    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    model = AutoModel.from_pretrained(encoder).to(device).eval()
    try:
        fe = Wav2Vec2FeatureExtractor.from_pretrained(encoder)
    except OSError:  # no preprocessor_config.json: wav2vec2's defaults
        fe = Wav2Vec2FeatureExtractor()
    plain_one_by_one(model, fe, utts, torch.device(device), keep=kept)


def whole_commands(encoder: str, manifest: Path, audio: float, device, args, work: Path) -> dict:
    """(e) and (f), each ``args.command_runs`` times in fresh processes."""
    user_cache = work / "user-cache"  # empty: the first run is cold
    env = dict(os.environ, SPEECHTL_CACHE=str(user_cache))

    def extract_cmd(n: int) -> list[str]:
        cmd = speechtl_cmd("extract", "--encoder", encoder, "--manifest", str(manifest), "--out", str(work / f"cmd-cache-{n}"),
                           "--amp", args.amp, "--device", str(device), "-q")
        if args.batch_seconds:
            cmd += ["--batch-seconds", str(args.batch_seconds)]
        if args.workers is not None:
            cmd += ["--num-workers", str(args.workers)]
        return cmd

    plain = [sys.executable, str(Path(__file__).resolve()), "--plain-run", encoder, str(manifest), "--device", str(device)]
    out = {"speechtl_extract": cold_and_warm(extract_cmd, args.command_runs, env=env),
           "plain_process": cold_and_warm(lambda n: plain, args.command_runs, env=env)}
    for n in range(args.command_runs):
        shutil.rmtree(work / f"cmd-cache-{n}", ignore_errors=True)
    shutil.rmtree(user_cache, ignore_errors=True)
    for k in ("cold", "warm"):
        e, f = out["speechtl_extract"][k], out["plain_process"][k]
        if e and f:
            out[f"{k}_x_real_time"] = {"speechtl_extract": round(audio / e["wall_s"], 2), "plain_process": round(audio / f["wall_s"], 2)}
            out[f"{k}_e_over_f"] = round(f["wall_s"] / e["wall_s"], 2)
    return out


def print_whole_commands(name: str, w: dict, cpu: str) -> None:
    print(f"\n{name}: whole commands, wall seconds (a fresh process each, start to exit) [{cpu}]:")
    labels = {"speechtl_extract": "(e) speechtl extract", "plain_process": "(f) plain per-file loop, whole process"}
    for key, label in labels.items():
        r = w[key]
        warm = f"warm {r['warm']['wall_s']:7.2f} s ({w['warm_x_real_time'][key]:.1f}x)" if r["warm"] else ""
        print(f"  {label:42s} cold {r['cold']['wall_s']:7.2f} s ({w['cold_x_real_time'][key]:.1f}x)  {warm}  [{cpu}]")
    warm = f", warm {w['warm_e_over_f']:.2f}" if "warm_e_over_f" in w else ""
    print(f"  e/f (speechtl's speed over the plain process's): cold {w['cold_e_over_f']:.2f}{warm}  [{cpu}]")


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
    from speechtl.features.extract import extract_to_cache

    t0 = time.perf_counter()
    extract_to_cache(encoder, utts, out, device=device, amp=amp, max_batch_seconds=batch_seconds, num_workers=workers,
                     progress=False, rank=0, world_size=1)
    return time.perf_counter() - t0


def ceiling(encoder, utts, device, batch_seconds: float, amp_setting: str) -> tuple[float, str, dict]:
    from speechtl.core.precision import encoder_autocast_dtype
    from speechtl.core.threads import cpu_streams
    from speechtl.data.audio import load_audio
    from speechtl.data.loader import cut_batches, pad_waveforms

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
    ap.add_argument("--commands", choices=["on", "off", "only"], default="on",
                    help="also time whole commands in fresh processes, (e) and (f) (on); not (off); only them (only)")
    ap.add_argument("--command-runs", type=int, default=3, help="runs of each whole command: the first cold, the rest warm")
    ap.add_argument("--plain-run", nargs=2, metavar=("ENCODER_DIR", "MANIFEST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_run:
        plain_run(*args.plain_run, args.device)
        return
    if args.synth_only:
        print(corpus(args.minutes, args.synth_only, args.lang))
        return

    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    from speechtl.core.precision import compute_dtype_name
    from speechtl.encoders.registry import load_encoder, resolve_encoder

    device = torch.device(args.device)
    batch_seconds = args.batch_seconds or (400.0 if device.type == "cuda" else 10.0)
    cpu = cpu_label()
    results = {"machine": {**machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
               "batch_seconds": batch_seconds, "rounds": args.rounds, "amp": args.amp, "commands": args.commands,
               "command_runs": args.command_runs, "c_and_d_compute": compute_dtype_name(device, args.amp), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from speechtl.data.manifest import read_manifest

        manifest = args.manifest or corpus(args.minutes, work / "speech", args.lang)
        utts = read_manifest(manifest)
        audio = sum(u.duration for u in utts)
        print(f"{cpu_name()} [{cpu}]; {len(utts)} clips, {audio / 60:.1f} min, "
              f"{min(u.duration for u in utts):.1f}-{max(u.duration for u in utts):.1f} s;"
              f" {device}, {torch.get_num_threads()} threads, batch cap {batch_seconds:g} s;"
              f" (c) and (d) compute in {results['c_and_d_compute']}")
        for name in args.encoders.split(","):
            path = encoder_dir(name, work)
            row = {"encoder": name, "audio_s": round(audio, 1), "cpu_flags": cpu_units()}
            if args.commands != "off":  # first, before this process has loaded the model
                row["whole_commands"] = whole_commands(resolve_encoder(path), Path(manifest).resolve(), audio, device, args, work)
                print_whole_commands(name, row["whole_commands"], cpu)
            whisper = model_type(resolve_encoder(path)) == "whisper"
            if whisper and args.commands != "only":
                print(f"{name}: the in-process part compares against transformers' wav2vec2-style feature "
                      "extraction; Whisper encoders are not covered by it")
            if args.commands == "only" or whisper:
                results["runs"].append(row)
                continue
            encoder = load_encoder(path).to(device).eval()
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
            row |= {"parameters_m": round(params, 2),
                   "x_real_time": {k: round(v, 2) for k, v in x.items()}, "ceiling": how,
                   "ceiling_candidates_x_real_time": {k: round(audio / v, 2) for k, v in ceilings.items()},
                   "rounds_x_real_time": {k: [round(audio / x, 2) for x in v] for k, v in rounds.items()},
                   "c_over_a": round(x["c"] / x["a"], 2), "c_over_b": round(x["c"] / x["b"], 2),
                   "c_over_d": round(x["c"] / x["d"], 2)}
            if device.type == "cuda":
                row["audio_hours_per_gpu_minute"] = round(x["c"] * 60 / 3600, 2)
            results["runs"].append(row)
            print(f"\n{name} ({params:.1f}M parameters), inside one warmed-up process, audio seconds per second "
                  f"(best of {args.rounds} rounds) [{cpu}]:")
            labels = {"a": "(a) transformers, one file at a time", "b": f"(b) transformers, batches of {args.batch_size}, manifest order",
                      "c": "(c) speechtl extract", "d": f"(d) forward pass alone ({how})"}
            for k, label in labels.items():
                print(f"  {label:55s} {x[k]:8.1f}x  [{cpu}]")
            print(f"  c/a {row['c_over_a']:.2f}   c/b {row['c_over_b']:.2f}   c/d {row['c_over_d']:.2f}  [{cpu}]")
            if "whole_commands" in row:
                w = row["whole_commands"]
                e = (w.get("warm_x_real_time") or w["cold_x_real_time"])["speechtl_extract"]
                print(f"  (e) the same as a whole command ({'warm' if 'warm_x_real_time' in w else 'cold'}) {e:.1f}x: "
                      f"{e / x['c']:.2f} of (c)  [{cpu}]")
            del model, encoder
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
