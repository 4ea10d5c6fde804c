"""``speechtl train``, ``average`` and ``export``: making and packaging models."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import start_up


def cmd_train(args) -> int:
    with start_up(args):
        from ..training.config import load_train_config
        from ..training.train import train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]  # no YAML: everything is key=value
    cfg = load_train_config(config, overrides)
    summary = train(cfg, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports for all
        return 0
    best = "" if summary["best_dev_cer"] is None else f", best dev WER {summary['best_dev_wer']:.3f} CER {summary['best_dev_cer']:.3f} at step {summary['best_step']}"
    print(f"trained {summary['steps']} steps in {summary['wall_time_s']:.0f} s{best}; model in {summary['model_dir']}")
    return 0


def cmd_average(args) -> int:
    from ..models.average import average_model_dirs

    out = average_model_dirs(args.model_dirs, args.out)
    print(f"averaged {len(args.model_dirs)} models into {out}")
    return 0


def cmd_export(args) -> int:
    from ..models.export import export_hf

    out = export_hf(args.model_dir, args.out, lang=args.lang)
    print(f"exported a transformers model and processor to {out}")
    return 0


def _train_description() -> str:
    from ..training.config import config_help

    return "Train a CTC recogniser. Keys from CONFIG.yaml, overridden by key=value arguments:\n\n" + config_help()


def add_train(sub) -> None:
    s = sub.add_parser("train", help="adapt an encoder: frozen | finetune | scratch | adapter", formatter_class=argparse.RawDescriptionHelpFormatter,
                       describe=_train_description)
    s.add_argument("config", nargs="?", help="YAML config (optional if every key is given as key=value)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. mode=finetune max_steps=500")
    s.set_defaults(func=cmd_train)


def add_export(sub) -> None:
    s = sub.add_parser("export", help="export a finetune/scratch/adapter model as a transformers model directory",
                       description="Write a standard *ForCTC model plus Wav2Vec2Processor that transformers.pipeline("
                                   "'automatic-speech-recognition') loads. An adapter=mms model exports as an MMS-style "
                                   "Wav2Vec2ForCTC with every language's adapter.<lang>.safetensors (model.load_adapter(lang), "
                                   "processor.tokenizer.set_target_lang(lang)); an adapter=lora model exports one language, "
                                   "its LoRA updates merged into the weights.")
    s.add_argument("model_dir")
    s.add_argument("--out", required=True)
    s.add_argument("--lang", help="adapter models: the language loaded by default (mms) or the one exported (lora); "
                   "default: the one trained last")
    s.set_defaults(func=cmd_export)


def add_average(sub) -> None:
    s = sub.add_parser("average", help="average the weights of several models of one architecture",
                       description="Write a model whose weights are the element-wise mean of MODEL_DIRs' (same mode, "
                                   "head and vocabulary: e.g. the last checkpoints of one run, or runs with other seeds). "
                                   "Training does this itself with average_last=K.")
    s.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_average)
