"""CTC decoding. Greedy decoding: best class per frame, merge repeats, drop blanks."""

from __future__ import annotations

import numpy as np
import torch


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
