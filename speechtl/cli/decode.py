"""``speechtl evaluate``, ``transcribe``, ``align``, ``lm`` and ``zeroshot``: using models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_common, at_least_one, floats, number, positive_float, start_up
from .outputs import output_names


def cmd_evaluate(args) -> int:
    with start_up(args):
        from ..data.manifest import read_manifest
        from ..inference.onnx import load

        rec = load(args.model_dir, device=args.device, lang=args.lang)  # an ONNX folder runs without torch
    set_ctc_weight(args, rec)
    utts = read_manifest(args.manifest, check_files=False)
    # artefacts of `--json DIR/x.json` go to DIR/x/, so that two test sets scored into one folder keep theirs apart
    out_dir = Path(args.out_dir) if args.out_dir else (Path(args.json).with_suffix("") if args.json else Path(args.model_dir) / "eval")
    summary = rec.evaluate(utts, out_dir=out_dir, progress=not args.quiet, on_bad_audio=args.on_bad_audio,
                           chunk_length_s=args.chunk_length_s, max_batch_seconds=args.batch_seconds,
                           options=decode_options(args, rec), vad=vad_options(args))
    if args.json:
        from ..core.io import write_json

        write_json(args.json, summary)
    print(json.dumps({k: summary[k] for k in ("wer", "cer", "utterances", "audio_seconds")}
                     | ({"skipped": len(summary["skipped"])} if "skipped" in summary else {})))
    return 0


def decode_options(args, rec):
    """The decoding flags (``--greedy``, ``--lm``, ``--beam-width``, ``--alpha``, ``--beta``,
    and for ``transcribe`` ``--hotwords`` and ``--hotword-weight``) laid over the model
    folder's own decoding (its LM and tuned weights, when training wrote them)."""
    from ..decoding.options import DecodeOptions

    hotwords = [w for w in (getattr(args, "hotwords", None) or "").split(",") if w.strip()]
    if args.greedy:
        if args.lm or args.beam_width or hotwords:
            raise ValueError("--greedy decodes without beam search: drop --lm, --beam-width and --hotwords, or --greedy")
        return DecodeOptions()
    return rec.decode_options(None, args.lm, args.beam_width, args.alpha, args.beta, hotwords,
                              getattr(args, "hotword_weight", 10.0))


def ctc_weight(text: str) -> float | str:
    """``--ctc-weight``: ``off``, or a number in [0, 1]."""
    if text == "off":
        return text
    w = number(text)
    if not 0 <= w <= 1:
        raise argparse.ArgumentTypeError(f"must be 'off' or a number in [0, 1] (got {text})")
    return w


def set_ctc_weight(args, rec) -> None:
    """``--ctc-weight`` over the folder's own weight of hybrid CTC/attention decoding."""
    if args.ctc_weight is None:
        return
    if getattr(rec, "ctc", None) is None:
        raise ValueError(f"--ctc-weight: {args.model_dir} has no CTC head for hybrid decoding (a mode=seq2seq folder "
                         "trained with seq2seq_ctc=true has one)")
    rec.ctc_weight = None if args.ctc_weight == "off" else float(args.ctc_weight)


def add_ctc_weight(s) -> None:
    s.add_argument("--ctc-weight", type=ctc_weight, default=None, metavar="W|off",
                   help="seq2seq folders with a CTC head (seq2seq_ctc=true): the CTC weight of hybrid decoding, over "
                        "the one chosen on dev at training (speechtl.json's ctc_weight); off = Whisper's decoder alone")


def vad_options(args):
    """``--vad``, ``--vad-threshold`` and ``--min-silence-s`` as a ``VadOptions`` (None: off)."""
    from ..inference.vad import VadOptions

    if args.vad == "off":
        return None
    return VadOptions(threshold=args.vad_threshold, min_silence_s=args.min_silence_s)


def _fraction(text: str) -> float:
    import argparse

    x = number(text)
    if not 0.0 < x < 1.0:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1 (got {x:g})")
    return x


def _seconds(text: str) -> float:
    import argparse

    x = number(text)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must not be negative (got {x:g})")
    return x


def add_vad(s) -> None:
    """The flags that say how recordings longer than ``--chunk-length-s`` are cut."""
    from ..inference.vad import VadOptions

    d = VadOptions()
    s.add_argument("--vad", choices=["on", "off"], default="on",
                   help="recordings longer than --chunk-length-s: cut at pauses found by voice activity detection "
                        "(Silero VAD), skipping stretches without speech (on, the default), or decoded in fixed "
                        "overlapping windows (off)")
    s.add_argument("--vad-threshold", type=_fraction, default=d.threshold,
                   help=f"speech probability at and above which a 32 ms frame counts as speech (default {d.threshold:g})")
    s.add_argument("--min-silence-s", type=_seconds, default=d.min_silence_s,
                   help=f"a pause must last this long (seconds) to end a stretch of speech (default {d.min_silence_s:g})")


def cmd_transcribe(args) -> int:
    with start_up(args):
        from ..core.io import write_text
        from ..inference.onnx import load
        from ..inference.transcribe import collect_inputs, render

    items = collect_inputs(args.paths)
    if not items:
        print("speechtl transcribe: error: no audio files found", file=sys.stderr)
        return 1
    if args.format in ("srt", "vtt") and args.out is None and len(items) > 1:
        print(f"speechtl transcribe: error: --format {args.format} with several inputs needs --out DIR", file=sys.stderr)
        return 2
    names = output_names(items, args.format) if args.out else None
    if names is not None and not args.overwrite:
        existing = [str(Path(args.out) / n) for n in names if (Path(args.out) / n).exists()]
        if existing:
            print(f"speechtl transcribe: error: --no-overwrite: {len(existing)} output file(s) exist already:\n  "
                  + "\n  ".join(existing[:10]) + ("\n  ..." if len(existing) > 10 else ""), file=sys.stderr)
            return 1
    with start_up(args):
        rec = load(args.model_dir, device=args.device, lang=args.lang)  # an ONNX folder runs without torch
    set_ctc_weight(args, rec)
    tr = rec.transcriber(args.chunk_length_s, args.stride_length_s, args.batch_seconds, streams=args.streams,
                         options=decode_options(args, rec), vad=vad_options(args))
    failed = 0
    for i, t in tr.run_indexed(items, progress=not args.quiet):
        if t.error is not None:
            failed += 1
            print(f"speechtl transcribe: error: {t.path}: {t.error}", file=sys.stderr)
            continue
        if names is not None:
            write_text(Path(args.out) / names[i], render(t, args.format))
        elif args.format == "json":
            print(json.dumps(t.to_dict(), ensure_ascii=False), flush=True)
        elif args.format == "txt":
            print(f"{t.path}\t{t.text}" if len(items) > 1 else t.text, flush=True)
        else:
            print(render(t, args.format), end="", flush=True)
    if failed or len(items) > 1:
        print(f"transcribed {len(items) - failed} of {len(items)} file(s); {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_align(args) -> int:
    with start_up(args):
        from ..core.io import write_text
        from ..decoding.decoders import align_words
        from ..inference.recognizer import Recognizer
        from ..inference.transcribe import Item, Transcript, render, segments_from_words

        rec = Recognizer.load(args.model_dir, device=args.device, lang=args.lang)
    text = args.text
    if Path(text).is_file():
        text = Path(text).read_text(encoding="utf-8")
    text = rec.normalizer(text)
    item = Item(args.audio, args.audio)
    from ..decoding.options import DecodeOptions

    # alignment needs the log-probabilities only
    tr = rec.transcriber(args.chunk_length_s, options=DecodeOptions(), vad=vad_options(args))
    duration = item.duration()
    log_probs, breaks = tr.long_log_probs(item, duration)
    words = align_words(log_probs, text, rec.vocab, tr.frame_s, where=args.audio)
    t = Transcript(args.audio, " ".join(w.word for w in words), round(duration, 3),
                   segments_from_words(words, breaks=breaks))
    out = render(t, args.format)
    if args.out:
        write_text(args.out, out)
    else:
        print(out, end="")
    return 0


def cmd_lm_build(args) -> int:
    from ..decoding.lm import read_sentences, wordlist_sentences, write_arpa

    norm = None
    if args.model:  # only then: reading a model directory imports torch
        from ..models.model_dir import load_model_normalizer

        norm = load_model_normalizer(args.model, args.lang)
    lines = []
    for text in args.text:
        lines += read_sentences(text, norm)
    words = wordlist_sentences(args.wordlist, args.wordlist_size, norm) if args.wordlist else []
    if not lines:
        raise ValueError("lm build needs TEXT (sentences for the n-grams); --wordlist only adds words")
    out = write_arpa(lines, args.out, order=args.order, extra_words=words)
    print(f"wrote a {args.order}-gram modified Kneser-Ney LM of {len(lines)} sentences"
          + (f" and {len(words)} listed words" if words else "") + f" to {out}")
    return 0


def cmd_lm_tune(args) -> int:
    if not Path(args.lm).is_file():
        raise FileNotFoundError(f"{args.lm}: language model not found")
    with start_up(args):
        from ..data.manifest import read_manifest
        from ..inference.recognizer import Recognizer

        rec = Recognizer.load(args.model_dir, device=args.device, lang=args.lang)
    result = rec.tune_lm(read_manifest(args.manifest, check_files=False), args.lm, args.alphas, args.betas,
                         args.beam_width, progress=not args.quiet)
    if args.json:
        from ..core.io import write_json

        write_json(args.json, result)
    best, greedy = result["best"], result["greedy"]
    print(f"best on {result['utterances']} utterances: --alpha {best['alpha']:g} --beta {best['beta']:g}  "
          f"WER {best['wer']:.4f} CER {best['cer']:.4f} (greedy WER {greedy['wer']:.4f} CER {greedy['cer']:.4f})")
    return 0


def cmd_zeroshot(args) -> int:
    from ..core.distributed import pick_device
    from ..data.manifest import read_manifest
    from ..inference.zeroshot import whisper_zero_shot

    utts = read_manifest(args.manifest)
    out_dir = Path(args.out_dir) if args.out_dir else None
    summary = whisper_zero_shot(args.model, utts, language=args.language, batch_size=args.batch_size,
                                device=str(pick_device(args.device)), progress=not args.quiet, out_dir=out_dir)
    if args.json:
        from ..core.io import write_json

        write_json(args.json, summary)
    print(json.dumps({k: summary[k] for k in ("wer", "cer", "utterances", "audio_seconds")}))
    return 0


def add_evaluate(sub) -> None:
    s = sub.add_parser("evaluate", help="WER/CER of a model on a manifest", description="Decode a manifest as the model folder says (its word LM and tuned weights when "
                       "training wrote them; else greedy) and write hyps.jsonl, errs.txt and summary.json.")
    s.add_argument("model_dir")
    s.add_argument("manifest")
    s.add_argument("--json", help="write the summary JSON here (wer, cer, utterances, audio_seconds, ...)")
    s.add_argument("--out-dir", help="folder for hyps.jsonl/errs.txt/summary.json (default: DIR/x/ for --json DIR/x.json, "
                   "or MODEL_DIR/eval)")
    s.add_argument("--device", default="auto")
    s.add_argument("--on-bad-audio", choices=["error", "skip"], default="error",
                   help="unreadable or missing audio: stop naming every such file (error), or leave them out of the "
                        "score and list them under 'skipped' in summary.json (skip)")
    s.add_argument("--greedy", action="store_true", help="greedy decoding, leaving out the word LM a model folder "
                   "carries (decoding.json, written by training; see `speechtl train --help`, key lm)")
    s.add_argument("--lm", help="decode with beam search and this n-gram LM (.arpa; `speechtl lm build` makes one) "
                   "instead of the model folder's own")
    s.add_argument("--beam-width", type=at_least_one, default=None, help="beam search with this width (default: the "
                   "model folder's decoding; greedy, or 32 with --lm, for a folder without one)")
    s.add_argument("--alpha", type=float, default=None, help="LM weight (default: the folder's tuned one, or 0.5)")
    s.add_argument("--beta", type=float, default=None, help="word insertion bonus (default: the folder's tuned one, or 1.0)")
    add_ctc_weight(s)
    s.add_argument("--chunk-length-s", type=positive_float, default=30.0, help="longer recordings are decoded in pieces of "
                   "at most this length")
    add_vad(s)
    s.add_argument("--batch-seconds", type=positive_float, default=None, help="cap on padded audio seconds per batch (default: 10 on CPU, 300 on GPU)")
    s.add_argument("--lang", help="language of a model trained with mode=adapter (default: the one trained last); "
                   "an error lists the languages the model has")
    s.set_defaults(func=cmd_evaluate)


def add_transcribe(sub) -> None:
    s = sub.add_parser("transcribe", help="transcribe audio files, folders or manifests",
                       description="Transcribe audio files, folders (searched recursively) or .jsonl manifests. Files that "
                                   "fail are reported and the rest carry on; the exit status is 1 if any failed.")
    s.add_argument("model_dir")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--format", choices=["txt", "json", "srt", "vtt"], default="txt",
                   help="txt; json (text, segments and words with start/end seconds and confidence); srt; vtt")
    s.add_argument("--out", metavar="DIR", help="write one file per input here (default: stdout)")
    s.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=True,
                   help="with --out: replace transcripts already there (the default); --no-overwrite refuses, before "
                        "any work, naming every output file that exists")
    s.add_argument("--chunk-length-s", type=positive_float, default=30.0, help="longer audio is decoded in pieces of at "
                   "most this length")
    s.add_argument("--stride-length-s", type=float, default=None, help="with --vad off: overlap on each side of a window "
                   "(default: chunk/6)")
    add_vad(s)
    s.add_argument("--batch-seconds", type=positive_float, default=None, help="cap on padded audio seconds per batch (default: 10 on CPU, 300 on GPU)")
    s.add_argument("--streams", type=at_least_one, default=None,
                   help="CPU: batches of short files run at once, each on one thread (default: one per torch thread, "
                        "at most 8; 1 = one batch at a time on all threads); ignored on a GPU")
    s.add_argument("--greedy", action="store_true", help="greedy decoding, leaving out the word LM a model folder "
                   "carries (decoding.json, written by training; see `speechtl train --help`, key lm)")
    s.add_argument("--lm", help="n-gram LM (.arpa; kenlm binary with kenlm installed) for beam search, instead of the "
                   "model folder's own")
    s.add_argument("--alpha", type=float, default=None, help="LM weight (default: the folder's tuned one, or 0.5)")
    s.add_argument("--beta", type=float, default=None, help="word insertion bonus (default: the folder's tuned one, or 1.0)")
    s.add_argument("--beam-width", type=at_least_one, default=None, help="beam search with this width (default: the "
                   "model folder's decoding; greedy, or 32 with --lm, for a folder without one)")
    s.add_argument("--hotwords", help="comma-separated words to favour in beam search")
    s.add_argument("--hotword-weight", type=float, default=10.0)
    add_ctc_weight(s)
    s.add_argument("--device", default="auto")
    s.add_argument("--lang", help="language of a model trained with mode=adapter (default: the one trained last); "
                   "an error lists the languages the model has")
    s.set_defaults(func=cmd_transcribe)


def add_align(sub) -> None:
    s = sub.add_parser("align", help="word times for a known transcript (CTC forced alignment)",
                       description="Align TEXT (a string, or a file holding it) to AUDIO and write word and segment times.")
    s.add_argument("model_dir")
    s.add_argument("audio")
    s.add_argument("text")
    s.add_argument("--format", choices=["json", "srt", "vtt", "txt"], default="json")
    s.add_argument("--out", metavar="FILE", help="write here (default: stdout)")
    s.add_argument("--chunk-length-s", type=positive_float, default=30.0, help="longer audio is run in pieces of at most "
                   "this length")
    add_vad(s)
    s.add_argument("--device", default="auto")
    s.add_argument("--lang", help="language of a model trained with mode=adapter (default: the one trained last); "
                   "an error lists the languages the model has")
    s.set_defaults(func=cmd_align)


def add_lm(sub) -> None:
    s = sub.add_parser("lm", help="n-gram language models for beam search", description="n-gram language models.")
    lm_sub = s.add_subparsers(dest="lm_command", metavar="ACTION", required=True)
    b = lm_sub.add_parser("build", help="build an ARPA model (interpolated modified Kneser-Ney)",
                          description="Build a word n-gram ARPA model from TEXT (one sentence per line, or a .jsonl manifest's texts).")
    b.add_argument("text", nargs="+", help="text files or manifests (one or more)")
    b.add_argument("--wordlist", metavar="LANG", help="add the language's most frequent words (wordfreq) to the "
                   "vocabulary, at the unigram level, so that words absent from TEXT can be recognised")
    b.add_argument("--wordlist-size", type=int, default=50_000, help="how many words --wordlist adds (most frequent first)")
    b.add_argument("--order", type=int, default=3)
    b.add_argument("--out", required=True, metavar="LM.arpa")
    b.add_argument("--model", metavar="MODEL_DIR", help="normalise the text as this model's transcripts are (default: the standard normaliser)")
    b.add_argument("--lang", help="with --model, an adapter model's language whose normaliser to use (default: the one trained last)")
    b.set_defaults(func=cmd_lm_build)
    add_common(b)
    t = lm_sub.add_parser("tune", help="search the LM weight (alpha) and word bonus (beta) on a dev set",
                          description="Decode DEV with beam search and LM for every alpha x beta pair (the model runs "
                                      "once; each pair re-decodes its output) and print the pair with the lowest WER.")
    t.add_argument("model_dir")
    t.add_argument("manifest", metavar="DEV.jsonl")
    t.add_argument("--lm", required=True, help="n-gram LM (.arpa; kenlm binary with kenlm installed)")
    t.add_argument("--alphas", type=floats, default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5], help="LM weights to try (comma-separated)")
    t.add_argument("--betas", type=floats, default=[0.0, 0.5, 1.0, 2.0, 3.0], help="word bonuses to try (comma-separated)")
    t.add_argument("--beam-width", type=at_least_one, default=32)
    t.add_argument("--json", help="write every pair's WER and CER here")
    t.add_argument("--device", default="auto")
    t.add_argument("--lang", help="language of a model trained with mode=adapter (default: the one trained last)")
    t.set_defaults(func=cmd_lm_tune)
    add_common(t)


def add_zeroshot(sub) -> None:
    s = sub.add_parser("zeroshot", help="score Whisper's own decoder, unadapted, on a manifest (a baseline)",
                       description="Transcribe a manifest with an unadapted Whisper model (greedy, language and "
                                   "transcribe tokens forced) and score it with speechtl's normaliser and metrics: "
                                   "what a user gets without adapting. Writes hyps.jsonl, errs.txt, summary.json.")
    s.add_argument("model", help="a transformers Whisper directory, a fetched name (whisper-base) or a hub id")
    s.add_argument("manifest")
    s.add_argument("--language", help="Whisper language code (cs, it, ...); default: detected")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--json", help="write the summary JSON here")
    s.add_argument("--out-dir", help="folder for hyps.jsonl/errs.txt/summary.json")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_zeroshot)
