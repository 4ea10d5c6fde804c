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
    if args.format == "onnx":
        from ..models.onnx_export import check_exportable, export_onnx

        model_dir, _ = check_exportable(args.model_dir, args.lang)  # a kind that cannot go is refused before torch loads
        lm, alpha, beta, width = args.lm, args.alpha, args.beta, args.beam_width
        if lm is None:  # the model folder's own LM and tuned weights go with it
            from ..decoding.options import DecodeOptions

            own = DecodeOptions.read(model_dir)
            if own.lm is not None:
                lm, alpha, beta, width = own.lm, own.alpha, own.beta, width or own.beam_width
        out = export_onnx(args.model_dir, args.out, quantize=args.quantize, lang=args.lang, lm=lm,
                          alpha=alpha, beta=beta, beam_width=width, float_layers=args.float_layers,
                          int8_cnn=args.int8_cnn)
        print(f"exported {'an int8' if args.quantize else 'a float32'} ONNX model, tokens.txt and speechtl-onnx.json to {out}")
        return 0
    if args.quantize or args.lm:
        raise ValueError("--quantize and --lm are for --format onnx")
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
    s = sub.add_parser("export", help="export a model as a transformers directory (--format hf) or ONNX (--format onnx)",
                       description="--format hf (default): a standard *ForCTC model plus Wav2Vec2Processor that "
                                   "transformers.pipeline('automatic-speech-recognition') loads (finetune/scratch/adapter "
                                   "models). An adapter=mms model exports as an MMS-style "
                                   "Wav2Vec2ForCTC with every language's adapter.<lang>.safetensors (model.load_adapter(lang), "
                                   "processor.tokenizer.set_target_lang(lang)); an adapter=lora model exports one language, "
                                   "its LoRA updates merged into the weights. "
                                   "--format onnx: every CTC model (frozen with its layer sum and head, finetune, scratch, "
                                   "adapter=lora for one language) as model.onnx (model.int8.onnx with --quantize int8) "
                                   "taking raw 16 kHz audio, with sherpa-onnx's tokens.txt and speechtl-onnx.json; "
                                   "speechtl transcribe/evaluate and speechtl.load() run the folder with onnxruntime, "
                                   "without torch. seq2seq models cannot be exported.")
    s.add_argument("model_dir")
    s.add_argument("--out", required=True)
    s.add_argument("--format", choices=("hf", "onnx"), default="hf", help="hf: a transformers directory; onnx: an ONNX folder")
    s.add_argument("--quantize", choices=("int8",), help="onnx: dynamic int8 quantisation of the matrix products")
    s.add_argument("--float-layers", type=_layer_list, default=None, metavar="I,J",
                   help="onnx with --quantize int8: transformer layers (0 = the first) to keep in float; '' keeps "
                        "none (default: 0 for Whisper-shaped encoders, whose int8 first layer cost whisper-base "
                        "0.0035 of its 0.0104 CER, and the bundled encoder 0.0045 of its 0.0123 CER against "
                        "sherpa-onnx on real Spanish; none for others)")
    cnn = s.add_mutually_exclusive_group()
    cnn.add_argument("--int8-cnn", dest="int8_cnn", action="store_const", const=True, default=None,
                     help="onnx with --quantize int8: write a wav2vec2-family CNN feature encoder as matrix products "
                          "and quantise it, all but its first layer; an error where it cannot be (the default does "
                          "this wherever it can)")
    cnn.add_argument("--float-cnn", dest="int8_cnn", action="store_const", const=False,
                     help="onnx with --quantize int8: keep the CNN feature encoder in float (ONNX Conv)")
    s.add_argument("--lm", help="onnx: an n-gram LM (.arpa) to copy into the folder as its default decoder (default: "
                   "the model folder's own, with its tuned weights, when training wrote one)")
    s.add_argument("--alpha", type=float, default=0.5, help="onnx with --lm: LM weight")
    s.add_argument("--beta", type=float, default=1.0, help="onnx with --lm: word insertion bonus")
    s.add_argument("--beam-width", type=int, help="onnx with --lm: beams kept (default 32)")
    s.add_argument("--lang", help="adapter models: the language loaded by default (mms) or the one exported (lora); "
                   "default: the one trained last")
    s.set_defaults(func=cmd_export)


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers such as 0 or 0,5, got {text!r}") from None
    if any(i < 0 for i in layers):
        raise argparse.ArgumentTypeError(f"layer numbers start at 0 (got {text!r})")
    return layers


def add_average(sub) -> None:
    s = sub.add_parser("average", help="average the weights of several models of one architecture",
                       description="Write a model whose weights are the element-wise mean of MODEL_DIRs' (same mode, "
                                   "head and vocabulary: e.g. the last checkpoints of one run, or runs with other seeds). "
                                   "Training does this itself with average_last=K.")
    s.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_average)
