"""CTC decoding and word timing.

Greedy decoding takes the best class per frame, merges repeats and drops blanks; beam
search (pyctcdecode) may add an n-gram LM and hotwords. Times come from CTC frame spans:
a unit's time is the run of frames on which it is the best class, a word runs from its
first unit's first frame to its last unit's last frame, and its confidence is the mean
best-class probability over those frames. Forced alignment of a known transcript gives
word times the same way.

Units are characters, with ``|`` between words, or subword pieces, where a piece that
starts with "▁" begins a word (:mod:`speechtl.data.units`); ``vocab.piece(i)`` tells either
kind's word boundaries and text to the code here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

from ..data.text import UNK_TEXT, Vocabulary
from .options import DecodeOptions


@dataclass
class Word:
    word: str
    start: float
    end: float
    confidence: float


def token_runs(best: np.ndarray, blank: int = 0) -> list[tuple[int, int, int]]:
    """A best-class-per-frame path as ``(token, first_frame, last_frame)`` runs, blanks dropped."""
    if best.size == 0:
        return []
    change = np.flatnonzero(np.diff(best)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [best.size]]) - 1
    return [(int(best[s]), int(s), int(e)) for s, e in zip(starts, ends) if best[s] != blank]


def greedy_ids(logits: torch.Tensor, lengths: torch.Tensor, blank: int = 0) -> list[list[int]]:
    """Args: logits (B, T, V); lengths (B,) valid frames. Returns token ids per clip."""
    best = logits.argmax(dim=-1).cpu().numpy()
    return [[tok for tok, _, _ in token_runs(row[:n], blank)] for row, n in zip(best, lengths.cpu().tolist())]


def words_from_runs(runs, probs: np.ndarray, vocab: Vocabulary, frame_s: float) -> list[Word]:
    """Group unit runs into words: at the delimiter (``|``) for characters, before each
    word-initial piece (``▁...``) for subword units."""
    words: list[Word] = []
    chars: list[tuple[str, int, int]] = []

    def close():
        if chars:
            conf = float(np.mean(np.concatenate([probs[s:e + 1] for _, s, e in chars])))
            words.append(Word("".join(c for c, _, _ in chars), round(chars[0][1] * frame_s, 3),
                              round((chars[-1][2] + 1) * frame_s, 3), round(conf, 4)))
            chars.clear()

    for tok, s, e in runs:
        starts, text = vocab.piece(tok)
        if starts:
            close()
        if text:
            chars.append((text, s, e))
    close()
    return words


class GreedyDecoder:
    """Best class per frame; times from the frame runs."""

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab

    def __call__(self, log_probs: np.ndarray, frame_s: float) -> list[Word]:
        best = log_probs.argmax(axis=-1)
        probs = np.exp(log_probs.max(axis=-1))
        return words_from_runs(token_runs(best), probs, self.vocab, frame_s)


class _WordStart(str):
    """pyctcdecode's label for the piece that is the word-start marker alone ("▁").

    pyctcdecode (0.5) reads a BPE label that *ends* in "▁" as "the next piece begins a
    word", and keeps that in one flag shared by every beam: the next piece it expands, in
    whichever beam, is split off as a word of its own (a clear greedy path ``▁c ab`` comes
    out as "c ab"). The lone marker already begins a word through its leading "▁", so this
    label shows no trailing one; the next piece then joins the word the marker began."""

    def __getitem__(self, key):
        if key == slice(-1, None):
            return ""
        return str.__getitem__(self, key)


def subword_labels(vocab) -> list[str]:
    """pyctcdecode labels of a subword vocabulary: blank, the unknown unit (a piece inside
    its word, as greedy decoding writes it), then the pieces as they are."""
    from ..data.units import WORD_START

    return ["", UNK_TEXT, *(_WordStart(t) if t == WORD_START else t for t in vocab.tokens[2:])]


class BeamDecoder:
    """pyctcdecode beam search, optionally with an n-gram LM (ARPA, or kenlm binary when
    kenlm is installed) and hotwords."""

    def __init__(self, vocab: Vocabulary, lm: str | os.PathLike | None = None, alpha: float = 0.5, beta: float = 1.0,
                 beam_width: int = 32, hotwords: Sequence[str] | None = None, hotword_weight: float = 10.0,
                 unk_score_offset: float = -10.0):
        from .lm import kenlm_available, pyctcdecode_language_model

        if not kenlm_available():  # pyctcdecode warns about kenlm; our ARPA scorer stands in for it
            for name in ("pyctcdecode.language_model", "pyctcdecode.decoder"):
                logging.getLogger(name).setLevel(logging.ERROR)
        try:
            from pyctcdecode.alphabet import Alphabet
            from pyctcdecode.decoder import BeamSearchDecoderCTC
        except ImportError:
            raise RuntimeError("beam search needs pyctcdecode: pip install pyctcdecode") from None

        if lm is not None and not Path(lm).is_file():
            raise FileNotFoundError(f"{lm}: language model not found")
        if vocab.delimiter_id is None:  # subword pieces, in pyctcdecode's "▁" style
            alphabet = Alphabet(subword_labels(vocab), is_bpe=True)
        else:  # blank, [UNK], word delimiter, characters
            alphabet = Alphabet.build_alphabet(["", UNK_TEXT, " ", *vocab.tokens[3:]])
        language_model = None
        if lm is not None:
            language_model = pyctcdecode_language_model(lm, alpha=alpha, beta=beta, unk_score_offset=unk_score_offset)
        self.decoder = BeamSearchDecoderCTC(alphabet, language_model)
        self.beam_width = beam_width
        self.hotwords = list(hotwords or [])
        self.hotword_weight = hotword_weight

    def __call__(self, log_probs: np.ndarray, frame_s: float) -> list[Word]:
        if log_probs.shape[0] == 0:
            return []
        beams = self.decoder.decode_beams(log_probs, beam_width=self.beam_width, hotwords=self.hotwords or None,
                                          hotword_weight=self.hotword_weight)
        probs = np.exp(log_probs.max(axis=-1))
        words = []
        for w, (s, e) in beams[0][2]:
            e = max(e, s + 1)
            words.append(Word(w, round(s * frame_s, 3), round(e * frame_s, 3), round(float(np.mean(probs[s:e])), 4)))
        return words


MAX_ALIGN_CELLS = 1_000_000_000  # forced-alignment trellis cells (frames x states): about 1 GB (one byte each)


def align_words(log_probs: np.ndarray, text: str, vocab: Vocabulary, frame_s: float, where: str = "audio") -> list[Word]:
    """Word times of a known (normalised) transcript, by CTC forced alignment
    (``torchaudio.functional.forced_align``). A word's confidence is the mean posterior
    of its units' aligned frames."""
    import torch
    import torchaudio.functional as taF

    words = text.split()
    if not words:
        raise ValueError(f"{where}: the transcript is empty")
    unknown = sorted(vocab.oov_report(words))
    if unknown:
        raise ValueError(f"{where}: characters outside the model's vocabulary: {' '.join(map(repr, unknown))}")
    ids = vocab.encode(" ".join(words))
    vocab.oov.clear()
    unit = "character" if vocab.kind == "char" else "unit"
    repeats = sum(a == b for a, b in zip(ids, ids[1:]))
    if log_probs.shape[0] < len(ids) + repeats:
        raise ValueError(f"{where}: {log_probs.shape[0]} frames ({log_probs.shape[0] * frame_s:.2f} s) are too few"
                         f" for a transcript of {len(ids)} {unit}s")
    # the alignment trellis holds frames x (2 x characters + 1) cells; past the limit, refuse
    # before allocating rather than exhaust the machine's memory
    cells = log_probs.shape[0] * (2 * len(ids) + 1)
    if cells > MAX_ALIGN_CELLS:
        minutes = log_probs.shape[0] * frame_s / 60
        piece = max(MAX_ALIGN_CELLS / cells * minutes, 0.1)
        raise ValueError(f"{where}: aligning {minutes:.1f} min of audio with a {len(ids):,}-{unit} transcript needs "
                         f"{cells / 1e9:.1f} billion trellis cells (limit {MAX_ALIGN_CELLS / 1e9:g} billion); align it in "
                         f"pieces of at most about {piece:.1f} min, each with its own part of the transcript")
    emission = torch.from_numpy(np.ascontiguousarray(log_probs, dtype=np.float32))[None]
    targets = torch.tensor([ids], dtype=torch.int32)
    path, scores = taF.forced_align(emission, targets, blank=0)
    spans = taF.merge_tokens(path[0], scores[0].exp())
    out: list[Word] = []
    chars: list = []
    w_iter = iter(words)
    for span in [*spans, None]:
        starts, piece_text = (True, "") if span is None else vocab.piece(span.token)
        if starts and chars:
            conf = float(np.mean([c.score for c in chars]))
            out.append(Word(next(w_iter), round(chars[0].start * frame_s, 3), round(chars[-1].end * frame_s, 3), round(conf, 4)))
            chars = []
        if piece_text:
            chars.append(span)
    return out


class Decoders:
    """The decoder for each setting over one vocabulary: greedy, or a :class:`BeamDecoder`
    built on first use and kept, so that its language model is read from disk once however
    many calls use it."""

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        self._beams: dict = {}

    def get(self, o: DecodeOptions):
        if o.greedy:
            return GreedyDecoder(self.vocab)
        key = (o.lm, o.width, o.alpha, o.beta, o.hotwords, o.hotword_weight)
        if key not in self._beams:
            self._beams[key] = BeamDecoder(self.vocab, o.lm, o.alpha, o.beta, o.width, list(o.hotwords) or None,
                                           o.hotword_weight)
        return self._beams[key]
