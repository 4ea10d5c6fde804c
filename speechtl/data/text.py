"""Text normalisation and the character vocabulary.

The vocabulary is saved as ``vocab.json`` in the layout
``transformers.Wav2Vec2CTCTokenizer`` reads: ``<pad>`` (id 0, also the CTC blank),
``[UNK]``, ``|`` (the word delimiter, standing for a space), then the characters.
Subword units (``units=bpe:N``) are :class:`speechtl.data.units.SubwordVocabulary`.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..core.io import write_json

logger = logging.getLogger(__name__)

PAD = "<pad>"
UNK = "[UNK]"
# how an unknown character is written in transcripts, by every decoder and in exported
# models; the normaliser keeps it as a letter, so scoring counts it as one wrong character
# inside its word (not as the extra word "unk" that "[UNK]" would normalise to)
UNK_TEXT = "\u2047"
WORD_DELIMITER = "|"
APOSTROPHES = "'\u2019\u02bc\u2018`"


@dataclass(frozen=True)
class NormalizerConfig:
    """How transcripts are normalised before training and scoring."""

    form: str = "NFC"  # Unicode normal form; NFC keeps precomposed diacritics (č, ł, ế)
    lowercase: bool = True  # lower-case everything
    strip_punctuation: bool = True  # drop Unicode punctuation and symbols (apostrophes kept)
    keep_apostrophes: bool = True  # keep ' inside words (don't, l'eau); curly forms map to '
    mappings: dict = field(default_factory=dict)  # literal replacements applied after the above


class Normalizer:
    """Callable text normaliser configured by :class:`NormalizerConfig`."""

    def __init__(self, config: NormalizerConfig | None = None):
        self.config = config or NormalizerConfig()

    def __call__(self, text: str) -> str:
        c = self.config
        text = unicodedata.normalize(c.form, text)
        if c.lowercase:
            text = unicodedata.normalize(c.form, text.lower())
        if c.strip_punctuation:
            out = []
            for ch in text:
                if ch == UNK_TEXT:
                    out.append(ch)
                    continue
                if ch in APOSTROPHES:
                    out.append("'" if c.keep_apostrophes else " ")
                    continue
                cat = unicodedata.category(ch)
                if cat[0] in "PS":
                    out.append(" ")
                elif cat[0] == "C" or cat[0] == "Z":
                    out.append(" ")
                else:
                    out.append(ch)
            text = "".join(out)
        for src, dst in c.mappings.items():
            text = text.replace(src, dst)
        words = text.split()
        if c.keep_apostrophes and c.strip_punctuation:
            # quotes used as punctuation ('hello') are not part of a word
            words = [w.strip("'") for w in words]
        return " ".join(w for w in words if w)

    def to_dict(self) -> dict:
        return asdict(self.config)

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        return cls(NormalizerConfig(**d))


class Vocabulary:
    """Character vocabulary for CTC. Id 0 is the blank, which doubles as padding."""

    def __init__(self, tokens: Sequence[str]):
        if list(tokens[:3]) != [PAD, UNK, WORD_DELIMITER]:
            raise ValueError(f"vocabulary must start with {PAD}, {UNK}, {WORD_DELIMITER}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary has duplicate tokens")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.oov: Counter = Counter()  # characters seen by encode() that are not in the vocabulary

    blank_id = 0
    pad_id = 0
    unk_id = 1
    delimiter_id = 2
    kind = "char"  # output units; speechtl.data.units.SubwordVocabulary holds subword pieces
    units = "char"

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> "Vocabulary":
        """Build from already-normalised texts; characters are sorted for stability."""
        counts = Counter(ch for t in texts for ch in t if ch != " ")
        chars = sorted(ch for ch, n in counts.items() if n >= min_count and ch not in (PAD, UNK, WORD_DELIMITER))
        return cls([PAD, UNK, WORD_DELIMITER, *chars])

    def encode(self, text: str) -> list[int]:
        """Map normalised text to ids; spaces become ``|``. Unknown characters map to
        ``[UNK]`` and are counted in :attr:`oov`."""
        ids = []
        for ch in text:
            if ch == " ":
                ids.append(self.delimiter_id)
                continue
            i = self.index.get(ch)
            if i is None or i < 3:
                self.oov[ch] += 1
                i = self.unk_id
            ids.append(i)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids (already CTC-collapsed, blanks removed) to text.

        Matches ``Wav2Vec2CTCTokenizer.decode`` of an exported model: ``|`` becomes a space,
        ``[UNK]`` is written :data:`UNK_TEXT`, and the ends are stripped (inner runs of
        spaces are kept, so exported models agree exactly)."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.pad_id:
                continue
            out.append(" " if i == self.delimiter_id else UNK_TEXT if i == self.unk_id else self.tokens[i])
        return "".join(out).strip()

    def piece(self, i: int) -> tuple[bool, str]:
        """``(starts_a_word, text)`` of unit ``i``: the delimiter ``|`` ends the word before it
        and adds nothing; a character continues the word."""
        if i == self.delimiter_id:
            return True, ""
        return False, UNK_TEXT if i == self.unk_id else self.tokens[i]

    def oov_report(self, texts: Iterable[str]) -> Counter:
        """Count characters in ``texts`` that the vocabulary lacks."""
        c: Counter = Counter()
        for t in texts:
            for ch in t:
                if ch != " " and (ch not in self.index or self.index[ch] < 3):
                    c[ch] += 1
        return c

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, {t: i for i, t in enumerate(self.tokens)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        try:
            with open(path, encoding="utf-8") as f:
                mapping = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a vocabulary file (expected JSON: {{token: id}}; {e})") from None
        if not isinstance(mapping, dict) or not all(isinstance(t, str) and isinstance(i, int) for t, i in mapping.items()):
            raise ValueError(f"{path}: not a vocabulary file (expected a JSON object of token: integer id)")
        tokens = [t for t, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        if [mapping[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError(f"{path}: vocabulary ids must be 0..N-1 without gaps")
        try:
            return cls(tokens)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def describe_oov(counts: Counter, limit: int = 20) -> str:
    """Human-readable summary of out-of-vocabulary characters."""
    if not counts:
        return "no out-of-vocabulary characters"
    items = ", ".join(f"{ch!r}×{n}" for ch, n in counts.most_common(limit))
    more = "" if len(counts) <= limit else f" (+{len(counts) - limit} more)"
    return f"{sum(counts.values())} out-of-vocabulary character(s): {items}{more}"


def save_normalizer(path: str | os.PathLike, normalizer: Normalizer) -> None:
    write_json(path, normalizer.to_dict())


def load_normalizer(path: str | os.PathLike) -> Normalizer:
    return Normalizer.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
