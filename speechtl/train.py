"""The training loop shared by all three modes.

One loop, one code path: ``frozen``, ``finetune`` and ``scratch`` differ only in the
freezing policy of :class:`speechtl.model.CTCModel` and in which parameter groups
the optimiser sees.

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
import os
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed as dist_util
from ._io import atomic_path, write_json
from .audio import check_readable
from .config import TrainConfig
from .cache import FeatureCache, StaleCacheError, encoder_fingerprint, extract_to_cache
from .features import FeatureDataset, collate_features, estimate_bytes, extract_in_memory
from .precision import autocast_dtype, compute_dtype_name
from .distill import Distiller, spread_layers
from .distributed import DistContext
from .encoder import load_encoder
from .inference import decode_hyps, score_hyps
from .augment import Augmenter
from .loader import AudioDataset, DynamicBucketSampler, collate, decode_workers, speed_copies
from .manifest import Utterance, read_manifest
from .metrics import write_results
from .model import CTCModel, HeadConfig, build_model, ctc_loss, save_model_dir
from .text import Normalizer, NormalizerConfig, Vocabulary, describe_oov

logger = logging.getLogger(__name__)

CSV_FIELDS = ["step", "epoch", "loss", "lr_head", "lr_encoder", "audio_hours", "elapsed_s", "dev_wer", "dev_cer"]


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
    # a frozen encoder never changes and is reloaded from its source on resume
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


def _train(cfg: TrainConfig, ctx: DistContext, device: torch.device, progress: bool,
           should_stop: Callable[[int], bool] | None) -> dict:
    out = Path(cfg.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config_yaml(cfg, out / "config.yaml")
    ckpt_path = out / "checkpoints" / "last.pt"
    seed_everything(cfg.seed)
    normalizer = Normalizer(NormalizerConfig(**cfg.normalizer))

    # missing files are reported with the unreadable ones, all at once, by check_readable
    hint = "; fix them, or train with on_bad_audio=skip, or re-run `speechtl prepare --on-bad-audio skip`"
    train_utts, bad_train = check_readable(read_manifest(cfg.train, check_files=False), cfg.on_bad_audio, hint)
    dev_utts, bad_dev = check_readable(read_manifest(cfg.dev, check_files=False), cfg.on_bad_audio, hint) if cfg.dev else ([], [])
    train_texts = [normalizer(u.text) for u in train_utts]
    ck = load_checkpoint(ckpt_path) if cfg.resume and ckpt_path.is_file() else None
    if ck is not None and ck["state"].get("world_size", 1) != ctx.world_size:
        raise ValueError(f"{ckpt_path}: written by a {ck['state'].get('world_size', 1)}-process run; resume it with the same"
                         f" number of processes (this run has {ctx.world_size}), or start afresh without resume=true")
    complete = ck is not None and _run_complete(ck["state"], cfg)
    if complete and (out / "train_summary.json").is_file():
        logger.warning("%s: this run is complete (%s at step %d); nothing to do. Raise max_steps to train on, "
                       "or start afresh without resume=true", out, ck["state"]["finished"], ck["state"]["step"])
        return json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    if cfg.vocab:
        vocab = Vocabulary.load(cfg.vocab)
    elif ck is not None:
        vocab = Vocabulary(ck["vocab"])
    else:
        vocab = Vocabulary.build(train_texts)
    for name, texts in (("train", train_texts), ("dev", [normalizer(u.text) for u in dev_utts])):
        oov = vocab.oov_report(texts)
        if oov:
            logger.warning("%s set: %s (mapped to [UNK])", name, describe_oov(oov))

    head = HeadConfig(cfg.head, cfg.head_dropout, cfg.bilstm_hidden, cfg.bilstm_layers)
    overrides = {k: getattr(cfg, k) for k in ("mask_time_prob", "mask_time_length", "mask_feature_prob", "mask_feature_length", "layerdrop",
                                              "frozen_mask_time_prob", "frozen_mask_feature_prob")}
    model = build_model(cfg.encoder, cfg.mode, len(vocab), head, cfg.seed, overrides, cfg.trust_remote_code, cfg.freeze_feature_encoder)
    distiller = _build_distiller(cfg, model, device)
    # an encoder with a fixed span (Whisper: 30 s) cannot take longer clips; they are dropped and counted like others
    max_duration = cfg.max_duration
    span = model.encoder.max_seconds if model.encoder is not None else float("inf")
    if distiller is not None:
        span = min(span, distiller.teacher.max_seconds)
    if span < (max_duration if max_duration is not None else float("inf")):
        logger.info("max_duration %s s: this encoder takes clips of at most %g s", cfg.max_duration, span)
        max_duration = span
    train_utts, dropped_ids = filter_trainable(train_utts, train_texts, vocab, model.frame_lengths, max_duration)
    originals, dropped_copies = len(train_utts), 0
    if cfg.speed_perturb:  # copies of the kept clips at other speeds, filtered in their turn
        copies = speed_copies(train_utts, cfg.speed_perturb)[originals:]
        kept, gone = filter_trainable(copies, [normalizer(u.text) for u in copies], vocab, model.frame_lengths, max_duration)
        dropped_copies = sum(len(v) for v in gone.values())
        train_utts = train_utts + kept
        logger.info("speed perturbation %s: %d training items (%d copies dropped: too short for their transcript "
                    "or too long)", ", ".join(f"{f:g}" for f in cfg.speed_perturb), len(train_utts), dropped_copies)
    if ck is not None and ck["state"].get("train_items", len(train_utts)) != len(train_utts):
        raise ValueError(f"{ckpt_path}: written for {ck['state']['train_items']} training items, this run has "
                         f"{len(train_utts)} (the manifest, its filtering or speed_perturb changed); the batches would "
                         "not continue where they stopped, so resume with the same data, or start afresh")
    dropped = {k: len(v) for k, v in dropped_ids.items()}
    if any(dropped.values()):
        logger.warning("dropped from training: %d with empty transcript, %d too short for their transcript under CTC, "
                       "%d longer than max_duration=%s s", dropped["empty_transcript"], dropped["too_short_for_transcript"],
                       dropped["too_long"], cfg.max_duration)
    if not train_utts:
        raise ValueError(f"{cfg.train}: no trainable utterances left after filtering ({dropped})")
    model.to(device)
    if ctx.rank:  # the same weights everywhere (built from cfg.seed), but each rank its own dropout and masks
        seed_everything(cfg.seed + ctx.rank)
    dev_mine = dev_utts[ctx.rank :: ctx.world_size]  # each rank scores its share of dev; results are gathered
    global_seconds = ctx.world_size * cfg.grad_accum * cfg.max_batch_seconds
    logger.info("global batch: %d process(es) x %d micro-batch(es) of <= %g s padded audio = <= %g s per update",
                ctx.world_size, cfg.grad_accum, cfg.max_batch_seconds, global_seconds)

    groups = [{"params": model.head_parameters(), "lr": cfg.lr, "name": "head"}]
    if cfg.mode != "frozen":
        groups.append({"params": model.encoder_parameters(), "lr": cfg.encoder_lr, "name": "encoder"})
    if distiller is not None:
        groups.append({"params": list(distiller.parameters()), "lr": cfg.lr, "name": "distill"})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    # the updates the schedule spans: max_steps, or fewer when max_minutes binds (fitted as training goes)
    horizon = {"total": cfg.max_steps}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, horizon))
    amp_dtype = autocast_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    features = dev_features = None
    # dev recordings longer than a decoding window are scored from their audio, in windows
    dev_short = [u for u in dev_utts if u.duration <= DEV_WINDOW_S]
    # training features follow amp (bf16 on CUDA, and on CPUs with AMX); dev features are
    # float32, as `speechtl evaluate` and transcription compute them, so the dev score
    # logged here is the one the saved model gets
    if cfg.mode == "frozen" and cfg.feature_cache:
        features, dev_features = (
            open_or_extract(model.encoder, utts, Path(cfg.feature_cache) / name, device, None, None, progress, ctx, amp)
            for name, utts, amp in (("train", train_utts, cfg.amp), ("dev", dev_short, "none"))
        )
        if len(dev_short) == len(dev_utts):
            model.drop_encoder(out / "encoder", save=ctx.is_main)  # the head trains on the cache alone
        else:
            logger.info("keeping the encoder for %d dev recording(s) longer than %g s", len(dev_utts) - len(dev_short), DEV_WINDOW_S)
    elif cfg.mode == "frozen" and cfg.cache_features:
        dev_mine_short = [u for u in dev_mine if u.duration <= DEV_WINDOW_S]
        # every process on this machine holds its own copy of the training features
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        need = estimate_bytes(model.encoder, train_utts) * per_machine + estimate_bytes(model.encoder, dev_short)
        if need <= cfg.cache_max_gb * 1e9:
            logger.info("computing frozen encoder features once (%.2f GB)", need / 1e9)
            # one store per set: train and dev manifests may reuse the same utterance ids
            features, dev_features = (
                extract_in_memory(model.encoder, utts, device, None, decode_workers(device), progress, amp=amp)
                for utts, amp in ((train_utts, cfg.amp), (dev_mine_short, "none"))
            )
        else:
            logger.warning("features need %.1f GB > cache_max_gb=%.1f: running the encoder every step", need / 1e9, cfg.cache_max_gb)
    loader_gen = torch.Generator()  # keeps worker seeding off the global RNG, so resume is exact
    loader_gen.manual_seed(cfg.seed)
    if features is not None:
        dataset = FeatureDataset(train_utts, features, normalize=normalizer, encode=vocab.encode)
        sampler = DynamicBucketSampler(dataset.durations, cfg.max_batch_seconds, shuffle=True, seed=cfg.seed,
                                       rank=ctx.rank, world_size=ctx.world_size)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_features, num_workers=0, generator=loader_gen)
    else:
        augment = Augmenter() if cfg.augment > 0 else None
        dataset = AudioDataset(train_utts, normalize=normalizer, encode=vocab.encode, augment=augment,
                               augment_prob=cfg.augment, keep_clean=augment is not None and distiller is not None)
        sampler = DynamicBucketSampler(dataset.durations, cfg.max_batch_seconds, shuffle=True, seed=cfg.seed,
                                       rank=ctx.rank, world_size=ctx.world_size)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda", generator=loader_gen, persistent_workers=False)

    step_module: nn.Module = _TrainStep(model, distiller)
    if ctx.enabled:
        # a trained encoder can leave parameters unused in a step (a freeze period, layerdrop, the mask
        # embedding without masking); a frozen-mode head uses all of its own
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.mode != "frozen", broadcast_buffers=False)

    st = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "audio_seconds": 0.0, "elapsed": 0.0,
          "best": None, "best_step": None, "bad_evals": 0, "loss": None, "world_size": ctx.world_size,
          "train_items": len(train_utts),
          "utterances": 0}
    if ck is not None:
        missing, unexpected = model.load_state_dict(ck["model"], strict=False)
        if unexpected or any(not k.startswith("encoder.") for k in missing):
            raise RuntimeError(f"{ckpt_path}: checkpoint does not match the model ({unexpected or missing})")
        if (distiller is None) != ("distill" not in ck):
            raise ValueError(f"{ckpt_path}: written {'with' if 'distill' in ck else 'without'} a teacher; resume with the "
                             "same teacher setting, or start afresh")
        if distiller is not None:
            distiller.load_state_dict(ck["distill"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        st.update(ck["state"])
        horizon["total"] = st.get("schedule_total", cfg.max_steps)
        _set_rng_state(ck["rng_ranks"][ctx.rank] if "rng_ranks" in ck else ck["rng"])
        loader_gen.set_state(ck["loader_rng"])
        logger.info("resumed from %s at step %d", ckpt_path, st["step"])
    elif cfg.resume:
        logger.warning("resume: no checkpoint at %s, starting fresh", ckpt_path)
    metrics_path = out / "metrics.csv"
    if ctx.is_main:
        _trim_metrics(metrics_path, st["step"])

    def save_checkpoint() -> None:
        rngs = dist_util.gather_objects(_rng_state(), ctx)  # every rank's random streams, for an exact resume
        if not ctx.is_main:
            return
        ck = {"model": _trainable_state(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
              "scaler": scaler.state_dict(), "state": dict(st), "rng": rngs[0], "loader_rng": loader_gen.get_state(),
              "vocab": vocab.tokens, "config": asdict(cfg)}
        if distiller is not None:
            ck["distill"] = distiller.state_dict()
        if ctx.enabled:
            ck["rng_ranks"] = rngs
        with atomic_path(ckpt_path) as tmp:
            torch.save(ck, tmp)

    def score_dev():
        # each rank decodes its share; the hypotheses are gathered and scored once, as in one process
        hyps = decode_hyps(model, vocab, normalizer, dev_mine, device, max_batch_seconds=max(cfg.max_batch_seconds, 60.0),
                           features=dev_features, chunk_length_s=DEV_WINDOW_S)
        if ctx.enabled:
            hyps = {k: v for part in dist_util.gather_objects(hyps, ctx) for k, v in part.items()}
        return score_hyps(dev_utts, hyps, normalizer)

    def save_model() -> None:
        if ctx.is_main:
            save_model_dir(model, vocab, normalizer, out / "model", extra={"step": st["step"], "train_config": asdict(cfg)})

    def evaluate_and_keep() -> dict:
        row = {}
        if dev_utts:
            report = score_dev()
            row = {"dev_wer": report.wer, "dev_cer": report.cer}
            metric = report.cer if cfg.best_metric == "cer" else report.wer
            shown.update(dev_wer=f"{report.wer:.3f}", dev_cer=f"{report.cer:.3f}")
            logger.info("step %d: dev WER %.4f CER %.4f (loss %.4f)", st["step"], report.wer, report.cer, st["loss"] or 0.0)
            if st["best"] is None or metric < st["best"]["metric"]:
                st["best"] = {"metric": metric, "wer": report.wer, "cer": report.cer}
                st["best_step"] = st["step"]
                st["bad_evals"] = 0
                save_model()
                if ctx.is_main:
                    write_results(report, out / "dev")
            else:
                st["bad_evals"] += 1
        else:
            save_model()
        return row

    start = time.monotonic() - st["elapsed"]
    budget = None if cfg.max_minutes is None else cfg.max_minutes * 60
    shown: dict = {}  # the progress bar's postfix: loss, and dev WER/CER since the last evaluation
    bar = tqdm(total=cfg.max_steps, initial=st["step"], desc=f"train[{cfg.mode}]", unit="step", disable=not progress)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    # a complete run resumed (killed before its summary was written) goes straight to the summary
    stop_reason = st.get("finished") if complete else None
    micro, loss_acc, audio_acc, utt_acc = 0, 0.0, 0.0, 0
    save_every = cfg.save_every or cfg.eval_every
    while stop_reason is None:
        sampler.set_epoch(st["epoch"])
        sampler.skip = st["batch_in_epoch"]
        for batch in loader:
            st["batch_in_epoch"] += 1
            model.encoder_trainable = cfg.mode != "frozen" and st["step"] >= cfg.freeze_encoder_steps
            b = batch.to(device, non_blocking=True)
            # gradients are averaged across ranks on the last micro-batch of an update only
            sync = micro + 1 >= cfg.grad_accum or not ctx.enabled
            with contextlib.nullcontext() if sync else step_module.no_sync():
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    if features is not None:
                        logits, frames, aux = step_module(b.hidden, b.frame_lengths, from_features=True)
                    else:
                        logits, frames, aux = step_module(b.waveforms, b.lengths, clean=b.clean)
                loss = ctc_loss(logits, frames, b.targets, b.target_lengths)
                if aux is not None:
                    loss = loss + cfg.distill_weight * aux
                loss = loss / cfg.grad_accum
                scaler.scale(loss).backward()
            loss_acc += loss.item()
            audio_acc += float(sum(b.durations))
            utt_acc += len(b.durations)
            micro += 1
            if micro < cfg.grad_accum:
                continue
            scaler.unscale_(optimizer)
            if cfg.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.clip_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            st["step"] += 1
            st["elapsed"] = time.monotonic() - start
            # re-estimated every 5 % of the planned updates: the machine's speed may change
            if budget is not None and (st["step"] == CALIBRATION_STEPS
                                       or st["step"] % max(CALIBRATION_STEPS, horizon["total"] // 20) == 0):
                _fit_schedule_to_budget(horizon, st, budget, cfg.max_steps, ctx, device)
            # one collective per update: mean loss, audio seen, and the stop votes, so every rank
            # stops at the same update (a rank that stopped alone would hang the others)
            time_up = budget is not None and st["elapsed"] >= budget
            asked = should_stop is not None and should_stop(st["step"])
            loss_sum, audio, utts, time_votes, stop_votes = dist_util.sum_across(
                [loss_acc, audio_acc, utt_acc, time_up, asked], ctx, device)
            st["loss"], st["audio_seconds"] = loss_sum / ctx.world_size, st["audio_seconds"] + audio
            st["utterances"] += int(utts)
            micro, loss_acc, audio_acc, utt_acc = 0, 0.0, 0.0, 0
            bar.update(1)
            shown["loss"] = f"{st['loss']:.3f}"
            bar.set_postfix(shown)
            # the metrics row goes out before the checkpoint: a kill between the two leaves a row
            # that resume trims and writes again, never a checkpoint whose row is lost
            evaluated = st["step"] % cfg.eval_every == 0 or st["step"] >= cfg.max_steps
            row = evaluate_and_keep() if evaluated else {} if st["step"] % cfg.log_every == 0 else None
            if row is not None and ctx.is_main:
                _append_metrics(metrics_path, st, optimizer, row)
            if evaluated or st["step"] % save_every == 0:
                save_checkpoint()
            if st["step"] >= cfg.max_steps:
                stop_reason = "max_steps"
            elif time_votes:
                stop_reason = "max_minutes"
            elif cfg.patience and st["bad_evals"] >= cfg.patience:
                stop_reason = "early_stopping"
            elif stop_votes:
                save_checkpoint()
                bar.close()
                raise TrainingInterrupted(f"stopped at step {st['step']}")
            if stop_reason:
                break
        else:
            st["epoch"] += 1
            st["batch_in_epoch"] = 0
    if not complete:
        if st["step"] % cfg.eval_every != 0 and st["step"] < cfg.max_steps:
            row = evaluate_and_keep()  # every rank: it gathers dev results
            if ctx.is_main:
                _append_metrics(metrics_path, st, optimizer, row)
        st["finished"] = stop_reason  # resume=true on this checkpoint is then a no-op
        save_checkpoint()
    bar.close()

    summary = {
        "mode": cfg.mode,
        "encoder": cfg.encoder,
        "steps": st["step"],
        "epochs": st["epoch"] + st["batch_in_epoch"] / max(len(sampler), 1),
        "stop_reason": stop_reason,
        "wall_time_s": round(time.monotonic() - start, 2),
        "audio_hours_seen": st["audio_seconds"] / 3600,
        "utterances_seen": st["utterances"],
        "train_utterances": originals,
        "train_hours": sum(u.duration for u in train_utts[:originals]) / 3600,
        "speed_perturb": list(cfg.speed_perturb),
        "train_items": len(train_utts),  # with the speed-perturbed copies
        "dropped_copies": dropped_copies,
        "dropped": dropped,
        "dropped_ids": {k: v[:100] for k, v in dropped_ids.items() if v},  # the first 100 of each reason
        "skipped_audio": (bad_train + [{**b, "set": "dev"} for b in bad_dev])[:100],
        "final_train_loss": st["loss"],
        "best_step": st["best_step"],
        "best_dev_wer": st["best"]["wer"] if st["best"] else None,
        "best_dev_cer": st["best"]["cer"] if st["best"] else None,
        "trainable_parameters": sum(p.numel() for g in groups for p in g["params"]),
        "world_size": ctx.world_size,
        "global_batch": {"processes": ctx.world_size, "grad_accum": cfg.grad_accum,
                         "max_batch_seconds": cfg.max_batch_seconds, "max_seconds_per_update": global_seconds},
        "device": str(device),
        "amp": str(amp_dtype) if amp_dtype else "none",
        "model_dir": str(out / "model"),
        "config": {k: v for k, v in asdict(cfg).items()},
    }
    if ctx.is_main:
        write_json(out / "train_summary.json", summary)
    return summary


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
    distiller = Distiller(teacher, teacher_layers, spread_layers(student_n, len(teacher_layers)), model.encoder.hidden_size)
    logger.info("distilling %s hidden states %s into encoder layers %s", cfg.teacher, distiller.teacher_layers,
                distiller.student_layers)
    return distiller.to(device)


def write_config_yaml(cfg: TrainConfig, path: Path) -> None:
    """The resolved configuration, so that ``speechtl train out/config.yaml`` repeats the run:
    local paths are made absolute (a YAML's relative paths are read against its folder)."""
    import yaml

    data = asdict(cfg)
    for key in ("train", "dev", "vocab", "feature_cache", "out", "encoder"):
        value = data.get(key)
        if isinstance(value, str) and value and (key != "encoder" or Path(value).exists()):
            data[key] = str(Path(value).resolve())
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    with atomic_path(path) as tmp:
        tmp.write_text("# the resolved configuration of this run; `speechtl train THIS_FILE` repeats it\n"
                       + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _fit_schedule_to_budget(horizon: dict, st: dict, budget: float, max_steps: int, ctx, device) -> None:
    """When ``max_minutes`` will stop training before ``max_steps``, fit the schedule to the
    updates the budget allows (estimated from the time per update so far, evaluations
    included), so that warm-up, hold and decay all happen. Ranks agree on the estimate."""
    per_update = dist_util.sum_across([st["elapsed"] / st["step"]], ctx, device)[0] / ctx.world_size
    affordable = st["step"] + int(max(budget - st["elapsed"], 0.0) / max(per_update, 1e-9))
    total = max(min(affordable, max_steps), st["step"] + 1)
    if total < max_steps and abs(total - horizon["total"]) > 0.02 * horizon["total"]:
        if horizon["total"] == max_steps:
            logger.info("max_minutes binds before max_steps=%d: the learning-rate schedule is fitted to about %d "
                        "updates (%.2f s each so far)", max_steps, total, per_update)
        horizon["total"] = total
        st["schedule_total"] = total


def _run_complete(state: dict, cfg: TrainConfig) -> bool:
    """Whether a checkpoint's run ended and this configuration would not take it further."""
    reason = state.get("finished")
    if reason is None:
        return False
    if state["step"] < cfg.max_steps and reason == "max_steps":
        return False  # max_steps was raised: train on
    if reason == "max_minutes" and (cfg.max_minutes is None or state["elapsed"] < cfg.max_minutes * 60):
        return False  # the time budget was raised or lifted
    return True


def _append_metrics(path: Path, st: dict, optimizer, row: dict) -> None:
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        w.writerow({"step": st["step"], "epoch": st["epoch"], "loss": st["loss"], "lr_head": lrs.get("head"),
                    "lr_encoder": lrs.get("encoder", ""), "audio_hours": round(st["audio_seconds"] / 3600, 5),
                    "elapsed_s": round(st["elapsed"], 2), "dev_wer": row.get("dev_wer", ""), "dev_cer": row.get("dev_cer", "")})


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, forget rows logged after the checkpoint (they will be redone), and a
    last row cut short by a killed process."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):  # a row cut short: drop it
        text = text[: text.rfind("\n") + 1]
    rows = [r for r in csv.DictReader(io.StringIO(text, newline=""))
            if None not in r.values() and None not in r and r["step"].isdigit() and int(r["step"]) <= step]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)


__all__ = ["TrainConfig", "TrainingInterrupted", "lr_lambda", "min_ctc_frames", "train"]
