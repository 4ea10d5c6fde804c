"""CTC decoding. Greedy decoding: best class per frame, merge repeats, drop blanks."""

from __future__ import annotations

import torch


def greedy_ids(logits: torch.Tensor, lengths: torch.Tensor, blank: int = 0) -> list[list[int]]:
    """Args: logits (B, T, V); lengths (B,) valid frames. Returns token ids per clip."""
    best = logits.argmax(dim=-1).cpu()
    out = []
    for row, n in zip(best, lengths.cpu().tolist()):
        seq = row[:n]
        if seq.numel() == 0:
            out.append([])
            continue
        keep = torch.ones_like(seq, dtype=torch.bool)
        keep[1:] = seq[1:] != seq[:-1]
        seq = seq[keep]
        out.append(seq[seq != blank].tolist())
    return out
