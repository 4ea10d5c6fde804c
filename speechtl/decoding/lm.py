"""Word n-gram language models: an ARPA builder (interpolated modified Kneser-Ney) and
an ARPA scorer for CTC beam search.

kenlm's Python module can score ARPA files but cannot build them (that is its
``lmplz`` program, which pip does not install), and no maintained pip package writes
ARPA, so :func:`build_arpa` is our own, following Chen & Goodman (1998) as KenLM does:

- the highest order uses raw counts; lower orders use continuation counts (how many
  distinct words precede the n-gram), except n-grams starting with ``<s>``, which
  keep raw counts because nothing can precede them;
- three discounts per order, from the counts-of-counts of those adjusted counts;
- probabilities are interpolated with the next lower order, and the unigrams with
  a uniform distribution over the vocabulary (``<unk>`` included);
- the result is written in back-off form: each n-gram's interpolated probability
  and, for each context, the interpolation weight as its back-off.

:class:`ArpaLanguageModel` scores with such a file for pyctcdecode's beam search when
kenlm is not installed. It holds the model in Python dicts, which suits the
vocabulary-sized LMs of a fine-tuning corpus; kenlm (``pip install speechtl[lm]``)
is used instead when it is importable.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from ..core.io import write_text

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
LOG10_ZERO = -99.0  # ARPA convention for probability 0 (<s> as a predicted word)
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # used when counts-of-counts are too sparse


def _discounts(adjusted: Counter) -> tuple[float, float, float]:
    """Modified Kneser-Ney discounts D1, D2, D3+ from the counts-of-counts."""
    t = Counter(min(c, 4) for c in adjusted.values())
    t1, t2, t3, t4 = (t[k] for k in (1, 2, 3, 4))
    if min(t1, t2, t3, t4) == 0:
        return FALLBACK_DISCOUNTS
    y = t1 / (t1 + 2 * t2)
    d = (1 - 2 * y * t2 / t1, 2 - 3 * y * t3 / t2, 3 - 4 * y * t4 / t3)
    if not all(0 < dk <= k for k, dk in zip((1, 2, 3), d)):
        return FALLBACK_DISCOUNTS
    return d


def build_arpa(sentences: Iterable[str], order: int = 3, extra_words: Iterable[str] = ()) -> str:
    """An interpolated modified Kneser-Ney ``order``-gram model of whitespace-split
    ``sentences``, as ARPA text.

    ``extra_words`` (a word list) join the vocabulary at the unigram level only: each
    adds one continuation count, as if seen once after a word outside the text, so the
    model can predict words its text lacks without inventing n-grams around them."""
    if order < 2:
        raise ValueError(f"order must be at least 2 (kenlm reads bigram models and up), got {order}")
    counts = _count_ngrams(sentences, order)
    # adjusted counts: raw at the top order and for <s>-initial n-grams, continuation below
    adjusted: list[Counter] = [Counter() for _ in range(order + 1)]
    adjusted[order] = counts[order]
    for n in range(order - 1, 0, -1):
        left = Counter(g[1:] for g in counts[n + 1])
        adjusted[n] = Counter({g: (c if g[0] == BOS else left[g]) for g, c in counts[n].items()})
    # discounts come from the text's own counts; the listed words only add unigram mass
    text_unigrams = Counter({g: c for g, c in adjusted[1].items() if g[-1] != BOS})
    for w in extra_words:
        if len(w.split()) == 1 and w == w.strip() and w not in (BOS, EOS, UNK):
            adjusted[1][(w,)] += 1
    # <s> is a context only, never a predicted word
    predicted = [Counter({g: c for g, c in adjusted[n].items() if g[-1] != BOS}) for n in range(order + 1)]
    discounts = [None, _discounts(text_unigrams)] + [_discounts(predicted[n]) for n in range(2, order + 1)]

    def disc(n: int, c: int) -> float:
        return discounts[n][min(c, 3) - 1]

    # per context: total adjusted count and the interpolation weight gamma
    gamma: list[dict] = [{} for _ in range(order + 1)]
    totals: list[dict] = [{} for _ in range(order + 1)]
    for n in range(1, order + 1):
        tot: dict = defaultdict(int)
        mass: dict = defaultdict(float)
        for g, c in predicted[n].items():
            tot[g[:-1]] += c
            mass[g[:-1]] += disc(n, c)
        totals[n] = dict(tot)
        gamma[n] = {h: mass[h] / tot[h] for h in tot}
    vocab = sorted({g[0] for g in predicted[1]} | {UNK})
    probs: list[dict] = [{} for _ in range(order + 1)]
    g0 = gamma[1].get((), 0.0)
    probs[1] = {(w,): g0 / len(vocab) for w in vocab}
    for g, c in predicted[1].items():
        probs[1][g] += (c - disc(1, c)) / totals[1][()]
    for n in range(2, order + 1):
        for g, c in predicted[n].items():
            h = g[:-1]
            lower = probs[n - 1].get(g[1:])
            if lower is None:  # cannot happen for a consistent count table
                raise AssertionError(f"missing lower-order n-gram {g[1:]}")
            probs[n][g] = (c - disc(n, c)) / totals[n][h] + gamma[n][h] * lower

    return _arpa_text(probs, gamma, order)


def _count_ngrams(sentences: Iterable[str], order: int) -> list[Counter]:
    """``counts[n]``: every n-gram of the sentences padded with <s> and </s>, n = 1..order."""
    counts: list[Counter] = [Counter() for _ in range(order + 1)]
    n_sentences = 0
    for s in sentences:
        words = s.split()
        if not words:
            continue
        n_sentences += 1
        padded = [BOS, *words, EOS]
        for n in range(1, order + 1):
            for i in range(len(padded) - n + 1):
                counts[n][tuple(padded[i:i + n])] += 1
    if not n_sentences:
        raise ValueError("no text to build a language model from")
    return counts


def _arpa_text(probs: list[dict], gamma: list[dict], order: int) -> str:
    """The ARPA file of n-gram probabilities ``probs[n]`` and back-off weights ``gamma[n + 1]``."""

    def fmt(p: float) -> str:
        return f"{math.log10(p):.6f}" if p > 0 else f"{LOG10_ZERO:.1f}"

    lines = ["", "\\data\\"]
    entries: list[list[tuple[tuple, str]]] = [[] for _ in range(order + 1)]
    for n in range(1, order + 1):
        table = dict(probs[n])
        if n == 1:
            table[(BOS,)] = 0.0
        contexts = set(gamma[n + 1]) if n < order else set()
        for g in sorted(table):
            p = fmt(table[g])
            if g in contexts:
                entries[n].append((g, f"{p}\t{' '.join(g)}\t{math.log10(gamma[n + 1][g]) if gamma[n + 1][g] > 0 else 0.0:.6f}"))
            else:
                entries[n].append((g, f"{p}\t{' '.join(g)}"))
        lines.append(f"ngram {n}={len(entries[n])}")
    lines.append("")
    for n in range(1, order + 1):
        lines.append(f"\\{n}-grams:")
        lines += [line for _, line in entries[n]]
        lines.append("")
    lines.append("\\end\\")
    return "\n".join(lines) + "\n"


def read_sentences(path: str | os.PathLike, normalizer=None) -> list[str]:
    """LM training sentences: a ``.jsonl`` manifest's texts, or a text file's lines,
    normalised as a model's transcripts are (``normalizer``), empty ones dropped."""
    from ..data.manifest import read_manifest
    from ..data.text import Normalizer

    norm = normalizer or Normalizer()
    if str(path).endswith(".jsonl"):
        raw = [u.text for u in read_manifest(path, check_files=False)]
    else:
        raw = Path(path).read_text(encoding="utf-8").splitlines()
    lines = [t for t in map(norm, raw) if t.strip()]
    if not lines:
        raise ValueError(f"{path}: no text to build a language model from")
    return lines


