"""Cutting duration-sorted clips into batches (no torch: the ONNX runtime uses it too)."""

from __future__ import annotations

from typing import Sequence


def cut_batches(order: Sequence[int], durations: Sequence[float], max_batch_seconds: float,
                max_batch_size: int | None = None) -> list[list[int]]:
    """Cut ``order`` greedily into batches whose padded seconds stay under the cap."""
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0.0
    for i in order:
        new_max = max(cur_max, durations[i])
        full = max_batch_size is not None and len(cur) >= max_batch_size
        if cur and (new_max * (len(cur) + 1) > max_batch_seconds or full):
            batches.append(cur)
            cur, new_max = [], durations[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches
