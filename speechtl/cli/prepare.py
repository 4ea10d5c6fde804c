"""``speechtl prepare`` and ``speechtl synth``: corpora into manifests."""

from __future__ import annotations

from pathlib import Path

from .common import int_range


def cmd_prepare(args) -> int:
    from ..data.corpora.importers import PrepareOptions, check_output_paths, output_paths, prepare, write_prepared

    opts = PrepareOptions(
        format=args.format, audio_column=args.audio_column, text_column=args.text_column,
        speaker_column=args.speaker_column, id_column=args.id_column, min_duration=args.min_duration,
        max_duration=args.max_duration, max_minutes=args.max_minutes, on_bad_audio=args.on_bad_audio, dev_fraction=args.dev_fraction,
        dev_by_speaker=args.dev_by_speaker, seed=args.seed, lang=args.lang, absolute_paths=args.absolute_paths,
    )
    # outputs against each other and the source now, before the corpus is read; the audio files once it is
    check_output_paths(output_paths(args.out, args.dev_out, args.skip_report, dev=args.dev_fraction > 0,
                                    skipped=args.on_bad_audio == "skip"), [args.source])
    result = prepare(args.source, opts)
    written = write_prepared(result, args.out, dev_out=args.dev_out, skip_report=args.skip_report, source=args.source)
    hours = sum(u.duration for u in result.utterances) / 3600
    print(f"wrote {len(result.utterances)} utterances ({hours:.3f} h) to {args.out}")
    if result.dev:
        print(f"wrote {len(result.dev)} dev utterances to {written[1]}")
    if result.dropped_duration:
        print(f"dropped {result.dropped_duration} clip(s) outside the duration limits")
    if result.skipped:
        print(f"skipped {len(result.skipped)} bad audio file(s); see the report in {written[-1]}")
    return 0


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


def add_prepare(sub) -> None:
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


def add_synth(sub) -> None:
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
    s.add_argument("--rate", type=int_range, default=(130, 200), metavar="LO-HI", help="speaking rates to draw from, words per minute (default 130-200)")
    s.add_argument("--pitch", type=int_range, default=(30, 70), metavar="LO-HI", help="pitches to draw from, espeak's 0-99 scale (default 30-70)")
    s.add_argument("--variants", help="comma-separated espeak-ng voice variants to draw speakers from (default: 17 variants)")
    s.add_argument("--exclude-variants", help="comma-separated variants never to use (e.g. those held out for a test set)")
    s.add_argument("--noise-snr-db", type=float, help="add white noise at this SNR")
    s.add_argument("--prefix", default="", help="prefix for utterance ids")
    s.add_argument("--workers", type=int, default=None, help="parallel espeak-ng processes (default: CPU count)")
    s.set_defaults(func=cmd_synth)
