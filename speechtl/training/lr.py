"""Learning-rate schedules, and fitting them to a time budget.

The schedule spans a :class:`Horizon` of updates: ``max_steps``, or fewer when a binding
``max_minutes`` shortens it as training goes (:func:`fit_to_budget`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..core import distributed as dist_util
from ..core.distributed import DistContext
from .config import TrainConfig

logger = logging.getLogger(__name__)

CALIBRATION_STEPS = 10  # updates timed before a binding max_minutes fits the schedule


@dataclass
class Horizon:
    """The number of updates the learning-rate schedule spans; read at every update."""

    total: int


def lr_lambda(cfg: TrainConfig, horizon: Horizon | None = None) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a given update.

    The schedule spans ``horizon.total`` updates when given (read at every call: a time
    budget that binds shortens it), else ``max_steps``."""

    def f(step: int) -> float:
        total = max(int(horizon.total) if horizon else cfg.max_steps, 1)
        warm = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
        hold = int(cfg.hold * total) if cfg.hold < 1 else int(cfg.hold)
        if step < warm:
            return 0.01 + 0.99 * step / max(warm, 1)
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "linear":
            return max(0.0, (total - step) / max(total - warm, 1))
        if cfg.schedule == "tristage":
            if step < warm + hold:
                return 1.0
            decay = max(total - warm - hold, 1)
            return math.exp(math.log(0.05) * min(step - warm - hold, decay) / decay)
        raise ValueError(f"unknown schedule {cfg.schedule!r}")

    return f


def refit_due(step: int, horizon: Horizon) -> bool:
    """Whether to re-estimate a time budget's horizon after this update: after the first
    ``CALIBRATION_STEPS``, then every 5 % of the planned updates (the machine's speed may change)."""
    return step == CALIBRATION_STEPS or step % max(CALIBRATION_STEPS, horizon.total // 20) == 0


def fit_to_budget(horizon: Horizon, step: int, elapsed: float, budget: float, max_steps: int, ctx: DistContext,
                  device: torch.device) -> int | None:
    """When ``max_minutes`` will stop training before ``max_steps``, fit the schedule to the
    updates the budget allows (estimated from the time per update so far, evaluations
    included), so that warm-up, hold and decay all happen. Ranks agree on the estimate.
    Returns the new horizon when it changed, else None."""
    per_update = dist_util.sum_across([elapsed / step], ctx, device)[0] / ctx.world_size
    affordable = step + int(max(budget - elapsed, 0.0) / max(per_update, 1e-9))
    total = max(min(affordable, max_steps), step + 1)
    if total < max_steps and abs(total - horizon.total) > 0.02 * horizon.total:
        if horizon.total == max_steps:
            logger.info("max_minutes binds before max_steps=%d: the learning-rate schedule is fitted to about %d "
                        "updates (%.2f s each so far)", max_steps, total, per_update)
        horizon.total = total
        return total
    return None
