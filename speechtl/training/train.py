"""The training loop shared by all modes.

One loop, one code path: ``frozen``, ``finetune``, ``scratch`` and ``adapter`` differ
only in the freezing policy of :class:`speechtl.models.ctc.CTCModel` and in which parameter
groups the optimiser sees.

Outputs in ``cfg.out``: ``checkpoints/last.pt`` (full training state, for
``resume``), ``model/`` (best model by dev error, or the last one without a dev set),
``metrics.csv``, ``dev/`` scoring artefacts of the best checkpoint, and
``train_summary.json``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core import distributed as dist_util
from ..core.distributed import DistContext
from ..core.io import atomic_path, write_json
from ..core.precision import autocast_dtype, compute_dtype_name
from ..data.audio import check_readable
from ..data.augment import Augmenter
from ..data.loader import AudioDataset, DynamicBucketSampler, collate, decode_workers, speed_copies
from ..data.manifest import Utterance, read_manifest
from ..data.text import Normalizer, NormalizerConfig, Vocabulary, describe_oov
from ..data.units import SubwordVocabulary, describe_units, parse_units, units_of
from ..decoding.metrics import write_results
from ..encoders.registry import load_encoder
from ..features.cache import FeatureCache, StaleCacheError, encoder_fingerprint, extract_to_cache
from ..features.extract import FeatureDataset, collate_features, estimate_bytes, extract_in_memory
from ..inference.recognizer import decode_hyps, score_hyps
from ..models.adapters import resolve_config as resolve_adapter_config
from ..models.adapters import training_language
from ..models.average import average_state_dicts
from ..models.ctc import (
    CTCModel,
    HeadConfig,
    build_model,
    ctc_loss,
    init_from_model,
    read_meta,
    resolve_model_dir,
    save_model_dir,
)
from ..models.distill import Distiller, spread_layers
from .config import TrainConfig

logger = logging.getLogger(__name__)

CSV_FIELDS = ["step", "epoch", "loss", "lr_head", "lr_encoder", "audio_hours", "elapsed_s", "dev_wer", "dev_cer", "distill_loss"]


DEV_WINDOW_S = 30.0
CALIBRATION_STEPS = 10  # updates timed before a binding max_minutes fits the schedule  # dev recordings longer than this are decoded from audio in windows of this length


class TrainingInterrupted(Exception):
    """Raised by a ``should_stop`` callback to end training early (after a checkpoint)."""


def lr_lambda(cfg: TrainConfig, horizon: dict | None = None) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a given update.

    The schedule spans ``horizon["total"]`` updates when given (read at every call: a
    time budget that binds shortens it), else ``max_steps``."""

    def f(step: int) -> float:
        total = max(int(horizon["total"]) if horizon else cfg.max_steps, 1)
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


def min_ctc_frames(ids: list[int]) -> int:
    """Frames CTC needs for a target: one per token plus a blank between repeats."""
    return len(ids) + sum(1 for a, b in zip(ids, ids[1:]) if a == b)


def filter_trainable(utts: list[Utterance], texts: list[str], vocab: Vocabulary, frames_for: Callable[[int], int],
                     max_duration: float | None = None) -> tuple[list[Utterance], dict[str, list[str]]]:
    """Drop clips CTC cannot train on (empty transcripts, transcripts longer than the clip's
    frames) and clips over ``max_duration`` seconds; returns the kept clips and the
    dropped ids by reason."""
    keep: list[Utterance] = []
    dropped: dict[str, list[str]] = {"empty_transcript": [], "too_short_for_transcript": [], "too_long": []}
    for u, t in zip(utts, texts):
        if not t:
            dropped["empty_transcript"].append(u.id)
        elif max_duration is not None and u.duration > max_duration:
            dropped["too_long"].append(u.id)
        elif min_ctc_frames(vocab.encode(t)) > frames_for(int(u.duration * 16_000)):
            dropped["too_short_for_transcript"].append(u.id)
        else:
            keep.append(u)
    vocab.oov.clear()
    return keep, dropped


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _trainable_state(model: CTCModel) -> dict:
    # a frozen encoder (and an adapter model's base) never changes and is reloaded from its source on resume
    if model.mode == "adapter":
        adapters = {f"encoder.model.{k}" for k in model.encoder.adapter_keys}
        return {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.") or k in adapters}
    return {k: v for k, v in model.state_dict().items() if model.mode != "frozen" or not k.startswith("encoder.")}


def open_or_extract(encoder, utterances, path: Path, device, max_batch_seconds: float | None, num_workers: int | None,
                    progress: bool, ctx: DistContext = DistContext(), amp: str = "auto") -> FeatureCache:
    """The on-disk cache of ``utterances`` at ``path``, (re-)extracted unless current.
    In a multi-process run rank 0 checks it, and every rank extracts its share of shards."""
    status = "extract"
    if ctx.is_main:
        try:
            FeatureCache(path).check(utterances, encoder_fingerprint(encoder), layers=list(range(encoder.num_layers)),
                                     compute=compute_dtype_name(device, amp))
            logger.info("reading features from %s", path)
            status = "current"
        except FileNotFoundError:
            logger.info("extracting features into %s", path)
        except StaleCacheError as e:
            logger.warning("%s; extracting again", e)
        except Exception as e:  # told to every rank, so that none waits for the others
            status = f"{path}: cannot read the feature cache ({type(e).__name__}: {e})"
    status = dist_util.broadcast_object(status, ctx)
    if status not in ("current", "extract"):
        raise RuntimeError(status)
    if status == "extract":
        extract_to_cache(encoder, utterances, path, "all", "float16", device, amp, max_batch_seconds=max_batch_seconds,
                         num_workers=num_workers, progress=progress, rank=ctx.rank, world_size=ctx.world_size)
    return FeatureCache(path)


class _TrainStep(nn.Module):
    """One forward pass of a :class:`CTCModel`, from audio or from cached encoder features,
    behind a single ``forward`` so that DistributedDataParallel sees every pass."""

    def __init__(self, model: CTCModel, distiller: Distiller | None = None):
        super().__init__()
        self.model = model
        self.distiller = distiller

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, from_features: bool = False, clean: torch.Tensor | None = None):
        """``(logits, frame_lengths, distillation loss or None)``; the teacher hears ``clean`` when given."""
        if from_features:
            return (*self.model.forward_features(x, lengths), None)
        if self.distiller is None:
            return (*self.model(x, lengths), None)
        logits, frames, hidden = self.model.forward_with_hidden(x, lengths)
        loss, _ = self.distiller(hidden, frames, x if clean is None else clean, lengths)
        return logits, frames, loss


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, loaded with ``weights_only=True``: tensors and plain data only.
    A file that needs anything more (pickled code) is refused, never executed."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: refused to load: the checkpoint holds objects other than tensors and plain data"
                         f" (torch.load weights_only=True: {first}). speechtl never unpickles code; delete the file"
                         " or start without resume=true") from None


