"""Output units of the CTC head: characters (the default), or subword pieces.

``units=char`` predicts the characters of :class:`speechtl.data.text.Vocabulary`.
``units=bpe:N`` and ``units=unigram:N`` train a tokenizer (the ``tokenizers`` library's
BPE or unigram model) of N units on the training transcripts, and the head predicts its
pieces. Words are marked as SentencePiece marks them: a piece that begins a word starts
with "▁" (U+2581), so ``"cab ba"`` may become ``▁c ab ▁ba``; there is no word-delimiter
unit. Id 0 is ``<pad>`` (the CTC blank), id 1 the unknown unit, written ``⁇`` as every
decoder writes an unknown character; the pieces follow. Every character of the training
text is a piece of its own, so the tokenizer encodes any word made of those characters.

A subword model folder holds ``tokenizer.json`` (the tokenizer, loadable with
``tokenizers.Tokenizer.from_file``; it decodes piece ids to the same text as speechtl),
``vocab.json`` (the pieces by id, for reference), and ``"units": "bpe:N"`` in
``speechtl.json``. A folder without ``units`` is a character model.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from ..core.io import write_json, write_text
from .text import PAD, UNK_TEXT, Vocabulary

SUBWORD_KINDS = ("bpe", "unigram")
WORD_START = "\u2581"  # "▁": begins the first piece of every word
TOKENIZER_FILE = "tokenizer.json"
_USAGE = "char, bpe:N or unigram:N (N: the number of output units, blank and unknown included)"


def parse_units(value) -> tuple[str, int | None]:
    """``"char"`` -> ``("char", None)``; ``"bpe:N"``/``"unigram:N"`` -> ``(kind, N)``.
    Anything else is an error naming the config key ``units``."""
    text = value.strip() if isinstance(value, str) else None
    if text == "char":
        return "char", None
    kind, sep, size = (text or "").partition(":")
    kind, size = kind.strip(), size.strip()
    if kind in SUBWORD_KINDS and sep and size.isdigit():
        n = int(size)
        if n >= 3:
            return kind, n
        raise ValueError(f"config key 'units': {value!r}: N must be at least 3 (the blank, the unknown unit and the "
                         f"word-start marker come first, then at least one unit per character of the training text)")
    raise ValueError(f"config key 'units': {value!r} is not {_USAGE}")


class SubwordVocabulary:
    """The pieces of a trained subword tokenizer as CTC output units.

    Offers what :class:`speechtl.data.text.Vocabulary` offers to training and decoding
    (``tokens``, ``index``, ``encode``, ``decode``, ``piece``, ``oov_report``, ``save``),
    so either kind goes wherever a vocabulary does."""

    blank_id = 0
    pad_id = 0
    unk_id = 1
    delimiter_id = None  # words begin at pieces that start with WORD_START; no unit stands between them

    def __init__(self, tokenizer, units: str | None = None):
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        tokens = [tokenizer.id_to_token(i) for i in range(size)]
        if tokens[:2] != [PAD, UNK_TEXT] or any(t is None or " " in t or not t for t in tokens):
            raise ValueError(f"not a speechtl subword tokenizer: its units must be {PAD!r}, {UNK_TEXT!r}, then pieces "
                             f"without spaces (got {tokens[:5]}...)")
        model_type = json.loads(tokenizer.to_str())["model"]["type"].lower()
        if model_type not in SUBWORD_KINDS:
            raise ValueError(f"not a speechtl subword tokenizer: a {model_type} model (expected BPE or Unigram)")
        self.tokenizer = tokenizer
        self.kind = model_type
        self.units = units or f"{model_type}:{size}"
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        # the characters it encodes: every one of the training text is a piece of its own
        self.alphabet = frozenset(t for t in tokens[2:] if len(t) == 1 and t != WORD_START)
        self.oov: Counter = Counter()  # characters seen by encode() that the tokenizer cannot encode

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def train(cls, texts: Sequence[str], units: str) -> "SubwordVocabulary":
        """Train a tokenizer of the ``units`` kind and size on (normalised) ``texts``."""
        kind, size = parse_units(units)
        if kind == "char":
            raise ValueError("units=char needs no tokenizer; build a Vocabulary")
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ValueError(f"config key 'units': {units}: the training manifest has no text to learn pieces from")
        chars = {ch for t in texts for ch in t if ch != " "}
        need = 3 + len(chars)
        if size < need:
            # (the unigram trainer also never ends when asked for fewer units than the characters it must keep)
            raise ValueError(f"config key 'units': {units} is too few: the training text has {len(chars)} distinct "
                             f"characters, and with the blank, the unknown unit and the word-start marker they need at "
                             f"least {need} units; use {kind}:{need} or more")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        # the tokenizer is used again in forked data-loader workers, where its thread pool cannot follow
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        specials = [PAD, UNK_TEXT]
        if kind == "bpe":
            tokenizer = Tokenizer(models.BPE(unk_token=UNK_TEXT))
            trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False)
        else:
            tokenizer = Tokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(vocab_size=size, special_tokens=specials, unk_token=UNK_TEXT,
                                              show_progress=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
        tokenizer.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
        tokenizer.train_from_iterator(texts, trainer)
        # the unknown unit decodes to UNK_TEXT inside its word, as speechtl's decoders write it, rather than
        # being dropped as a special token: the saved tokenizer then decodes piece ids to speechtl's text
        data = json.loads(tokenizer.to_str())
        for added in data["added_tokens"]:
            if added["content"] == UNK_TEXT:
                added["special"] = False
        return cls(Tokenizer.from_str(json.dumps(data)), units)

    def encode(self, text: str) -> list[int]:
        """Normalised text to piece ids. Characters the tokenizer cannot encode become the
        unknown unit and are counted in :attr:`oov`."""
        for ch in text:
            if ch != " " and ch not in self.alphabet:
                self.oov[ch] += 1
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Piece ids (CTC-collapsed, blanks removed) to text: pieces joined, each "▁" a space,
        the unknown unit written :data:`UNK_TEXT`, the ends stripped. The same as
        ``tokenizer.decode(ids).strip()`` of the saved ``tokenizer.json``, and as an exported
        model's ``Wav2Vec2CTCTokenizer``."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.blank_id:
                continue
            out.append(UNK_TEXT if i == self.unk_id else self.tokens[i].replace(WORD_START, " "))
        return "".join(out).strip()

    def piece(self, i: int) -> tuple[bool, str]:
        """``(starts_a_word, text)`` of unit ``i``: ``▁ab`` is ``(True, "ab")``, ``ab`` ``(False, "ab")``."""
        if i == self.unk_id:
            return False, UNK_TEXT
        t = self.tokens[i]
        return (True, t[1:]) if t.startswith(WORD_START) else (False, t)

    def oov_report(self, texts: Iterable[str]) -> Counter:
        """Count characters in ``texts`` that the tokenizer cannot encode."""
        c: Counter = Counter()
        for t in texts:
            for ch in t:
                if ch != " " and ch not in self.alphabet:
                    c[ch] += 1
        return c

    def save(self, path: str | os.PathLike) -> None:
        """``vocab.json``: the pieces by id (the tokenizer itself: :meth:`save_tokenizer`)."""
        write_json(path, {t: i for i, t in enumerate(self.tokens)})

    def save_tokenizer(self, path: str | os.PathLike) -> None:
        write_text(path, self.to_str())

    def to_str(self) -> str:
        return self.tokenizer.to_str()

    @classmethod
    def from_str(cls, text: str, units: str | None = None) -> "SubwordVocabulary":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text), units)

    @classmethod
    def load(cls, path: str | os.PathLike, units: str | None = None) -> "SubwordVocabulary":
        try:
            return cls.from_str(Path(path).read_text(encoding="utf-8"), units)
        except Exception as e:  # tokenizers raises its own exception type for a malformed file
            raise ValueError(f"{path}: not a speechtl subword tokenizer ({e})") from None


def units_of(vocab) -> str:
    """``"char"``, or the subword kind and size (``"bpe:500"``) of a vocabulary."""
    return getattr(vocab, "units", "char")


def save_vocabulary(folder: str | os.PathLike, vocab) -> None:
    """A non-adapter model folder's vocabulary files: ``vocab.json``, and ``tokenizer.json`` for subword units."""
    folder = Path(folder)
    vocab.save(folder / "vocab.json")
    if isinstance(vocab, SubwordVocabulary):
        vocab.save_tokenizer(folder / TOKENIZER_FILE)


def load_vocabulary(folder: str | os.PathLike, meta: dict):
    """The vocabulary of a (non-adapter) model folder whose ``speechtl.json`` is ``meta``:
    characters from ``vocab.json`` (also for folders that record no ``units``), or the
    subword tokenizer of ``tokenizer.json``."""
    folder = Path(folder)
    units = meta.get("units", "char")
    if units == "char":
        return Vocabulary.load(folder / "vocab.json")
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: {TOKENIZER_FILE} is missing (speechtl.json says units={units})")
    return SubwordVocabulary.load(path, units)


def describe_units(units: str) -> str:
    """``"character"`` or ``"bpe subword"`` (for messages)."""
    kind = units.split(":")[0]
    return "character" if kind == "char" else f"{kind} subword"
