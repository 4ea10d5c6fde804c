#!/usr/bin/env python
"""Install a pretraining run's encoder as the bundled default, with its model card.

Copies ``RUN/model/encoder`` (config, safetensors as float16, preprocessor config) to
``--dest`` and writes ``README.md`` there: the data by source (hours, languages,
licences), the objective, the compute, and the held-out phoneme error rates that stage 5
wrote (``--eval DIR``: ``dev-synth.json`` and ``dev-real.json``).
"""

import argparse
import csv
import json
import shutil
from collections import defaultdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from speechtl.data.manifest import read_manifest

LICENCES = {
    "espeak-ng": "espeak-ng (GPL-3.0), texts from wordfreq word lists (CC BY-SA 4.0)",
    "MBROLA": "MBROLA voices through espeak-ng (each voice's own licence: free use for synthesis with mbrola; "
              "the databases are not part of this encoder)",
    "asterisk": "Asterisk core sound prompts, Debian asterisk-core-sounds-{en,es,fr,ru} (CC BY-SA 3.0)",
    "tuxpaint": "Tux Paint stamp descriptions, Debian tuxpaint-stamps-default (GPL-2)",
    "pocketsphinx": "CMU Sphinx test recordings, Debian pocketsphinx-testdata (BSD)",
}


def source_of(u) -> str:
    if u.id.startswith(("asterisk-", "tuxpaint-", "pocketsphinx-")):
        return u.id.split("-")[0]
    return "MBROLA" if u.lang.startswith("mb-") else "espeak-ng"


def _training_hours(run: Path, summary: dict) -> float:
    """Training time over every session of a resumed run (the metrics log's last elapsed_s);
    the summary's wall time covers only the last process."""
    log = run / "metrics.csv"
    if log.is_file():
        rows = list(csv.DictReader(log.open()))
        if rows and rows[-1].get("elapsed_s"):
            return float(rows[-1]["elapsed_s"]) / 3600
    return summary["wall_time_s"] / 3600


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="output folder of the pretraining `speechtl train` run")
    p.add_argument("--dest", required=True)
    p.add_argument("--eval", help="folder with dev-synth.json and dev-real.json (default: RUN/../eval)")
    p.add_argument("--hardware", default="", help="what it was trained on, for the model card")
    p.add_argument("--cpu-hours", type=float, help="total CPU hours, when it ran on CPUs over several sessions")
    p.add_argument("--train", help="training manifest, if not where the run's config says")
    args = p.parse_args()
    run, dest = Path(args.run), Path(args.dest)
    summary = json.loads((run / "train_summary.json").read_text())
    cfg = summary["config"]
    evals = Path(args.eval) if args.eval else run.parent / "eval"
    scores = {name: json.loads((evals / f"{name}.json").read_text()) for name in ("dev-synth", "dev-real")
              if (evals / f"{name}.json").is_file()}
    train = read_manifest(args.train or cfg["train"], check_files=False)
    hours, langs, speakers = defaultdict(float), defaultdict(set), defaultdict(set)
    for u in train:
        src = source_of(u)
        hours[src] += u.duration / 3600
        langs[src].add(u.lang.removeprefix("mb-"))
        speakers[src].add(u.speaker)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copyfile(run / "model" / "encoder" / name, dest / name)
    # float16 storage halves the file (the model computes in float32 after loading)
    weights = load_file(str(run / "model" / "encoder" / "model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in weights.items()}, str(dest / "model.safetensors"), metadata={"format": "pt"})
    enc = json.loads((dest / "config.json").read_text())
    params = sum(v.numel() for v in weights.values())
    teacher = cfg.get("teacher")
    if enc.get("model_type") == "whisper":
        start = Path(cfg["encoder"]).name
        arch = (f"A Whisper-architecture encoder (log-mel front end, two convolutions, {enc['encoder_layers']} transformer "
                f"layers {enc['d_model']} wide, {params / 1e6:.2f}M parameters, stored as float16): the encoder of OpenAI's "
                f"{start} (MIT licence), trained further by `recipes/pretrain` on synthesised and real speech in many "
                "languages. `encoder=default` loads it; `transformers.WhisperModel.from_pretrained` loads this folder "
                "(the encoder; there is no decoder).")
        origin = [f"| starting point | {start}'s encoder (OpenAI, MIT licence; trained by OpenAI on English speech), "
                  "fetched from PyPI by `tools/fetch_encoder.sh` |",
                  f"| front end | {'trained' if cfg.get('freeze_feature_encoder') is False else 'kept as it was'} |"]
    else:
        arch = (f"A small wav2vec2-architecture encoder ({len(enc['conv_dim'])}-layer CNN of {max(enc['conv_dim'])} channels "
                f"at most, {enc['num_hidden_layers']} transformer layers {enc['hidden_size']} wide, {params / 1e6:.2f}M "
                "parameters, stored as float16), pretrained by `recipes/pretrain` on synthesised and real speech. "
                "`encoder=default` loads it; `transformers.AutoModel.from_pretrained` loads this folder like any "
                "wav2vec2 checkpoint.")
        origin = [f"| CNN feature encoder | {'trained' if cfg.get('freeze_feature_encoder') is False else 'frozen at random initialisation'} |"]
    lines = [
        "# speechtl default encoder",
        "",
        arch,
        "",
        "| source | hours | languages or voices | speakers |",
        "|---|---:|---|---:|",
    ]
    for src in sorted(hours, key=lambda s: -hours[s]):
        lines.append(f"| {LICENCES.get(src, src)} | {hours[src]:.2f} | {', '.join(sorted(langs[src]))} | {len(speakers[src])} |")
    lines += [
        f"| **total** | **{sum(hours.values()):.2f}** | | |",
        "",
        "| | |",
        "|---|---|",
        "| objective | CTC on IPA phonemes printed by espeak-ng (stress marks removed; one phoneme set for all languages)"
        + (f", plus prediction of {teacher}'s encoder hidden states {cfg.get('teacher_layers') or '(three, spread)'} "
           f"from its own {cfg.get('student_layers') or '(spread the same way)'} (L1 + cosine, weight "
           f"{cfg.get('distill_weight', 1.0)}; the teacher hears the clean clip)" if teacher else "") + " |",
        f"| augmentation | {cfg.get('augment', 0):.0%} of clips: reverberation, telephone band and 8 kHz mu-law, MP3/Vorbis, "
        "noise at 0-30 dB SNR, gain (speechtl.data.augment) |",
        *origin,
        f"| updates | {summary['steps']} of at most {cfg['max_batch_seconds']} s of padded audio "
        f"({summary['audio_hours_seen']:.1f} h of audio seen) |",
        f"| compute | {args.hardware or summary['device']}; {_training_hours(run, summary):.2f} h of training"
        + (f", {args.cpu_hours:.1f} CPU hours" if args.cpu_hours else "") + " |",
    ]
    for name, label in (("dev-synth", "synthesised speech, unseen texts and speaker profiles"),
                        ("dev-real", "real recordings held out from training (unseen texts)")):
        if name in scores:
            s = scores[name]
            lines.append(f"| held-out phoneme error rate, {label} | {s['cer']:.3f} ({s['utterances']} utterances, "
                         f"{s['audio_seconds'] / 60:.1f} min) |")
    lines += [
        "",
        "Reserved for transfer evaluation and never used here, from any source: Czech, Italian, Polish, Swahili, "
        "Dutch, Turkish.",
        "Reproduce with `recipes/pretrain/run.sh` (see its README).",
        "",
    ]
    (dest / "README.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"installed the encoder in {dest}")


if __name__ == "__main__":
    main()