def wordlist_code(lang: str) -> str:
    """wordfreq's code for ``lang`` (an espeak or ISO code); a language it has no list for
    is an error naming it."""
    import wordfreq

    from ..data.corpora.synth import wordfreq_lang

    code = wordfreq_lang(lang)
    if code not in wordfreq.available_languages():
        raise ValueError(f"wordfreq has no word list for {lang!r} (looked for {code!r})")
    return code


def wordlist_sentences(lang: str, size: int = 50_000, normalizer=None) -> list[str]:
    """The ``size`` most frequent words of ``lang`` (wordfreq; an espeak or ISO code), each
    normalised as a model's transcripts are (for :func:`build_arpa`'s ``extra_words``).
    Words with digits or that normalise to several words are left out."""
    import wordfreq

    from ..data.text import Normalizer

    if size <= 0:
        raise ValueError(f"wordlist size must be positive, got {size}")
    code = wordlist_code(lang)
    norm = normalizer or Normalizer()
    out, seen = [], set()
    for w in wordfreq.top_n_list(code, size):
        w = norm(w)
        if not w or " " in w or any(ch.isdigit() for ch in w) or w in seen:
            continue
        seen.add(w)
        out.append(w)
    return out


def write_arpa(text_path_or_lines: str | os.PathLike | Iterable[str], out: str | os.PathLike, order: int = 3,
               extra_words: Iterable[str] = ()) -> Path:
    """Build from a text file (one sentence per line) or lines, and write ``out`` atomically."""
    if isinstance(text_path_or_lines, (str, os.PathLike)):
        with open(text_path_or_lines, encoding="utf-8") as f:
            arpa = build_arpa(f, order, extra_words)
    else:
        arpa = build_arpa(text_path_or_lines, order, extra_words)
    out = Path(out)
    write_text(out, arpa)
    return out


