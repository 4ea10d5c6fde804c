"""What one training run is made of: its progress (:class:`TrainState`, saved in every
checkpoint) and its parts (:class:`Run`, built once by :func:`speechtl.training.build.build_run`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core.distributed import DistContext
from ..data.loader import DynamicBucketSampler
from ..data.manifest import Utterance
from ..models.ctc import CTCModel
from ..models.distill import Distiller
from .config import TrainConfig
from .data import TrainData
from .log import MetricsLog
from .lr import Horizon


class TrainingInterrupted(Exception):
    """Raised by a ``should_stop`` callback to end training early (after a checkpoint)."""


@dataclass
class TrainState:
    """A run's progress, as its checkpoint carries it (besides weights and random streams;
    the position in the batch order is the sampler's own, :meth:`DynamicBucketSampler.state_dict`)."""

    step: int = 0
    audio_seconds: float = 0.0
    elapsed: float = 0.0  # wall seconds, summed over resumed runs
    best: dict | None = None  # {"metric", "wer", "cer"} of the best evaluation
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    loss: float | None = None
    distill_loss: float | None = None  # its distillation part, with a teacher
    world_size: int = 1
    train_items: int = 0  # training items with the speed-perturbed copies: resume needs the same data
    utterances: int = 0
    schedule_total: int | None = None  # updates the LR schedule spans, when a time budget shortened it
    finished: str | None = None  # why the run ended; resuming a finished run is then a no-op

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Run:
    """One training run's parts, built once (:func:`speechtl.training.build.build_run`) in
    the order that keeps resume exact; the loop, evaluation and checkpoints read them."""

    cfg: TrainConfig
    ctx: DistContext
    device: torch.device
    out: Path
    progress: bool
    data: TrainData
    model: CTCModel
    distiller: Distiller | None
    groups: list[dict]  # the optimiser's parameter groups, named
    optimizer: torch.optim.Optimizer
    horizon: Horizon  # the updates the learning-rate schedule spans
    scheduler: torch.optim.lr_scheduler.LRScheduler
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    features: object | None  # frozen mode: the training set's encoder outputs (on disk or in memory)
    dev_features: object | None
    dev_mine: list[Utterance]  # this rank's share of the dev set
    global_seconds: float  # padded audio per update, all ranks and micro-batches
    loader_gen: torch.Generator  # seeds the loader's workers, apart from the global RNG
    sampler: DynamicBucketSampler
    loader: DataLoader
    step_module: nn.Module  # one forward pass (DistributedDataParallel around it with several ranks)
    state: TrainState
    checkpoint: Path  # out/checkpoints/last.pt
    metrics: MetricsLog
    encoder_fingerprint: str = ""  # of the encoder the run started from; checked on resume
    shown: dict = field(default_factory=dict)  # the progress bar's postfix: loss, and dev WER/CER since the last evaluation
