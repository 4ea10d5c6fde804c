"""Word and character error rates (via jiwer) and the standard scoring artefacts.

:func:`score` computes WER/CER on normalised text; :func:`write_results` writes

- ``hyps.jsonl``: one line per utterance (id, ref, hyp, per-utterance WER/CER),
- ``errs.txt``: Kaldi/icefall-style aligned errors, ``the (cat->hat) sat (*->down)``,
- ``summary.json``: ``wer``, ``cer``, ``utterances``, ``audio_seconds`` and the
  substitution/deletion/insertion counts (rates are fractions, 0.12 = 12 %).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import jiwer

from ..core.io import atomic_path, write_json


@dataclass
class UtteranceResult:
    id: str
    ref: str
    hyp: str
    duration: float = 0.0


@dataclass
class Counts:
    hits: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def ref_len(self) -> int:
        return self.hits + self.substitutions + self.deletions

    @property
    def rate(self) -> float:
        errors = self.substitutions + self.deletions + self.insertions
        if self.ref_len == 0:
            return 0.0 if errors == 0 else float("inf")
        return errors / self.ref_len


def _align(refs: list[list[str]], hyps: list[list[str]]):
    """Per-utterance counts and aligned-error strings for token lists."""
    counts, aligned = [], []
    nonempty = [i for i, r in enumerate(refs) if r]
    out = None
    if nonempty:
        out = jiwer.process_words(
            [" ".join(refs[i]) for i in nonempty],
            [" ".join(hyps[i]) for i in nonempty],
        )
    by_index = {i: k for k, i in enumerate(nonempty)}
    for i, (r, h) in enumerate(zip(refs, hyps)):
        if i not in by_index:
            counts.append(Counts(insertions=len(h)))
            aligned.append(" ".join(f"(*->{w})" for w in h))
            continue
        k = by_index[i]
        c = Counts()
        parts = []
        for chunk in out.alignments[k]:
            rw = r[chunk.ref_start_idx : chunk.ref_end_idx]
            hw = h[chunk.hyp_start_idx : chunk.hyp_end_idx]
            if chunk.type == "equal":
                c.hits += len(rw)
                parts.extend(rw)
            elif chunk.type == "substitute":
                c.substitutions += len(rw)
                parts.extend(f"({a}->{b})" for a, b in zip(rw, hw))
            elif chunk.type == "delete":
                c.deletions += len(rw)
                parts.extend(f"({a}->*)" for a in rw)
            elif chunk.type == "insert":
                c.insertions += len(hw)
                parts.extend(f"(*->{b})" for b in hw)
        counts.append(c)
        aligned.append(" ".join(parts))
    return counts, aligned


def _total(counts: Sequence[Counts]) -> Counts:
    t = Counts()
    for c in counts:
        t.hits += c.hits
        t.substitutions += c.substitutions
        t.deletions += c.deletions
        t.insertions += c.insertions
    return t


def _chars(text: str) -> list[str]:
    # spaces count as characters in CER, as in jiwer.cer; '|' shows them in reports
    return ["|" if ch == " " else ch for ch in text]


@dataclass
class ScoreReport:
    results: list[UtteranceResult]
    word_counts: list[Counts]
    char_counts: list[Counts]
    word_aligned: list[str]

    @property
    def wer(self) -> float:
        return _total(self.word_counts).rate

    @property
    def cer(self) -> float:
        return _total(self.char_counts).rate

    def summary(self) -> dict:
        w, c = _total(self.word_counts), _total(self.char_counts)
        return {
            "wer": w.rate,
            "cer": c.rate,
            "utterances": len(self.results),
            "audio_seconds": round(sum(r.duration for r in self.results), 3),
            "words": w.ref_len,
            "chars": c.ref_len,
            "word_substitutions": w.substitutions,
            "word_deletions": w.deletions,
            "word_insertions": w.insertions,
            "char_substitutions": c.substitutions,
            "char_deletions": c.deletions,
            "char_insertions": c.insertions,
        }


def score(results: Sequence[UtteranceResult], normalize: Callable[[str], str] | None = None) -> ScoreReport:
    """Score hypotheses against references after ``normalize`` (identity if None)."""
    norm = normalize or (lambda s: " ".join(s.split()))
    results = [UtteranceResult(r.id, norm(r.ref), norm(r.hyp), r.duration) for r in results]
    wc, wa = _align([r.ref.split() for r in results], [r.hyp.split() for r in results])
    cc, _ = _align([_chars(r.ref) for r in results], [_chars(r.hyp) for r in results])
    return ScoreReport(results, wc, cc, wa)


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    return score([UtteranceResult(str(i), r, h) for i, (r, h) in enumerate(zip(refs, hyps))]).wer


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    return score([UtteranceResult(str(i), r, h) for i, (r, h) in enumerate(zip(refs, hyps))]).cer


def write_results(report: ScoreReport, out_dir: str | os.PathLike, extra_summary: dict | None = None) -> dict:
    """Write hyps.jsonl, errs.txt and summary.json into ``out_dir``; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "hyps.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r, w, c in zip(report.results, report.word_counts, report.char_counts):
            rates = {k: v.rate if math.isfinite(v.rate) else None for k, v in (("wer", w), ("cer", c))}
            f.write(json.dumps({"id": r.id, "ref": r.ref, "hyp": r.hyp, **rates}, ensure_ascii=False) + "\n")
    summary = report.summary()
    if extra_summary:
        summary.update(extra_summary)
    with atomic_path(out / "errs.txt") as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(
            f"%WER {summary['wer'] * 100:.2f} [ {summary['word_substitutions'] + summary['word_deletions'] + summary['word_insertions']}"
            f" / {summary['words']}, {summary['word_insertions']} ins, {summary['word_deletions']} del,"
            f" {summary['word_substitutions']} sub ]\n"
        )
        f.write(f"%CER {summary['cer'] * 100:.2f}\n\nPer-utterance aligned errors (REF->HYP):\n")
        for r, a, w in zip(report.results, report.word_aligned, report.word_counts):
            if w.substitutions or w.deletions or w.insertions:
                f.write(f"{r.id}:\t{a}\n")
    write_json(out / "summary.json", summary)
    return summary
