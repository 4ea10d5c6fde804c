#!/usr/bin/env python3
"""ONNX export against the torch path, side by side in one run:

1. export: ``speechtl export --format onnx`` (float32, and ``--quantize int8``); seconds and sizes;
2. quality: CER/WER of the torch model folder, the float32 ONNX folder and the int8 one on a
   test manifest (greedy, and with ``--lm`` beam search), how many transcripts equal the torch
   path's, and sherpa-onnx's offline recogniser (omnilingual CTC type) on both ONNX files;
3. speed in process: audio seconds per second of ``Recognizer.transcribe`` (torch) and
   ``OnnxRecognizer.transcribe`` (fp32, int8) on the test files, best of ``--rounds``;
   with ``--w2v-dims``, also a random wav2vec2 of that shape exported both ways, against
   ``transformers.pipeline("automatic-speech-recognition")`` unbatched;
4. whole commands: ``speechtl transcribe DIR five_s.wav -q`` in fresh processes, torch folder
   against int8 folder (best of ``--command-runs``);
5. memory: peak RSS (``/usr/bin/time -f %M``) of ``speechtl transcribe INT8_DIR long.wav -q`` on a
   ``--long-minutes`` recording (test clips joined, repeated).

    .venv/bin/python benchmarks/bench_onnx.py --model exp/demo-default/frozen/model \\
        --manifest exp/demo-default/test/manifest.jsonl --lm exp/demo-default/frozen/model/lm.arpa --out exp/onnx-bench \\
        --json benchmarks/results/onnx_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e6, 2)


def st(*args: str, timed: bool = False) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "speechtl", *args]
    if timed:
        cmd = ["/usr/bin/time", "-f", "%M %e", *cmd]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr[-2000:]}")
    return wall, r.stderr.strip().splitlines()[-1] if timed else r.stdout


def export(model: Path, out: Path, lm: str | None) -> dict:
    rows = {}
    for name, extra in (("fp32", []), ("int8", ["--quantize", "int8"])):
        d = out / name
        if not d.exists():
            wall, _ = st("export", str(model), "--format", "onnx", "--out", str(d), *extra)
            rows[name] = {"export_s": round(wall, 1)}
        f = d / ("model.int8.onnx" if name == "int8" else "model.onnx")
        rows.setdefault(name, {})["model_mb"] = size_mb(f)
    rows["torch"] = {"model_mb": size_mb(model)}
    return rows


def sherpa_hyps(folder: Path, utts) -> dict[str, str]:
    import sherpa_onnx

    from speechtl.data.audio import load_audio

    meta = json.loads((folder / "speechtl-onnx.json").read_text())
    rec = sherpa_onnx.OfflineRecognizer.from_omnilingual_asr_ctc(model=str(folder / meta["model"]),
                                                                  tokens=str(folder / "tokens.txt"), num_threads=2)
    out = {}
    for u in utts:
        s = rec.create_stream()
        s.accept_waveform(16_000, load_audio(u.audio))
        rec.decode_stream(s)
        out[u.id] = " ".join(s.result.text.split())
    return out


def quality(model: Path, out: Path, utts, lm: str | None) -> dict:
    from speechtl.decoding.metrics import UtteranceResult, score
    from speechtl.inference.onnx import OnnxRecognizer
    from speechtl.inference.recognizer import Recognizer

    recs = {"torch": Recognizer.load(model), "onnx_fp32": OnnxRecognizer.load(out / "fp32"),
            "onnx_int8": OnnxRecognizer.load(out / "int8")}
    files = [u.audio for u in utts]
    rows, texts = {}, {}
    from speechtl.decoding.options import DecodeOptions

    # greedy even where the folder carries its own LM (its default decoding)
    for decoding, kw in (("greedy", {"options": DecodeOptions()}), ("lm", {"lm": lm}))[: 2 if lm else 1]:
        for name, rec in recs.items():
            hyps = rec.transcribe(files, **kw)
            texts[(name, decoding)] = hyps
            r = score([UtteranceResult(u.id, u.text, h, u.duration) for u, h in zip(utts, hyps)], normalize=rec.normalizer)
            same = sum(a == b for a, b in zip(hyps, texts[("torch", decoding)]))
            rows[f"{name} {decoding}"] = {"cer": round(r.cer, 4), "wer": round(r.wer, 4), "same_as_torch": f"{same}/{len(utts)}"}
    norm = recs["torch"].normalizer
    for name in ("fp32", "int8"):
        hyps = sherpa_hyps(out / name, utts)
        ours = dict(zip((u.id for u in utts), texts[(f"onnx_{name}", "greedy")]))
        r = score([UtteranceResult(u.id, u.text, hyps[u.id], u.duration) for u in utts], normalize=norm)
        vs = score([UtteranceResult(u.id, ours[u.id], hyps[u.id], u.duration) for u in utts], normalize=norm)
        # speechtl's ONNX path on each clip as sherpa-onnx hands it to the graph: unit variance,
        # which the graph brings to SHERPA_LEVEL; what differs beyond that is not the level
        levelled = [h if isinstance(h, str) else h.text
                    for h in (recs[f"onnx_{name}"].transcribe(_sherpa_levelled(u.audio), options=DecodeOptions())
                              for u in utts)]
        lv = score([UtteranceResult(u.id, o, hyps[u.id], u.duration) for u, o in zip(utts, levelled)], normalize=norm)
        rows[f"sherpa-onnx {name} greedy"] = {"cer": round(r.cer, 4), "wer": round(r.wer, 4),
                                              "cer_vs_speechtl_onnx": round(vs.cer, 4),
                                              "same_as_speechtl_onnx": f"{sum(hyps[u.id] == ours[u.id] for u in utts)}/{len(utts)}",
                                              "cer_vs_speechtl_onnx_levelled": round(lv.cer, 4),
                                              "same_as_speechtl_onnx_levelled":
                                                  f"{sum(hyps[u.id] == o for u, o in zip(utts, levelled))}/{len(utts)}"}
    return rows


def _sherpa_levelled(path) -> np.ndarray:
    from speechtl.data.audio import load_audio
    from speechtl.models.onnx_export import SHERPA_LEVEL

    w = load_audio(path)
    return ((w - w.mean()) / max(float(w.std()), 1e-5) * SHERPA_LEVEL).astype(np.float32)


def speed(recs: dict, files: list, seconds: float, rounds: int) -> dict:
    rows = {}
    for name, run in recs.items():
        run(files[:2])  # warm up
        best = min(_timed(run, files) for _ in range(rounds))
        rows[name] = {"x_real_time": round(seconds / best, 1), "wall_s": round(best, 2)}
    return rows


def _timed(fn, arg) -> float:
    t = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t


def joined_recording(utts, path: Path, seconds: float) -> Path:
    from speechtl.data.audio import load_audio

    pause = np.zeros(4_800, np.float32)
    with sf.SoundFile(str(path), "w", 16_000, 1, subtype="PCM_16") as f:
        written = 0
        while written < seconds * 16_000:
            for u in utts:
                a = np.concatenate([load_audio(u.audio), pause])[: int(seconds * 16_000) - written]
                f.write(a)
                written += a.size
                if written >= seconds * 16_000:
                    break
    return path


def wav2vec2_pipeline(out: Path, dims: str | None, utts, rounds: int, model: Path | None = None) -> dict:
    """speechtl torch, ONNX int8 (the CNN in int8, the default, and in float: ``--float-cnn``) and fp32,
    and transformers' pipeline unbatched, on the same
    files and model: a random wav2vec2 of ``LAYERSxWIDTH`` ``dims`` (speed only), or a trained
    ``model`` folder (finetune or scratch mode, exported to transformers as well; then each
    path's CER on the files too)."""
    import torch
    from transformers import pipeline

    from speechtl.data.audio import load_audio
    from speechtl.data.text import Normalizer, Vocabulary
    from speechtl.decoding.metrics import UtteranceResult, score
    from speechtl.encoders.registry import save_encoder
    from speechtl.encoders.testing import encoder_from_config, tiny_config
    from speechtl.inference.onnx import OnnxRecognizer
    from speechtl.inference.recognizer import Recognizer
    from speechtl.models.ctc import build_model
    from speechtl.models.model_dir import save_model_dir

    if model is None:
        layers, width = map(int, dims.split("x"))
        enc_dir, model_dir = out / f"w2v-{dims}-enc", out / f"w2v-{dims}"
        if not model_dir.exists():
            cfg = tiny_config("wav2vec2", hidden_size=width, num_hidden_layers=layers,
                              num_attention_heads=max(width // 64, 1), intermediate_size=4 * width,
                              conv_dim=(512,) * 7, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16)
            save_encoder(encoder_from_config(cfg), enc_dir)
            vocab = Vocabulary(["<pad>", "[UNK]", "|", *"abcdefghijklmnopqrstuvwxyz"])
            save_model_dir(build_model(str(enc_dir), "finetune", len(vocab)), vocab, Normalizer(), model_dir)
    else:
        model_dir = out / "trained"
        if not model_dir.exists():
            model_dir.symlink_to(model.resolve())
    for name, extra in (("onnx-int8", ["--quantize", "int8"]), ("onnx-int8-float-cnn", ["--quantize", "int8", "--float-cnn"]),
                        ("onnx-fp32", []), ("hf", None)):
        if not (out / f"{model_dir.name}-{name}").exists():
            args = ["--format", "hf"] if extra is None else ["--format", "onnx", *extra]
            st("export", str(model_dir), "--out", str(out / f"{model_dir.name}-{name}"), *args)
    pipe = pipeline("automatic-speech-recognition", model=str(out / f"{model_dir.name}-hf"), device="cpu")
    torch_rec = Recognizer.load(model_dir)
    int8 = OnnxRecognizer.load(out / f"{model_dir.name}-onnx-int8")
    int8_float_cnn = OnnxRecognizer.load(out / f"{model_dir.name}-onnx-int8-float-cnn")
    fp32 = OnnxRecognizer.load(out / f"{model_dir.name}-onnx-fp32")
    files = [u.audio for u in utts]
    seconds = sum(u.duration for u in utts)

    def plain(fs):
        return [pipe(load_audio(f))["text"] for f in fs]

    from speechtl.decoding.options import DecodeOptions

    greedy = DecodeOptions()  # as the pipeline decodes (a trained folder's own LM would beam-search)
    runs = {"pipeline batch_size=1": plain, "speechtl torch": lambda fs: torch_rec.transcribe(fs, options=greedy),
            "speechtl onnx fp32": lambda fs: fp32.transcribe(fs, options=greedy),
            "speechtl onnx int8, CNN in float (--float-cnn)": lambda fs: int8_float_cnn.transcribe(fs, options=greedy),
            "speechtl onnx int8": lambda fs: int8.transcribe(fs, options=greedy)}
    rows = speed(runs, files, seconds, rounds)
    base = rows["pipeline batch_size=1"]["x_real_time"]
    for r in rows.values():
        r["vs_pipeline"] = round(r["x_real_time"] / base, 2)
    if model is not None:  # the same model on every path: its CER on the files
        for name, run in runs.items():
            hyps = [h if isinstance(h, str) else h.text for h in run(files)]
            rows[name]["cer"] = round(score([UtteranceResult(u.id, u.text, h, u.duration) for u, h in zip(utts, hyps)],
                                            normalize=torch_rec.normalizer).cer, 4)
    rows["torch_threads"] = torch.get_num_threads()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a torch CTC model folder")
    ap.add_argument("--manifest", required=True, help="test manifest")
    ap.add_argument("--lm", help="an ARPA LM for the beam-search rows")
    ap.add_argument("--out", required=True, help="work folder (exports, recordings)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--command-runs", type=int, default=3)
    ap.add_argument("--long-minutes", type=float, default=60.0)
    ap.add_argument("--w2v-dims", help="LAYERSxWIDTH of a random wav2vec2 for the pipeline comparison, e.g. 12x768")
    ap.add_argument("--pipeline-on-model", action="store_true", help="the pipeline comparison on --model itself (a "
                    "finetune or scratch folder of a wav2vec2-family encoder, which exports to transformers)")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: quality,speed,commands,memory,pipeline")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    from speechtl.data.manifest import read_manifest

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    utts = read_manifest(args.manifest)
    skip = set(args.skip.split(","))
    res = {"load_before": os.getloadavg(), "cpus": os.cpu_count()}
    res["export"] = export(Path(args.model), out, args.lm)
    print(json.dumps(res["export"]), flush=True)
    if "quality" not in skip:
        res["quality"] = quality(Path(args.model), out, utts, args.lm)
        print(json.dumps(res["quality"], indent=1), flush=True)
    if "speed" not in skip:
        from speechtl.inference.onnx import OnnxRecognizer
        from speechtl.inference.recognizer import Recognizer

        recs = {"torch": Recognizer.load(args.model).transcribe, "onnx fp32": OnnxRecognizer.load(out / "fp32").transcribe,
                "onnx int8": OnnxRecognizer.load(out / "int8").transcribe}
        res["speed"] = speed(recs, [u.audio for u in utts], sum(u.duration for u in utts), args.rounds)
        print(json.dumps(res["speed"]), flush=True)
    if (args.w2v_dims or args.pipeline_on_model) and "pipeline" not in skip:
        res["pipeline"] = wav2vec2_pipeline(out, args.w2v_dims, utts, args.rounds,
                                            Path(args.model) if args.pipeline_on_model else None)
        print(json.dumps(res["pipeline"]), flush=True)
    if "commands" not in skip:
        five = joined_recording(utts, out / "five_s.wav", 5.0)
        res["commands_5s"] = {}
        for name, d in (("torch", args.model), ("onnx int8", str(out / "int8")), ("onnx fp32", str(out / "fp32"))):
            walls = [st("transcribe", d, str(five), "-q")[0] for _ in range(args.command_runs)]
            res["commands_5s"][name] = {"best_s": round(min(walls), 2), "runs_s": [round(w, 2) for w in walls]}
        print(json.dumps(res["commands_5s"]), flush=True)
    if "memory" not in skip:
        long = out / f"long_{args.long_minutes:g}min.wav"
        if not long.exists():
            joined_recording(utts, long, args.long_minutes * 60)
        res["memory"] = {}
        for name, d in (("onnx int8", str(out / "int8")),):
            _, line = st("transcribe", d, str(long), "-q", timed=True)
            rss_kb, wall = line.split()
            res["memory"][name] = {"peak_rss_mb": round(int(rss_kb) / 1024, 1), "wall_s": float(wall),
                                   "minutes": args.long_minutes}
        print(json.dumps(res["memory"]), flush=True)
    res["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