class ArpaModel:
    """Back-off scoring with an ARPA file, in log10 (as kenlm's ``BaseScore``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.table: dict[tuple[str, ...], tuple[float, float]] = {}
        order = 0
        section = 0
        with open(path, encoding="utf-8") as f:
            for raw in f:
                line = raw.strip()
                if not line or line.startswith("ngram ") or line == "\\data\\":
                    continue
                if line == "\\end\\":
                    break
                if line.startswith("\\") and line.endswith("-grams:"):
                    section = int(line[1:line.index("-")])
                    order = max(order, section)
                    continue
                if not section:
                    continue
                parts = line.split("\t")
                if len(parts) == 1:
                    parts = line.split()
                    words = tuple(parts[1:1 + section])
                    bo = float(parts[1 + section]) if len(parts) > 1 + section else 0.0
                else:
                    words = tuple(parts[1].split())
                    bo = float(parts[2]) if len(parts) > 2 else 0.0
                self.table[words] = (float(parts[0]), bo)
        if not order:
            raise ValueError(f"{path}: no n-grams found; is this an ARPA file?")
        self.order = order
        self.vocab = {g[0] for g in self.table if len(g) == 1}

    def __contains__(self, word: str) -> bool:
        return word in self.vocab

    def score(self, context: tuple[str, ...], word: str) -> float:
        """log10 P(word | context), backing off through shorter contexts."""
        ctx = context[max(0, len(context) - (self.order - 1)):] if self.order > 1 else ()
        backoff = 0.0
        while True:
            hit = self.table.get(ctx + (word,))
            if hit is not None:
                return backoff + hit[0]
            if not ctx:
                return backoff + self.table.get((UNK,), (LOG10_ZERO, 0.0))[0]
            backoff += self.table.get(ctx, (0.0, 0.0))[1]
            ctx = ctx[1:]

    def next_state(self, context: tuple[str, ...], word: str) -> tuple[str, ...]:
        return (context + (word,))[-(self.order - 1):] if self.order > 1 else ()


def kenlm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("kenlm") is not None


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence what native code writes to stderr (fd 2) inside the block; errors still raise."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (some embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def pyctcdecode_language_model(path: str | os.PathLike, unigrams: Iterable[str] | None = None, alpha: float = 0.5,
                               beta: float = 1.0, unk_score_offset: float = -10.0, score_boundary: bool = True):
    """A pyctcdecode language model for ``path``: kenlm's when installed, else :class:`ArpaModel`'s."""
    from pyctcdecode.constants import AVG_TOKEN_LEN
    from pyctcdecode.language_model import AbstractLanguageModel, LanguageModel

    path = str(path)
    if unigrams is None and path.endswith(".arpa"):
        unigrams = sorted(ArpaModel(path).vocab - {BOS, EOS, UNK})
    if kenlm_available():
        import kenlm

        with _quiet_native_stderr():  # kenlm prints its loading progress straight to file descriptor 2
            lm = kenlm.Model(path)
        return LanguageModel(lm, unigrams, alpha=alpha, beta=beta, unk_score_offset=unk_score_offset,
                             score_boundary=score_boundary)
    if not path.endswith(".arpa"):
        raise ValueError(f"{path}: binary kenlm models need kenlm (pip install 'speechtl[lm]'); give an .arpa file")
    from pygtrie import CharTrie

    model = ArpaModel(path)
    ln10 = math.log(10)

    class _Arpa(AbstractLanguageModel):
        def __init__(self):
            self.alpha, self.beta, self.unk_score_offset, self.score_boundary = alpha, beta, unk_score_offset, score_boundary
            self._unigrams = set(unigrams or model.vocab) & model.vocab
            self._trie = CharTrie.fromkeys(self._unigrams) if self._unigrams else None

        @property
        def order(self) -> int:
            return model.order

        def get_start_state(self):
            return (BOS,) if self.score_boundary else ()

        def score_partial_token(self, partial_token: str) -> float:
            is_oov = 1.0 if self._trie is None else float(self._trie.has_node(partial_token) == 0)
            unk = self.unk_score_offset * is_oov
            return unk * len(partial_token) / AVG_TOKEN_LEN if len(partial_token) > AVG_TOKEN_LEN else unk

        def score(self, prev_state, word: str, is_last_word: bool = False):
            s = model.score(prev_state, word)
            if word not in self._unigrams:
                s += self.unk_score_offset
            state = model.next_state(prev_state, word)
            if is_last_word and self.score_boundary:
                s += model.score(state, EOS)
            return self.alpha * s * ln10 + self.beta, state

        def reset_params(self, **params) -> None:
            for k in ("alpha", "beta", "unk_score_offset", "score_boundary"):
                if params.get(k) is not None:
                    setattr(self, k, params[k])

    return _Arpa()
