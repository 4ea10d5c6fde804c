"""How CTC output becomes text: one set of choices, passed from the command line through
:class:`~speechtl.inference.recognizer.Recognizer` to the decoder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

DEFAULT_BEAM_WIDTH = 32


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
    def of(cls, lm: str | os.PathLike | None = None, beam_width: int | None = None, alpha: float = 0.5, beta: float = 1.0,
           hotwords: Sequence[str] | None = None, hotword_weight: float = 10.0) -> DecodeOptions:
        """Options from the keyword arguments that :class:`Recognizer`'s methods also take."""
        return cls(None if lm is None else str(lm), beam_width, alpha, beta, tuple(hotwords or ()), hotword_weight)

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