def train(cfg: TrainConfig, progress: bool = True, should_stop: Callable[[int], bool] | None = None) -> dict:
    """Train per ``cfg``; returns the training summary (also written to train_summary.json).

    ``should_stop(step)`` is called after every update; returning True saves a
    checkpoint and raises :class:`TrainingInterrupted` (used to test resume).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs this function: the
    sampler deals each rank its own batches, DistributedDataParallel averages the
    gradients, dev scoring is gathered across ranks, and only rank 0 writes files. One
    update then covers ``world_size x grad_accum`` micro-batches.
    """
    ctx, device = dist_util.setup(cfg.device)
    interrupt = _GracefulInterrupt()
    stop = interrupt if should_stop is None else (lambda step: should_stop(step) or interrupt(step))
    try:
        with interrupt:
            return _train(cfg, ctx, device, progress and ctx.is_main, stop)
    except TrainingInterrupted:
        if interrupt.asked:  # Ctrl-C: the checkpoint is saved; end as an interrupt does
            raise KeyboardInterrupt from None
        raise
    finally:
        dist_util.teardown(ctx)


class _GracefulInterrupt:
    """The first Ctrl-C (SIGINT) asks training to stop after the update in progress, with a
    checkpoint that ``resume=true`` continues from; a second one stops at once."""

    def __init__(self):
        self.asked = False
        self._previous = None

    def __call__(self, step: int) -> bool:
        return self.asked

    def _handle(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        logger.warning("interrupted: saving a checkpoint after this update (Ctrl-C again to stop at once)")

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


@dataclass
class TrainState:
    """A run's progress, as its checkpoint carries it (besides weights and random streams)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
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
class _TrainData:
    """The training and dev sets after checks, filtering and speed perturbation."""

    normalizer: Normalizer
    vocab: Vocabulary | None  # chosen once the checkpoint is read
    train: list[Utterance]
    dev: list[Utterance]
    bad_train: list[dict]
    bad_dev: list[dict]
    originals: int = 0  # training clips kept, before speed-perturbed copies
    dropped: dict = field(default_factory=dict)
    dropped_ids: dict = field(default_factory=dict)
    dropped_copies: int = 0


class _Checkpointer:
    """Saving and restoring a run's complete state at ``out/checkpoints/last.pt``, and the
    metrics log that must agree with it: all of checkpointing lives here."""

    def __init__(self, out: Path, ctx: DistContext):
        self.path = out / "checkpoints" / "last.pt"
        self.metrics = out / "metrics.csv"
        self.ctx = ctx

    def load(self, cfg: TrainConfig) -> dict | None:
        if not (cfg.resume and self.path.is_file()):
            if cfg.resume:
                logger.warning("resume: no checkpoint at %s, starting fresh", self.path)
            return None
        ck = load_checkpoint(self.path)
        written_by = ck["state"].get("world_size", 1)
        if written_by != self.ctx.world_size:
            raise ValueError(f"{self.path}: written by a {written_by}-process run; resume it with the same number of "
                             f"processes (this run has {self.ctx.world_size}), or start afresh without resume=true")
        return ck

    def save(self, t: "_Trainer") -> None:
        rngs = dist_util.gather_objects(_rng_state(), self.ctx)  # every rank's random streams, for an exact resume
        if not self.ctx.is_main:
            return
        ck = {"model": _trainable_state(t.model), "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
              "scaler": t.scaler.state_dict(), "state": asdict(t.st), "rng": rngs[0], "loader_rng": t.loader_gen.get_state(),
              "vocab": t.data.vocab.tokens, "units": units_of(t.data.vocab), "config": asdict(t.cfg)}
        if isinstance(t.data.vocab, SubwordVocabulary):
            ck["tokenizer"] = t.data.vocab.to_str()
        if t.distiller is not None:
            ck["distill"] = t.distiller.state_dict()
        if self.ctx.enabled:
            ck["rng_ranks"] = rngs
        with atomic_path(self.path) as tmp:
            torch.save(ck, tmp)

    def restore(self, ck: dict, t: "_Trainer") -> None:
        missing, unexpected = t.model.load_state_dict(ck["model"], strict=False)
        if unexpected or any(not k.startswith("encoder.") for k in missing):
            raise RuntimeError(f"{self.path}: checkpoint does not match the model ({unexpected or missing})")
        if (t.distiller is None) != ("distill" not in ck):
            raise ValueError(f"{self.path}: written {'with' if 'distill' in ck else 'without'} a teacher; resume with the "
                             "same teacher setting, or start afresh")
        if t.distiller is not None:
            t.distiller.load_state_dict(ck["distill"])
        t.optimizer.load_state_dict(ck["optimizer"])
        t.scheduler.load_state_dict(ck["scheduler"])
        t.scaler.load_state_dict(ck["scaler"])
        t.st = TrainState.from_dict(ck["state"])
        t.horizon["total"] = t.st.schedule_total or t.cfg.max_steps
        _set_rng_state(ck["rng_ranks"][self.ctx.rank] if "rng_ranks" in ck else ck["rng"])
        t.loader_gen.set_state(ck["loader_rng"])
        logger.info("resumed from %s at step %d", self.path, t.st.step)

    def trim_metrics(self, step: int) -> None:
        """On resume, forget rows logged after the checkpoint (they will be redone), and a
        last row cut short by a killed process."""
        if not self.ctx.is_main or not self.metrics.exists():
            return
        text = self.metrics.read_text(encoding="utf-8")
        if not text.endswith("\n"):  # a row cut short: drop it
            text = text[: text.rfind("\n") + 1]
        rows = [r for r in csv.DictReader(io.StringIO(text, newline=""))
                if None not in r.values() and None not in r and r["step"].isdigit() and int(r["step"]) <= step]
        with atomic_path(self.metrics) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def append_metrics(self, st: TrainState, optimizer, row: dict) -> None:
        if not self.ctx.is_main:
            return
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        new = not self.metrics.exists()
        with open(self.metrics, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            w.writerow({"step": st.step, "epoch": st.epoch, "loss": st.loss, "lr_head": lrs.get("head"),
                        "lr_encoder": lrs.get("encoder", lrs.get("adapter", "")), "audio_hours": round(st.audio_seconds / 3600, 5),
                        "elapsed_s": round(st.elapsed, 2), "dev_wer": row.get("dev_wer", ""), "dev_cer": row.get("dev_cer", ""),
                        "distill_loss": "" if st.distill_loss is None else st.distill_loss})


def _train(cfg: TrainConfig, ctx: DistContext, device: torch.device, progress: bool,
           should_stop: Callable[[int], bool] | None) -> dict:
    out = Path(cfg.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config_yaml(cfg, out / "config.yaml")
    seed_everything(cfg.seed)
    checkpointer = _Checkpointer(out, ctx)
    data = _read_data(cfg)
    ck = checkpointer.load(cfg)
    complete = ck is not None and _run_complete(TrainState.from_dict(ck["state"]), cfg)
    if complete and (out / "train_summary.json").is_file():
        logger.warning("%s: this run is complete (%s at step %d); nothing to do. Raise max_steps to train on, "
                       "or start afresh without resume=true", out, ck["state"]["finished"], ck["state"]["step"])
        return json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    trainer = _Trainer(cfg, ctx, device, data, ck, checkpointer, progress)
    return trainer.run(should_stop, complete)


def _read_data(cfg: TrainConfig) -> _TrainData:
    """Manifests (every unreadable or missing file reported at once) and the normaliser."""
    normalizer = Normalizer(NormalizerConfig(**cfg.normalizer))
    hint = "; fix them, or train with on_bad_audio=skip, or re-run `speechtl prepare --on-bad-audio skip`"
    train_utts, bad_train = check_readable(read_manifest(cfg.train, check_files=False), cfg.on_bad_audio, hint)
    dev_utts, bad_dev = check_readable(read_manifest(cfg.dev, check_files=False), cfg.on_bad_audio, hint) if cfg.dev else ([], [])
    return _TrainData(normalizer, None, train_utts, dev_utts, bad_train, bad_dev)


def _choose_vocab(cfg: TrainConfig, data: _TrainData, ck: dict | None, ckpt_path: Path | None = None,
                  ctx: DistContext = DistContext()) -> Vocabulary | SubwordVocabulary:
    """The vocabulary file, else the checkpoint's, else one built from the training text:
    its characters, or (``units=bpe:N``/``unigram:N``) a subword tokenizer trained on it
    (on rank 0, and sent to the other ranks)."""
    train_texts = [data.normalizer(u.text) for u in data.train]
    subword = parse_units(cfg.units)[0] != "char"
    if cfg.vocab:
        vocab = Vocabulary.load(cfg.vocab)
    elif ck is not None:
        written = ck.get("units", "char")
        if parse_units(written) != parse_units(cfg.units):
            raise ValueError(f"{ckpt_path}: written with {describe_units(written)} units ({written}), and this run has "
                             f"units={cfg.units}; resume with the same units, or start afresh without resume=true")
        vocab = SubwordVocabulary.from_str(ck["tokenizer"], written) if subword else Vocabulary(ck["vocab"])
    elif subword:
        trained: tuple = ("", "")
        if ctx.is_main:
            try:
                trained = (SubwordVocabulary.train(train_texts, cfg.units).to_str(), "")
            except ValueError as e:  # told to every rank, so that none waits for the others
                trained = ("", str(e))
        tokenizer, error = dist_util.broadcast_object(trained, ctx)
        if error:
            raise ValueError(error)
        vocab = SubwordVocabulary.from_str(tokenizer, cfg.units)
        logger.info("units=%s: a tokenizer of %d units trained on the %d training transcripts", cfg.units, len(vocab),
                    len(train_texts))
    else:
        vocab = Vocabulary.build(train_texts)
    for name, texts in (("train", train_texts), ("dev", [data.normalizer(u.text) for u in data.dev])):
        oov = vocab.oov_report(texts)
        if oov:
            logger.warning("%s set: %s (mapped to [UNK])", name, describe_oov(oov))
    return vocab


def _filter_data(cfg: TrainConfig, data: _TrainData, frames_for: Callable[[int], int], span: float, ck: dict | None,
                 ckpt_path: Path) -> None:
    """Drop what CTC cannot train on (and clips over ``max_duration`` or the encoder's span),
    then add the speed-perturbed copies, filtered in their turn."""
    max_duration = cfg.max_duration
    # an encoder with a fixed span (Whisper: 30 s) cannot take longer clips; they are dropped and counted like others
    if span < (max_duration if max_duration is not None else float("inf")):
        logger.info("max_duration %s s: this encoder takes clips of at most %g s", cfg.max_duration, span)
        max_duration = span
    texts = [data.normalizer(u.text) for u in data.train]
    data.train, dropped_ids = filter_trainable(data.train, texts, data.vocab, frames_for, max_duration)
    data.originals = len(data.train)
    if cfg.speed_perturb:
        copies = speed_copies(data.train, cfg.speed_perturb)[data.originals:]
        kept, gone = filter_trainable(copies, [data.normalizer(u.text) for u in copies], data.vocab, frames_for, max_duration)
        data.dropped_copies = sum(len(v) for v in gone.values())
        data.train = data.train + kept
        logger.info("speed perturbation %s: %d training items (%d copies dropped: too short for their transcript "
                    "or too long)", ", ".join(f"{f:g}" for f in cfg.speed_perturb), len(data.train), data.dropped_copies)
    if ck is not None and ck["state"].get("train_items", len(data.train)) != len(data.train):
        raise ValueError(f"{ckpt_path}: written for {ck['state']['train_items']} training items, this run has "
                         f"{len(data.train)} (the manifest, its filtering or speed_perturb changed); the batches would "
                         "not continue where they stopped, so resume with the same data, or start afresh")
    data.dropped_ids = dropped_ids
    data.dropped = {k: len(v) for k, v in dropped_ids.items()}
    if any(data.dropped.values()):
        logger.warning("dropped from training: %d with empty transcript, %d too short for their transcript under CTC, "
                       "%d longer than max_duration=%s s", data.dropped["empty_transcript"],
                       data.dropped["too_short_for_transcript"], data.dropped["too_long"], cfg.max_duration)
    if not data.train:
        raise ValueError(f"{cfg.train}: no trainable utterances left after filtering ({data.dropped})")


class _Trainer:
    """One training run: built phase by phase in ``__init__``, then :meth:`run`."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, device: torch.device, data: _TrainData, ck: dict | None,
                 checkpointer: _Checkpointer, progress: bool):
        self.cfg, self.ctx, self.device, self.data, self.checkpointer = cfg, ctx, device, data, checkpointer
        self.out = Path(cfg.out)
        self.progress = progress
        data.vocab = _choose_vocab(cfg, data, ck, checkpointer.path, ctx)
        self._build_model()
        span = self.model.encoder.max_seconds if self.model.encoder is not None else float("inf")
        if self.distiller is not None:
            span = min(span, self.distiller.teacher.max_seconds)
        _filter_data(cfg, data, self.model.frame_lengths, span, ck, checkpointer.path)
        self.model.to(device)
        if ctx.rank:  # the same weights everywhere (built from cfg.seed), but each rank its own dropout and masks
            seed_everything(cfg.seed + ctx.rank)
        self.dev_mine = data.dev[ctx.rank :: ctx.world_size]  # each rank scores its share of dev; results are gathered
        self.global_seconds = ctx.world_size * cfg.grad_accum * cfg.max_batch_seconds
        logger.info("global batch: %d process(es) x %d micro-batch(es) of <= %g s padded audio = <= %g s per update",
                    ctx.world_size, cfg.grad_accum, cfg.max_batch_seconds, self.global_seconds)
        self._build_optimizer()
        self._prepare_features()
        self._build_loader()
        self.step_module: nn.Module = _TrainStep(self.model, self.distiller)
        if ctx.enabled:
            # a trained encoder can leave parameters unused in a step (a freeze period, layerdrop, the mask
            # embedding without masking); a frozen-mode head uses all of its own
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.mode != "frozen", broadcast_buffers=False)
        self.st = TrainState(world_size=ctx.world_size, train_items=len(data.train))
        if ck is not None:
            checkpointer.restore(ck, self)
        checkpointer.trim_metrics(self.st.step)
        self.shown: dict = {}  # the progress bar's postfix: loss, and dev WER/CER since the last evaluation

    def _build_model(self) -> None:
        cfg = self.cfg
        head = HeadConfig(cfg.head, cfg.head_dropout, cfg.bilstm_hidden, cfg.bilstm_layers)
        overrides = {k: getattr(cfg, k) for k in ("mask_time_prob", "mask_time_length", "mask_feature_prob", "mask_feature_length",
                                                  "layerdrop", "frozen_mask_time_prob", "frozen_mask_feature_prob")}
        encoder = str(resolve_model_dir(cfg.init_from) / "encoder") if cfg.init_from else cfg.encoder
        if cfg.init_from and cfg.encoder != "default":
            logger.warning("encoder=%s is not used: init_from=%s brings its own encoder", cfg.encoder, cfg.init_from)
        source = read_meta(cfg.init_from) if cfg.init_from else None
        if source is not None and source["mode"] == "adapter" and cfg.mode != "adapter":
            raise ValueError(f"config key 'init_from': {cfg.init_from} is an adapter model; add a language to it with "
                             f"mode=adapter lang=L, or fine-tune its base encoder with encoder={encoder}")
        adapter, lang = None, None
        if cfg.mode == "adapter":
            existing = source.get("adapter") if source is not None and source["mode"] == "adapter" else None
            adapter = resolve_adapter_config(cfg.adapter, cfg.lora_rank, cfg.lora_alpha, cfg.adapter_dim, existing,
                                             str(cfg.init_from))
            lang = training_language(cfg.lang, self.data.train)
        self.model = build_model(encoder, cfg.mode, len(self.data.vocab), head, cfg.seed, overrides, cfg.trust_remote_code,
                                 cfg.freeze_feature_encoder, cfg.freeze_layers, adapter, lang)
        if cfg.init_from:
            carried = init_from_model(self.model, self.data.vocab, cfg.init_from)
            if "new_language" in carried:
                logger.info("adding language %s to %s (which has %s)", lang, cfg.init_from,
                            ", ".join(sorted(self.model.other_languages)))
            else:
                logger.info("started from %s: %d output rows kept, %d new (%s), %d dropped (%s)", cfg.init_from,
                            len(carried["kept"]), len(carried["added"]), " ".join(carried["added"][:20]),
                            len(carried["removed"]), " ".join(carried["removed"][:20]))
        if adapter is not None:
            logger.info("adapter mode: %s adapters %s for language %s; %d adapter parameters on a fixed base of %d",
                        adapter.kind, adapter.to_dict(), lang, sum(p.numel() for p in self.model.adapter_parameters()),
                        self.model.encoder_info["parameters"])
        self.distiller = _build_distiller(cfg, self.model, self.device)

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        self.groups = [{"params": self.model.head_parameters(), "lr": cfg.lr, "name": "head"}]
        if cfg.mode == "adapter":  # adapters are new weights, trained at the head's rate
            self.groups.append({"params": self.model.adapter_parameters(), "lr": cfg.lr, "name": "adapter"})
        elif cfg.mode != "frozen":
            self.groups += self.model.encoder_groups(cfg.encoder_lr, cfg.layer_lr_decay)
        if self.distiller is not None:
            self.groups.append({"params": list(self.distiller.parameters()), "lr": cfg.lr, "name": "distill"})
        self.optimizer = torch.optim.AdamW(self.groups, weight_decay=cfg.weight_decay)
        # the updates the schedule spans: max_steps, or fewer when max_minutes binds (fitted as training goes)
        self.horizon = {"total": cfg.max_steps}
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.horizon))
        self.amp_dtype = autocast_dtype(self.device, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _prepare_features(self) -> None:
        """Frozen mode: the encoder's outputs computed once (on disk or in memory), when they fit.

        Training features follow amp (bf16 on CUDA, and on CPUs with AMX); dev features are
        float32, as ``speechtl evaluate`` and transcription compute them, so the dev score
        logged here is the one the saved model gets."""
        cfg, model, data, ctx, device = self.cfg, self.model, self.data, self.ctx, self.device
        self.features = self.dev_features = None
        # dev recordings longer than a decoding window are scored from their audio, in windows
        dev_short = [u for u in data.dev if u.duration <= DEV_WINDOW_S]
        if cfg.mode == "frozen" and cfg.feature_cache:
            self.features, self.dev_features = (
                open_or_extract(model.encoder, utts, Path(cfg.feature_cache) / name, device, None, None, self.progress, ctx, amp)
                for name, utts, amp in (("train", data.train, cfg.amp), ("dev", dev_short, "none"))
            )
            if len(dev_short) == len(data.dev):
                model.drop_encoder(self.out / "encoder", save=ctx.is_main)  # the head trains on the cache alone
            else:
                logger.info("keeping the encoder for %d dev recording(s) longer than %g s", len(data.dev) - len(dev_short),
                            DEV_WINDOW_S)
        elif cfg.mode == "frozen" and cfg.cache_features:
            dev_mine_short = [u for u in self.dev_mine if u.duration <= DEV_WINDOW_S]
            # every process on this machine holds its own copy of the training features
            per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
            need = estimate_bytes(model.encoder, data.train) * per_machine + estimate_bytes(model.encoder, dev_short)
            if need <= cfg.cache_max_gb * 1e9:
                logger.info("computing frozen encoder features once (%.2f GB)", need / 1e9)
                # one store per set: train and dev manifests may reuse the same utterance ids
                self.features, self.dev_features = (
                    extract_in_memory(model.encoder, utts, device, None, self._workers(utts), self.progress, amp=amp)
                    for utts, amp in ((data.train, cfg.amp), (dev_mine_short, "none"))
                )
            else:
                logger.warning("features need %.1f GB > cache_max_gb=%.1f: running the encoder every step", need / 1e9,
                               cfg.cache_max_gb)

    def _workers(self, utterances) -> int:
        """``num_workers``, or when unset the rule for jobs beside an encoder (:func:`decode_workers`)."""
        if self.cfg.num_workers is not None:
            return self.cfg.num_workers
        return decode_workers(self.device, [u.duration for u in utterances])

    def _build_loader(self) -> None:
        cfg, data, ctx = self.cfg, self.data, self.ctx
        self.loader_gen = torch.Generator()  # keeps worker seeding off the global RNG, so resume is exact
        self.loader_gen.manual_seed(cfg.seed)
        if self.features is not None:
            dataset = FeatureDataset(data.train, self.features, normalize=data.normalizer, encode=data.vocab.encode)
            collate_fn, workers = collate_features, 0
        else:
            augment = Augmenter() if cfg.augment > 0 else None
            dataset = AudioDataset(data.train, normalize=data.normalizer, encode=data.vocab.encode, augment=augment,
                                   augment_prob=cfg.augment, keep_clean=augment is not None and self.distiller is not None)
            collate_fn, workers = collate, self._workers(data.train)
        self.sampler = DynamicBucketSampler(dataset.durations, cfg.max_batch_seconds, shuffle=True, seed=cfg.seed,
                                            rank=ctx.rank, world_size=ctx.world_size)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate_fn, num_workers=workers,
                                 pin_memory=self.features is None and self.device.type == "cuda", generator=self.loader_gen,
                                 persistent_workers=False)

    # ------------------------------------------------------------------ evaluation

    def score_dev(self):
        # each rank decodes its share; the hypotheses are gathered and scored once, as in one process
        data = self.data
        hyps = decode_hyps(self.model, data.vocab, data.normalizer, self.dev_mine, self.device,
                           max_batch_seconds=max(self.cfg.max_batch_seconds, 60.0), features=self.dev_features,
                           chunk_length_s=DEV_WINDOW_S)
        if self.ctx.enabled:
            hyps = {k: v for part in dist_util.gather_objects(hyps, self.ctx) for k, v in part.items()}
        return score_hyps(data.dev, hyps, data.normalizer)

    def save_model(self) -> None:
        if self.ctx.is_main:
            save_model_dir(self.model, self.data.vocab, self.data.normalizer, self.out / "model",
                           extra={"step": self.st.step, "train_config": asdict(self.cfg)})

    def evaluate_and_keep(self) -> dict:
        """Score dev (when there is one) and keep the model if it is the best so far; the metrics row."""
        st = self.st
        if self.cfg.average_last:
            self.snapshot()
        if not self.data.dev:
            self.save_model()
            return {}
        report = self.score_dev()
        metric = report.cer if self.cfg.best_metric == "cer" else report.wer
        self.shown.update(dev_wer=f"{report.wer:.3f}", dev_cer=f"{report.cer:.3f}")
        logger.info("step %d: dev WER %.4f CER %.4f (loss %.4f)", st.step, report.wer, report.cer, st.loss or 0.0)
        if st.best is None or metric < st.best["metric"]:
            st.best = {"metric": metric, "wer": report.wer, "cer": report.cer}
            st.best_step = st.step
            st.bad_evals = 0
            self.save_model()
            if self.ctx.is_main:
                write_results(report, self.out / "dev")
        else:
            st.bad_evals += 1
        return {"dev_wer": report.wer, "dev_cer": report.cer}

    def snapshot(self) -> None:
        """The trainable weights at this evaluation, for ``average_last``; the last K are kept."""
        if not self.ctx.is_main:
            return
        folder = self.out / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in _trainable_state(self.model).items()}
        with atomic_path(folder / f"eval-{self.st.step:08d}.safetensors") as tmp:
            save_file(state, str(tmp))
        for old in sorted(folder.glob("eval-*.safetensors"))[: -self.cfg.average_last]:
            old.unlink()

    def average_snapshots(self) -> dict | None:
        """Write the mean of the kept snapshots to ``out/model_avg`` and score it on dev (every
        rank takes part: dev scoring is gathered across ranks)."""
        dist_util.barrier(self.ctx)  # rank 0 wrote the snapshots
        files = sorted((self.out / "checkpoints").glob("eval-*.safetensors"))[-self.cfg.average_last :]
        if len(files) < 2:
            logger.warning("average_last=%d: only %d evaluation(s) to average; no model_avg written", self.cfg.average_last,
                           len(files))
            return None
        mean = average_state_dicts([load_file(str(f)) for f in files], [f.name for f in files])
        self.model.load_state_dict(mean, strict=False)
        data, steps = self.data, [int(f.stem.split("-")[1]) for f in files]
        if self.ctx.is_main:
            save_model_dir(self.model, data.vocab, data.normalizer, self.out / "model_avg",
                           extra={"averaged_steps": steps, "train_config": asdict(self.cfg)})
        result: dict = {"steps": steps, "model_dir": str(self.out / "model_avg")}
        if data.dev:
            report = self.score_dev()
            if self.ctx.is_main:
                write_results(report, self.out / "dev_avg")
            result.update(dev_wer=report.wer, dev_cer=report.cer)
            logger.info("average of steps %s: dev WER %.4f CER %.4f", steps, report.wer, report.cer)
        return result

    # ------------------------------------------------------------------ the loop

    def micro_step(self, batch) -> tuple[float, float]:
        """Forward and backward of one micro-batch; its share of the update's loss, and of
        the distillation loss within it."""
        cfg = self.cfg
        b = batch.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            if self.features is not None:
                logits, frames, aux = self.step_module(b.hidden, b.frame_lengths, from_features=True)
            else:
                logits, frames, aux = self.step_module(b.waveforms, b.lengths, clean=b.clean)
        loss = ctc_loss(logits, frames, b.targets, b.target_lengths)
        if aux is not None:
            loss = loss + cfg.distill_weight * aux
        loss = loss / cfg.grad_accum
        self.scaler.scale(loss).backward()
        return loss.item(), 0.0 if aux is None else aux.item() / cfg.grad_accum

    def optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.groups for p in g["params"]], self.cfg.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, should_stop: Callable[[int], bool] | None, complete: bool) -> dict:
        cfg, st, ctx = self.cfg, self.st, self.ctx
        start = time.monotonic() - st.elapsed
        budget = None if cfg.max_minutes is None else cfg.max_minutes * 60
        bar = tqdm(total=cfg.max_steps, initial=st.step, desc=f"train[{cfg.mode}]", unit="step", disable=not self.progress)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # a complete run resumed (killed before its summary was written) goes straight to the summary
        stop_reason = st.finished if complete else None
        micro, acc = 0, [0.0, 0.0, 0.0, 0]  # loss, distillation loss, audio seconds, utterances since the last update
        save_every = cfg.save_every or cfg.eval_every
        while stop_reason is None:
            self.sampler.set_epoch(st.epoch)
            self.sampler.skip = st.batch_in_epoch
            for batch in self.loader:
                st.batch_in_epoch += 1
                self.model.encoder_trainable = cfg.mode != "frozen" and st.step >= cfg.freeze_encoder_steps
                # gradients are averaged across ranks on the last micro-batch of an update only
                sync = micro + 1 >= cfg.grad_accum or not ctx.enabled
                with contextlib.nullcontext() if sync else self.step_module.no_sync():
                    loss, aux = self.micro_step(batch)
                acc[0] += loss
                acc[1] += aux
                acc[2] += float(sum(batch.durations))
                acc[3] += len(batch.durations)
                micro += 1
                if micro < cfg.grad_accum:
                    continue
                self.optimizer_step()
                st.step += 1
                st.elapsed = time.monotonic() - start
                # re-estimated every 5 % of the planned updates: the machine's speed may change
                if budget is not None and (st.step == CALIBRATION_STEPS
                                           or st.step % max(CALIBRATION_STEPS, self.horizon["total"] // 20) == 0):
                    _fit_schedule_to_budget(self.horizon, st, budget, cfg.max_steps, ctx, self.device)
                # one collective per update: mean loss, audio seen, and the stop votes, so every rank
                # stops at the same update (a rank that stopped alone would hang the others)
                time_up = budget is not None and st.elapsed >= budget
                asked = should_stop is not None and should_stop(st.step)
                loss_sum, aux_sum, audio, utts, time_votes, stop_votes = dist_util.sum_across([*acc, time_up, asked], ctx, self.device)
                st.loss, st.audio_seconds, st.utterances = loss_sum / ctx.world_size, st.audio_seconds + audio, st.utterances + int(utts)
                if self.distiller is not None:
                    st.distill_loss = aux_sum / ctx.world_size
                micro, acc = 0, [0.0, 0.0, 0.0, 0]
                bar.update(1)
                self.shown["loss"] = f"{st.loss:.3f}"
                if st.distill_loss is not None:
                    self.shown["distill"] = f"{st.distill_loss:.3f}"
                bar.set_postfix(self.shown)
                # the metrics row goes out before the checkpoint: a kill between the two leaves a row
                # that resume trims and writes again, never a checkpoint whose row is lost
                evaluated = st.step % cfg.eval_every == 0 or st.step >= cfg.max_steps
                row = self.evaluate_and_keep() if evaluated else {} if st.step % cfg.log_every == 0 else None
                if row is not None:
                    self.checkpointer.append_metrics(st, self.optimizer, row)
                if evaluated or st.step % save_every == 0:
                    self.checkpointer.save(self)
                stop_reason = _stop_reason(cfg, st, time_votes)
                if stop_reason is None and stop_votes:
                    self.checkpointer.save(self)
                    bar.close()
                    raise TrainingInterrupted(f"stopped at step {st.step}")
                if stop_reason:
                    break
            else:
                st.epoch += 1
                st.batch_in_epoch = 0
        if not complete:
            if st.step % cfg.eval_every != 0 and st.step < cfg.max_steps:
                self.checkpointer.append_metrics(st, self.optimizer, self.evaluate_and_keep())  # every rank: it gathers dev results
            st.finished = stop_reason  # resume=true on this checkpoint is then a no-op
            self.checkpointer.save(self)
        bar.close()
        averaged = self.average_snapshots() if cfg.average_last else None
        return self.summary(stop_reason, time.monotonic() - start, averaged)

    def summary(self, stop_reason: str | None, wall_s: float, averaged: dict | None = None) -> dict:
        cfg, st, data = self.cfg, self.st, self.data
        summary = {
            "mode": cfg.mode,
            "encoder": cfg.encoder,
            "steps": st.step,
            "epochs": st.epoch + st.batch_in_epoch / max(len(self.sampler), 1),
            "stop_reason": stop_reason,
            "wall_time_s": round(wall_s, 2),
            "audio_hours_seen": st.audio_seconds / 3600,
            "utterances_seen": st.utterances,
            "train_utterances": data.originals,
            "train_hours": sum(u.duration for u in data.train[: data.originals]) / 3600,
            "speed_perturb": list(cfg.speed_perturb),
            "train_items": len(data.train),  # with the speed-perturbed copies
            "dropped_copies": data.dropped_copies,
            "dropped": data.dropped,
            "dropped_ids": {k: v[:100] for k, v in data.dropped_ids.items() if v},  # the first 100 of each reason
            "skipped_audio": (data.bad_train + [{**b, "set": "dev"} for b in data.bad_dev])[:100],
            "final_train_loss": st.loss,
            "best_step": st.best_step,
            "best_dev_wer": st.best["wer"] if st.best else None,
            "best_dev_cer": st.best["cer"] if st.best else None,
            "trainable_parameters": sum(p.numel() for g in self.groups for p in g["params"]),
            "total_parameters": self.model.encoder_info.get("parameters", 0) + sum(p.numel() for p in self.model.head_parameters())
                                + sum(p.numel() for p in self.model.adapter_parameters()),
            "world_size": self.ctx.world_size,
            "global_batch": {"processes": self.ctx.world_size, "grad_accum": cfg.grad_accum,
                             "max_batch_seconds": cfg.max_batch_seconds, "max_seconds_per_update": self.global_seconds},
            "device": str(self.device),
            "amp": str(self.amp_dtype) if self.amp_dtype else "none",
            "model_dir": str(self.out / "model"),
            "config": {k: v for k, v in asdict(cfg).items()},
        }
        if self.model.mode == "adapter":
            summary.update(adapter=self.model.adapter_config.to_dict(), language=self.model.language,
                           languages=sorted({self.model.language, *self.model.other_languages}),
                           adapter_parameters=sum(p.numel() for p in self.model.adapter_parameters()))
        if averaged is not None:
            summary["average"] = averaged
        if self.ctx.is_main:
            write_json(self.out / "train_summary.json", summary)
        return summary


def _stop_reason(cfg: TrainConfig, st: TrainState, time_votes: float) -> str | None:
    if st.step >= cfg.max_steps:
        return "max_steps"
    if time_votes:
        return "max_minutes"
    if cfg.patience and st.bad_evals >= cfg.patience:
        return "early_stopping"
    return None


def _build_distiller(cfg: TrainConfig, model: CTCModel, device: torch.device) -> Distiller | None:
    """The frozen teacher and the student's projections, when ``cfg.teacher`` is set."""
    if cfg.teacher is None:
        return None
    teacher = load_encoder(cfg.teacher, trust_remote_code=cfg.trust_remote_code).to(device)
    student_n = model.encoder.num_layers - 1
    teacher_layers = list(cfg.teacher_layers) or spread_layers(teacher.num_layers - 1, 3)
    if abs(teacher.frame_rate - model.encoder.frame_rate) > 1e-6:
        raise ValueError(f"config key 'teacher': {cfg.teacher} gives {teacher.frame_rate:g} frames/s and the encoder "
                         f"{model.encoder.frame_rate:g}; distillation needs the same frame rate")
    student_layers = list(cfg.student_layers) or spread_layers(student_n, len(teacher_layers))
    if max(student_layers) > student_n:
        raise ValueError(f"config key 'student_layers': {student_layers} outside the encoder's hidden states 0..{student_n}")
    distiller = Distiller(teacher, teacher_layers, student_layers, model.encoder.hidden_size)
    logger.info("distilling %s hidden states %s into encoder layers %s", cfg.teacher, distiller.teacher_layers,
                distiller.student_layers)
    return distiller.to(device)


def write_config_yaml(cfg: TrainConfig, path: Path) -> None:
    """The resolved configuration, so that ``speechtl train out/config.yaml`` repeats the run:
    local paths are made absolute (a YAML's relative paths are read against its folder)."""
    import yaml

    data = asdict(cfg)
    for key in ("train", "dev", "vocab", "init_from", "feature_cache", "out", "encoder"):
        value = data.get(key)
        if isinstance(value, str) and value and (key != "encoder" or Path(value).exists()):
            data[key] = str(Path(value).resolve())
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    with atomic_path(path) as tmp:
        tmp.write_text("# the resolved configuration of this run; `speechtl train THIS_FILE` repeats it\n"
                       + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _fit_schedule_to_budget(horizon: dict, st: TrainState, budget: float, max_steps: int, ctx, device) -> None:
    """When ``max_minutes`` will stop training before ``max_steps``, fit the schedule to the
    updates the budget allows (estimated from the time per update so far, evaluations
    included), so that warm-up, hold and decay all happen. Ranks agree on the estimate."""
    per_update = dist_util.sum_across([st.elapsed / st.step], ctx, device)[0] / ctx.world_size
    affordable = st.step + int(max(budget - st.elapsed, 0.0) / max(per_update, 1e-9))
    total = max(min(affordable, max_steps), st.step + 1)
    if total < max_steps and abs(total - horizon["total"]) > 0.02 * horizon["total"]:
        if horizon["total"] == max_steps:
            logger.info("max_minutes binds before max_steps=%d: the learning-rate schedule is fitted to about %d "
                        "updates (%.2f s each so far)", max_steps, total, per_update)
        horizon["total"] = total
        st.schedule_total = total


def _run_complete(state: TrainState, cfg: TrainConfig) -> bool:
    """Whether a checkpoint's run ended and this configuration would not take it further."""
    reason = state.finished
    if reason is None:
        return False
    if state.step < cfg.max_steps and reason == "max_steps":
        return False  # max_steps was raised: train on
    if reason == "max_minutes" and (cfg.max_minutes is None or state.elapsed < cfg.max_minutes * 60):
        return False  # the time budget was raised or lifted
    return True


__all__ = ["TrainConfig", "TrainState", "TrainingInterrupted", "lr_lambda", "min_ctc_frames", "train"]
