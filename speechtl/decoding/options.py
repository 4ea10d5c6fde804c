"""How CTC output becomes text: one set of choices, passed from the command line through
:class:`~speechtl.inference.recognizer.Recognizer` to the decoder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from ..core.constants import DECODING_FILE

DEFAULT_BEAM_WIDTH = 32
LM_FILE = "lm.arpa"  # the LM that decoding.json names, beside it


@dataclass(frozen=True)
class DecodeOptions:
    """Greedy decoding, unless an n-gram ``lm``, a ``beam_width`` or ``hotwords`` asks for
    pyctcdecode's beam search.

    Attributes:
        lm: n-gram language model (.arpa; a kenlm binary with kenlm installed).
        beam_width: beams kept (default: greedy, or 32 with ``lm`` or ``hotwords``).
        alpha: LM weight.
        beta: word insertion bonus.
        hotwords: words to favour in beam search.
        hotword_weight: how much to favour them.
    """

    lm: str | None = None
    beam_width: int | None = None
    alpha: float = 0.5
    beta: float = 1.0
    hotwords: tuple[str, ...] = ()
    hotword_weight: float = 10.0

    def __post_init__(self) -> None:
        if self.beam_width is not None and (isinstance(self.beam_width, bool) or not isinstance(self.beam_width, int)
                                            or self.beam_width < 1):
            raise ValueError(f"beam width must be a whole number of at least 1 (got {self.beam_width!r})")

    @classmethod
    def of(cls, lm: str | os.PathLike | None = None, beam_width: int | None = None, alpha: float | None = 0.5,
           beta: float | None = 1.0, hotwords: Sequence[str] | None = None, hotword_weight: float = 10.0) -> DecodeOptions:
        """Options from the keyword arguments that :class:`Recognizer`'s methods also take
        (``alpha``/``beta`` None: 0.5 and 1.0)."""
        return cls(None if lm is None else str(lm), beam_width, 0.5 if alpha is None else alpha,
                   1.0 if beta is None else beta, tuple(hotwords or ()), hotword_weight)

    def over(self, lm: str | os.PathLike | None = None, beam_width: int | None = None, alpha: float | None = None,
             beta: float | None = None, hotwords: Sequence[str] | None = None,
             hotword_weight: float = 10.0) -> DecodeOptions:
        """These options (a model folder's own) with what the caller set laid over them: an
        ``lm`` replaces the model's (with the given weights, or 0.5 and 1.0), a
        ``beam_width``, ``alpha``, ``beta`` or ``hotwords`` changes that setting alone."""
        if lm is not None:
            return DecodeOptions.of(lm, beam_width or self.beam_width, alpha, beta, hotwords, hotword_weight)
        return DecodeOptions(self.lm, beam_width or self.beam_width, self.alpha if alpha is None else alpha,
                             self.beta if beta is None else beta, tuple(hotwords or ()), hotword_weight)

    @classmethod
    def read(cls, model_dir: str | os.PathLike) -> DecodeOptions:
        """A model folder's own decoding (``decoding.json``; greedy without one). Its LM must
        be there: a missing one is an error naming the file."""
        import json
        from pathlib import Path

        path = Path(model_dir) / DECODING_FILE
        if not path.is_file():
            return cls()
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if record["decoder"] == "greedy":
                return cls()
            lm = Path(model_dir) / record["lm"] if record.get("lm") else None
            options = cls(None if lm is None else str(lm), int(record.get("beam_width") or DEFAULT_BEAM_WIDTH),
                          float(record.get("alpha", 0.5)), float(record.get("beta", 1.0)))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a decoding record speechtl can read ({type(e).__name__}: {e}); delete it "
                             "to decode greedily") from None
        if lm is not None and not lm.is_file():
            raise FileNotFoundError(f"{lm}: the language model {path} names is missing; restore it, or delete "
                                    f"{DECODING_FILE} to decode greedily")
        return options

    @property
    def greedy(self) -> bool:
        return self.lm is None and self.beam_width is None and not self.hotwords

    @property
    def width(self) -> int:
        """The beam width a beam search uses."""
        return self.beam_width or DEFAULT_BEAM_WIDTH

    def summary(self) -> dict:
        """How decoding went, as ``evaluate``'s summary records it."""
        if self.greedy:
            return {"decoder": "greedy"}
        return {"decoder": "beam", "beam_width": self.width, "lm": self.lm, "alpha": self.alpha, "beta": self.beta,
                **({"hotwords": list(self.hotwords), "hotword_weight": self.hotword_weight} if self.hotwords else {})}
