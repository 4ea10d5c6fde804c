#!/usr/bin/env python
"""Install a pretraining run's encoder as the bundled default, with its model card.

Copies ``RUN/model/encoder`` (config, safetensors, preprocessor config) to ``--dest`` and
writes ``README.md`` there from ``RUN/train_summary.json`` and the run's dev scoring.
"""

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

from safetensors.torch import load_file, save_file

from speechtl.manifest import read_manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run", help="output folder of the pretraining `speechtl train` run")
    p.add_argument("--dest", required=True)
    p.add_argument("--hardware", default="", help="what it was trained on, for the model card")
    p.add_argument("--train", help="training manifest, if not where the run's config says")
    args = p.parse_args()
    run, dest = Path(args.run), Path(args.dest)
    summary = json.loads((run / "train_summary.json").read_text())
    dev = json.loads((run / "dev" / "summary.json").read_text())
    cfg = summary["config"]
    train = read_manifest(args.train or cfg["train"], check_files=False)
    langs = Counter(u.lang for u in train)
    hours = Counter()
    for u in train:
        hours[u.lang] += u.duration / 3600
    voices = {u.speaker.split("-")[-3] for u in train if u.speaker}
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copyfile(run / "model" / "encoder" / name, dest / name)
    # float16 storage halves the file (the model computes in float32 after loading)
    weights = load_file(str(run / "model" / "encoder" / "model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in weights.items()}, str(dest / "model.safetensors"), metadata={"format": "pt"})
    enc_cfg = json.loads((dest / "config.json").read_text())
    params = sum(v.numel() for v in weights.values())
    cnn_frozen = cfg.get("freeze_feature_encoder", True) is not False
    lines = [
        "# speechtl default encoder",
        "",
        f"A small wav2vec2-architecture encoder ({enc_cfg['num_hidden_layers']} transformer layers, "
        f"{enc_cfg['hidden_size']} wide, {params / 1e6:.2f}M parameters, stored as float16), pretrained by "
        "`recipes/pretrain` with multilingual phoneme CTC on speech synthesised by espeak-ng. "
        "`encoder=default` loads it; `transformers.AutoModel.from_pretrained` loads this folder like any wav2vec2 checkpoint.",
        "",
        "| | |",
        "|---|---|",
        f"| languages | {', '.join(f'{k} ({hours[k]:.2f} h)' for k in sorted(langs))} |",
        f"| training audio | {sum(hours.values()):.2f} h, {len(train)} utterances |",
        f"| voices | {len(voices)} espeak-ng variants ({', '.join(sorted(voices))}), random rate and pitch per speaker profile |",
        "| objective | CTC on IPA phonemes printed by espeak-ng (stress marks removed); one shared phoneme set for all languages |",
        f"| CNN feature encoder | {'kept at its random initialisation (frozen); only the projection and transformer were trained' if cnn_frozen else 'trained'} |",
        f"| steps | {summary['steps']} (batches of at most {cfg['max_batch_seconds']} s of padded audio) |",
        f"| wall time | {summary['wall_time_s'] / 60:.1f} min |",
        f"| hardware | {args.hardware or summary['device']} |",
        f"| held-out phoneme error rate | {dev['cer']:.3f} (PER over {dev['utterances']} utterances, {dev['audio_seconds'] / 60:.1f} min, "
        "same languages, texts and speaker profiles not seen in training) |",
        "",
        "Reserved for transfer evaluation and never used here: Czech, Italian, Polish, Swahili, Dutch, Turkish.",
        "Reproduce with `recipes/pretrain/run.sh` (see its README).",
        "",
    ]
    (dest / "README.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"installed the encoder in {dest}")


if __name__ == "__main__":
    main()
