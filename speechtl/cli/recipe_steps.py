"""The steps the corpus recipes (``recipes/commonvoice``, ``fleurs``, ``librilight``) share
after training: an n-gram LM cased for the model, scoring several sets with one model load
(greedy and with the LM, its weights chosen on a dev set), and the results table.

Scoring writes what ``speechtl evaluate`` writes (``hyps.jsonl``, ``errs.txt``,
``summary.json`` per set); loading the model, and the LM, once for every set and decoder is
what it adds. Sets already scored are left as they are, so a rerun picks up where it stopped.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from ..core.io import atomic_path, write_json, write_text
from ..data.corpora.public import NO_WORD_SPACES, CorpusError, base_language
from ..data.manifest import read_manifest

logger = logging.getLogger(__name__)


def build_lm(out: str | os.PathLike, model_dir: str | os.PathLike, text: str | os.PathLike | None = None,
             arpa: str | os.PathLike | None = None, order: int = 3) -> Path:
    """An n-gram LM for ``model_dir``'s transcripts: built from the sentences of the manifest
    ``text`` (normalised as the model's transcripts are), or copied from the ARPA file
    ``arpa`` (``.arpa`` or ``.arpa.gz``), lower-cased when the model's normaliser lower-cases
    (LibriSpeech's LM is upper case)."""
    from ..data.text import load_normalizer
    from ..decoding.lm import read_sentences, write_arpa

    out = Path(out)
    norm = load_normalizer(Path(model_dir) / "normalizer.json")
    if arpa is None:
        if text is None:
            raise ValueError("build_lm needs text or arpa")
        return write_arpa(read_sentences(text, norm), out, order=order)
    arpa = Path(arpa)
    if not arpa.is_file():
        raise CorpusError(f"{arpa}: language model not found")
    lower = norm.config.lowercase
    opener = gzip.open if arpa.suffix == ".gz" else open
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, opener(arpa, "rt", encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
        dst.writelines(line.lower() if lower else line for line in src)
    return out


def score_sets(model_dir: str | os.PathLike, sets: dict[str, str | os.PathLike], out_dir: str | os.PathLike,
               lm: str | os.PathLike | None = None, tune_on: str | None = None, alpha: float = 0.5, beta: float = 1.0,
               beam_width: int = 32, alphas: Iterable[float] = (0.0, 0.5, 1.0, 1.5, 2.0),
               betas: Iterable[float] = (0.0, 1.0, 2.0, 3.0), progress: bool = False) -> dict[str, dict]:
    """Score the model on each manifest in ``sets``, loading it once: greedy into
    ``out_dir/<set>/`` and, with ``lm``, beam search with the LM into ``out_dir/<set>-lm/``
    (``hyps.jsonl``, ``errs.txt``, ``summary.json``, as ``speechtl evaluate`` writes). With
    ``tune_on`` (a name in ``sets``), the LM weight and word bonus are chosen on that set
    first (``out_dir/lm_tune.json``); otherwise ``alpha`` and ``beta`` are used. Sets already
    scored are left as they are. Returns ``{folder name: summary}``."""
    out = Path(out_dir)
    todo = [(name, Path(m), False) for name, m in sets.items()]
    if lm is not None:
        todo += [(name, Path(m), True) for name, m in sets.items()]
    results: dict[str, dict] = {}
    pending = []
    for name, manifest, with_lm in todo:
        folder = out / (f"{name}-lm" if with_lm else name)
        if (folder / "summary.json").is_file():
            logger.info("%s: already scored (%s)", folder.name, folder / "summary.json")
            results[folder.name] = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        else:
            pending.append((name, manifest, with_lm, folder))
    if not pending:
        return results
    from ..decoding.options import DecodeOptions
    from ..inference.recognizer import Recognizer  # torch and transformers: only when there is work

    rec = Recognizer.load(model_dir)
    if lm is not None and any(p[2] for p in pending):
        tune_file = out / "lm_tune.json"
        if tune_on is not None and tune_file.is_file():
            best = json.loads(tune_file.read_text(encoding="utf-8"))["best"]
            alpha, beta = best["alpha"], best["beta"]
        elif tune_on is not None:
            if tune_on not in sets:
                raise ValueError(f"tune_on {tune_on!r} is not one of the sets: {', '.join(sets)}")
            grid = rec.tune_lm(read_manifest(sets[tune_on]), lm, list(alphas), list(betas), beam_width, progress=progress)
            write_json(tune_file, {"set": tune_on, "lm": str(lm), **grid})
            alpha, beta = grid["best"]["alpha"], grid["best"]["beta"]
            logger.info("LM weights tuned on %s: alpha %g, beta %g", tune_on, alpha, beta)
    for _name, manifest, with_lm, folder in pending:
        utts = read_manifest(manifest, check_files=False)
        kw = {"lm": lm, "alpha": alpha, "beta": beta, "beam_width": beam_width} if with_lm else {"options": DecodeOptions()}
        summary = rec.evaluate(utts, out_dir=folder, progress=progress, on_bad_audio="skip", **kw)
        logger.info("%s: WER %.4f CER %.4f on %d utterance(s)", folder.name, summary["wer"], summary["cer"],
                    summary["utterances"])
        results[folder.name] = summary
    return results


def _fmt(x: float | None, scale: float = 100.0, digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def report(run_dir: str | os.PathLike, data_dir: str | os.PathLike, sets: Iterable[str], title: str,
           reference: dict[tuple[str, str], float] | None = None, reference_note: str = "") -> str:
    """The results table of a recipe run, as Markdown: one row per set and decoder with
    utterances, hours, clips skipped at preparation, WER and CER (%), and, where
    ``reference`` has ``(set, "greedy" | "lm")``, the published WER beside it. Also writes
    ``results.md`` and ``results.json`` into ``run_dir``."""
    run, data = Path(run_dir), Path(data_dir)
    prepared = json.loads((data / "prepared.json").read_text(encoding="utf-8"))
    summary_path = run / "train_summary.json"
    train = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    config = {}
    if (run / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    tune = run / "decode" / "lm_tune.json"
    tune_info = json.loads(tune.read_text(encoding="utf-8")) if tune.is_file() else {}
    tuned = tune_info.get("best")
    rows = []
    for name in sets:
        for decoder, folder in (("greedy", name), ("lm", f"{name}-lm")):
            s = run / "decode" / folder / "summary.json"
            if not s.is_file():
                continue
            r = json.loads(s.read_text(encoding="utf-8"))
            rows.append({"set": name, "decoder": decoder, "utterances": r["utterances"],
                         "hours": r["audio_seconds"] / 3600, "skipped": prepared["splits"].get(name, {}).get("skipped", 0),
                         "wer": r["wer"], "cer": r["cer"], "lm": r.get("lm"), "alpha": r.get("alpha"), "beta": r.get("beta"),
                         "published_wer": (reference or {}).get((name, decoder))})
    has_ref = any(r["published_wer"] is not None for r in rows)
    lines = [f"## {title}", ""]
    tr = prepared["splits"].get("train", {})
    lines.append(f"Encoder `{config.get('encoder', '?')}`, mode `{config.get('mode', '?')}`, "
                 f"{train.get('steps', '?')} updates on {tr.get('utterances', '?')} training utterances "
                 f"({tr.get('hours', 0):.2f} h; {tr.get('skipped', 0)} skipped at preparation).")
    if tuned:
        lines.append(f"LM weight and word bonus chosen on {tune_info.get('set', 'the dev set')}: "
                     f"alpha {tuned['alpha']:g}, beta {tuned['beta']:g}.")
    ref_head, ref_rule = (" | published WER %", "|---:") if has_ref else ("", "")
    lines += ["", f"| set | decoder | utterances | hours | skipped | WER % | CER %{ref_head} |",
              f"|---|---|---:|---:|---:|---:|---:{ref_rule}|"]
    for r in rows:
        cells = [r["set"], "greedy" if r["decoder"] == "greedy" else "beam + LM", str(r["utterances"]),
                 f"{r['hours']:.2f}", str(r["skipped"]), _fmt(r["wer"]), _fmt(r["cer"])]
        if has_ref:
            cells.append(_fmt(r["published_wer"], 1.0))
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("| (nothing scored yet) |")
    if base_language(str(prepared.get("lang", ""))) in NO_WORD_SPACES:
        lines += ["", ("This language is written without spaces between words, so WER counts whole unspaced "
                      "stretches as words; compare CER.")]
    if has_ref and reference_note:
        lines += ["", reference_note]
    text = "\n".join(lines) + "\n"
    write_text(run / "results.md", text)
    write_json(run / "results.json", {"title": title, "encoder": config.get("encoder"), "mode": config.get("mode"),
                                      "steps": train.get("steps"), "prepared": prepared, "lm_weights": tuned, "rows": rows})
    return text


# ----------------------------------------------------------------------------- steps.py plumbing


def add_model_steps(sub, lm_order: int = 3, arpa: bool = False) -> None:
    """Add the ``lm`` and ``score`` steps that every corpus recipe's ``steps.py`` shares to
    the subparsers ``sub``; ``arpa`` also offers casing an existing ARPA LM for the model."""
    s = sub.add_parser("lm", help="an LM for the model" if arpa else "an n-gram LM from the training sentences")
    s.add_argument("--model", required=True)
    s.add_argument("--text", required=not arpa, help="training manifest: build an n-gram LM of its text")
    if arpa:
        s.add_argument("--arpa", help="an ARPA LM (.arpa or .arpa.gz) to case for the model")
    s.add_argument("--order", type=int, default=lm_order)
    s.add_argument("--out", required=True)
    s = sub.add_parser("score", help="score a model on several sets")
    s.add_argument("--model", required=True)
    s.add_argument("--set", action="append", required=True, metavar="NAME=MANIFEST")
    s.add_argument("--out", required=True)
    s.add_argument("--lm", help="also decode with this ARPA LM")
    s.add_argument("--tune-on", help="choose the LM weight and word bonus on this set (a grid search)")
    s.add_argument("--alpha", type=float, default=0.5, help="LM weight, without --tune-on")
    s.add_argument("--beta", type=float, default=1.0, help="word bonus, without --tune-on")
    s.add_argument("--beam-width", type=int, default=32)


def parse_steps(parser, sub, argv: list[str] | None):
    """Give every step ``-q``, parse ``argv`` and set up logging accordingly."""
    for s in sub.choices.values():
        s.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    return args


def run_step(recipe: str, args, own_steps) -> int:
    """Run ``args.step``: the shared ``lm`` and ``score`` steps here, any other through
    ``own_steps(args)``. A bad input becomes one line on stderr naming the recipe and step,
    and exit status 1."""
    import sys

    from ..data.audio import AudioError

    try:
        if args.step == "lm":
            build_lm(args.out, args.model, text=args.text, arpa=getattr(args, "arpa", None), order=args.order)
        elif args.step == "score":
            score_sets(args.model, dict(s.split("=", 1) for s in args.set), args.out, lm=args.lm,
                       tune_on=args.tune_on, alpha=args.alpha, beta=args.beta, beam_width=args.beam_width)
        else:
            own_steps(args)
    except (ValueError, OSError, AudioError) as e:
        print(f"{recipe} {args.step}: error: {e}", file=sys.stderr)
        return 1
    return 0
