"""Building a training run once, in the order that keeps resume exact: vocabulary, model
(whose random initialisation draws from the seeded RNG), data filtering, per-rank seeds,
optimiser and schedule, frozen-encoder features, loader, the step module, then the
checkpoint's state over all of it."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core import distributed as dist_util
from ..core.cpus import cap_workers
from ..core.distributed import DistContext
from ..core.precision import autocast_dtype, compute_dtype_name
from ..data.augment import Augmenter
from ..data.loader import AudioDataset, DynamicBucketSampler, collate, decode_workers, ignore_stop_signals
from ..data.manifest import Utterance
from ..encoders.registry import load_encoder
from ..features.cache import FeatureCache, StaleCacheError
from ..features.extract import FeatureDataset, collate_features, estimate_bytes, extract_in_memory, extract_to_cache
from ..features.fingerprint import encoder_fingerprint
from ..models.adapters import resolve_config as resolve_adapter_config
from ..models.adapters import training_language
from ..models.ctc import CTCModel, HeadConfig, build_model
from ..models.distill import Distiller, spread_layers
from ..models.init_from import init_from_model
from ..models.model_dir import read_meta, resolve_model_dir
from ..models.modes import mode_policy
from . import checkpoint
from .config import TrainConfig
from .data import TrainData, choose_vocab, filter_data
from .log import MetricsLog
from .lr import Horizon, lr_lambda
from .run import Run, TrainState

logger = logging.getLogger(__name__)

DEV_WINDOW_S = 30.0  # dev recordings longer than this are decoded from audio in windows of this length


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run(cfg: TrainConfig, ctx: DistContext, device: torch.device, data: TrainData, ck: dict | None,
              progress: bool) -> Run:
    """Every part of a run, restored from ``ck`` when resuming. Each step draws from the RNG in
    the same order on every run, so a fresh run and a resumed one build the same parts."""
    out = Path(cfg.out)
    path = checkpoint.checkpoint_path(out)
    data = replace(data, vocab=choose_vocab(cfg, data, ck, path, ctx))
    model, distiller = build_model_for(cfg, data, device)
    fingerprint = check_same_encoder(cfg, model, ck, path)
    span = model.encoder.max_seconds if model.encoder is not None else float("inf")
    if distiller is not None:
        span = min(span, distiller.teacher.max_seconds)
    data = filter_data(cfg, data, model.frame_lengths, span, ck, path)
    model.to(device)
    if ctx.rank:  # the same weights everywhere (built from cfg.seed), but each rank its own dropout and masks
        seed_everything(cfg.seed + ctx.rank)
    dev_mine = data.dev[ctx.rank :: ctx.world_size]  # each rank scores its share of dev; results are gathered
    global_seconds = ctx.world_size * cfg.grad_accum * cfg.max_batch_seconds
    logger.info("global batch: %d process(es) x %d micro-batch(es) of <= %g s padded audio = <= %g s per update",
                ctx.world_size, cfg.grad_accum, cfg.max_batch_seconds, global_seconds)
    groups, optimizer, horizon, scheduler, amp_dtype, scaler = build_optimizer(cfg, model, distiller, device)
    features, dev_features = prepare_features(cfg, model, data, dev_mine, ctx, device, out, progress)
    loader_gen, sampler, loader = build_loader(cfg, data, features, distiller, ctx, device)
    step_module: nn.Module = TrainStep(model, distiller)
    if ctx.enabled:
        # a trained encoder can leave parameters unused in a step (a freeze period, layerdrop, the mask
        # embedding without masking); a frozen-mode head uses all of its own
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.policy.encoder_grad, broadcast_buffers=False)
    run = Run(cfg=cfg, ctx=ctx, device=device, out=out, progress=progress, data=data, model=model, distiller=distiller,
              groups=groups, optimizer=optimizer, horizon=horizon, scheduler=scheduler, amp_dtype=amp_dtype, scaler=scaler,
              features=features, dev_features=dev_features, dev_mine=dev_mine, global_seconds=global_seconds,
              loader_gen=loader_gen, sampler=sampler, loader=loader, step_module=step_module,
              state=TrainState(world_size=ctx.world_size, train_items=len(data.train)), checkpoint=path,
              metrics=MetricsLog(out / "metrics.csv", ctx, tensorboard="tensorboard" in cfg.log_sinks),
              encoder_fingerprint=fingerprint)
    if ck is not None:
        checkpoint.restore(ck, run)
    run.metrics.trim(run.state.step)
    return run


def check_same_encoder(cfg: TrainConfig, model: CTCModel, ck: dict | None, path: Path) -> str:
    """The fingerprint of the encoder this run starts from (saved in every checkpoint); on
    resume it must be the checkpoint's, or the head would go on training on another encoder's
    features while the run's files named two encoders. Checkpoints written before fingerprints
    were kept are not checked."""
    if model.encoder is None:
        return ""
    fingerprint = encoder_fingerprint(model.encoder)
    was = (ck or {}).get("encoder_fingerprint")
    if was and was != fingerprint:
        before = (ck.get("config") or {}).get("encoder", "?")
        raise ValueError(f"{path}: written by a run on another encoder ({before}, fingerprint {was[:12]}); "
                         f"encoder={cfg.encoder} has fingerprint {fingerprint[:12]}. Resume with the encoder the run "
                         f"started with, or start afresh with overwrite=true (or another out=)")
    return fingerprint


def build_model_for(cfg: TrainConfig, data: TrainData, device: torch.device) -> tuple[CTCModel, Distiller | None]:
    """The model ``cfg`` describes (from ``init_from`` when set), and the distiller with a teacher."""
    head = HeadConfig(cfg.head, cfg.head_dropout, cfg.bilstm_hidden, cfg.bilstm_layers)
    overrides = {k: getattr(cfg, k) for k in ("mask_time_prob", "mask_time_length", "mask_feature_prob", "mask_feature_length",
                                              "layerdrop", "frozen_mask_time_prob", "frozen_mask_feature_prob")}
    encoder = str(resolve_model_dir(cfg.init_from) / "encoder") if cfg.init_from else cfg.encoder
    if cfg.init_from and cfg.encoder != "default":
        logger.warning("encoder=%s is not used: init_from=%s brings its own encoder", cfg.encoder, cfg.init_from)
    source = read_meta(cfg.init_from) if cfg.init_from else None
    if source is not None and mode_policy(source["mode"]).adapters and not cfg.policy.adapters:
        raise ValueError(f"config key 'init_from': {cfg.init_from} is an adapter model; add a language to it with "
                         f"mode=adapter lang=L, or fine-tune its base encoder with encoder={encoder}")
    adapter, lang = None, None
    if cfg.policy.adapters:
        existing = source.get("adapter") if source is not None and mode_policy(source["mode"]).adapters else None
        adapter = resolve_adapter_config(cfg.adapter, cfg.lora_rank, cfg.lora_alpha, cfg.adapter_dim, existing,
                                         str(cfg.init_from))
        lang = training_language(cfg.lang, data.train)
    model = build_model(encoder, cfg.mode, len(data.vocab), head=head, seed=cfg.seed, config_overrides=overrides,
                        trust_remote_code=cfg.trust_remote_code, freeze_feature_encoder=cfg.freeze_feature_encoder,
                        freeze_layers=cfg.freeze_layers, adapter=adapter, language=lang)
    if cfg.init_from:
        carried = init_from_model(model, data.vocab, cfg.init_from)
        if "new_language" in carried:
            logger.info("adding language %s to %s (which has %s)", lang, cfg.init_from,
                        ", ".join(sorted(model.other_languages)))
        else:
            logger.info("started from %s: %d output rows kept, %d new (%s), %d dropped (%s)", cfg.init_from,
                        len(carried["kept"]), len(carried["added"]), " ".join(carried["added"][:20]),
                        len(carried["removed"]), " ".join(carried["removed"][:20]))
    if adapter is not None:
        logger.info("adapter mode: %s adapters %s for language %s; %d adapter parameters on a fixed base of %d",
                    adapter.kind, adapter.to_dict(), lang, sum(p.numel() for p in model.adapter_parameters()),
                    model.encoder_info["parameters"])
    return model, build_distiller(cfg, model, device)


def build_distiller(cfg: TrainConfig, model: CTCModel, device: torch.device) -> Distiller | None:
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


def build_optimizer(cfg: TrainConfig, model: CTCModel, distiller: Distiller | None, device: torch.device):
    """The optimiser's named parameter groups, the optimiser, the schedule's horizon, the
    scheduler, the autocast dtype and the grad scaler."""
    groups = [{"params": model.head_parameters(), "lr": cfg.lr, "name": "head"}]
    if cfg.policy.adapters:  # adapters are new weights, trained at the head's rate
        groups.append({"params": model.adapter_parameters(), "lr": cfg.lr, "name": "adapter"})
    elif cfg.policy.encoder_trains:
        groups += model.encoder_groups(cfg.encoder_lr, cfg.layer_lr_decay)
    if distiller is not None:
        groups.append({"params": list(distiller.parameters()), "lr": cfg.lr, "name": "distill"})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    # the updates the schedule spans: max_steps, or fewer when max_minutes binds (fitted as training goes)
    horizon = Horizon(cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, horizon))
    amp_dtype = autocast_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return groups, optimizer, horizon, scheduler, amp_dtype, scaler


def prepare_features(cfg: TrainConfig, model: CTCModel, data: TrainData, dev_mine: list[Utterance], ctx: DistContext,
                     device: torch.device, out: Path, progress: bool):
    """Frozen mode: the encoder's outputs computed once (on disk or in memory), when they fit.

    Training features follow amp (bf16 on CUDA, and on CPUs with AMX); dev features are
    float32, as ``speechtl evaluate`` and transcription compute them, so the dev score
    logged here is the one the saved model gets."""
    features = dev_features = None
    # dev recordings longer than a decoding window are scored from their audio, in windows
    dev_short = [u for u in data.dev if u.duration <= DEV_WINDOW_S]
    if cfg.policy.cacheable and cfg.feature_cache:
        features, dev_features = (
            open_or_extract(model.encoder, utts, Path(cfg.feature_cache) / name, device, None, None, progress, ctx, amp)
            for name, utts, amp in (("train", data.train, cfg.amp), ("dev", dev_short, "none"))
        )
        if len(dev_short) == len(data.dev):
            model.drop_encoder(out / "encoder", save=ctx.is_main)  # the head trains on the cache alone
        else:
            logger.info("keeping the encoder for %d dev recording(s) longer than %g s", len(data.dev) - len(dev_short),
                        DEV_WINDOW_S)
    elif cfg.policy.cacheable and cfg.cache_features:
        dev_mine_short = [u for u in dev_mine if u.duration <= DEV_WINDOW_S]
        # every process on this machine holds its own copy of the training features
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        need = estimate_bytes(model.encoder, data.train) * per_machine + estimate_bytes(model.encoder, dev_short)
        if need <= cfg.cache_max_gb * 1e9:
            logger.info("computing frozen encoder features once (%.2f GB)", need / 1e9)
            # one store per set: train and dev manifests may reuse the same utterance ids
            features, dev_features = (
                extract_in_memory(model.encoder, utts, device, None, workers_for(cfg, device, utts), progress, amp=amp)
                for utts, amp in ((data.train, cfg.amp), (dev_mine_short, "none"))
            )
        else:
            logger.warning("features need %.1f GB > cache_max_gb=%.1f: running the encoder every step", need / 1e9,
                           cfg.cache_max_gb)
    return features, dev_features


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


def workers_for(cfg: TrainConfig, device: torch.device, utterances: list[Utterance]) -> int:
    """``num_workers``, or when unset the rule for jobs beside an encoder (:func:`decode_workers`)."""
    if cfg.num_workers is not None:
        return cap_workers(cfg.num_workers)
    return decode_workers(device, [u.duration for u in utterances])


def build_loader(cfg: TrainConfig, data: TrainData, features, distiller: Distiller | None, ctx: DistContext,
                 device: torch.device) -> tuple[torch.Generator, DynamicBucketSampler, DataLoader]:
    """The loader's generator, the sampler (which owns the position in the batch order) and the loader."""
    loader_gen = torch.Generator()  # keeps worker seeding off the global RNG, so resume is exact
    loader_gen.manual_seed(cfg.seed)
    if features is not None:
        dataset = FeatureDataset(data.train, features, normalize=data.normalizer, encode=data.vocab.encode)
        collate_fn, workers = collate_features, 0
    else:
        augment = Augmenter() if cfg.augment > 0 else None
        dataset = AudioDataset(data.train, normalize=data.normalizer, encode=data.vocab.encode, augment=augment,
                               augment_prob=cfg.augment, keep_clean=augment is not None and distiller is not None)
        collate_fn, workers = collate, workers_for(cfg, device, data.train)
    sampler = DynamicBucketSampler(dataset.durations, cfg.max_batch_seconds, shuffle=True, seed=cfg.seed,
                                        rank=ctx.rank, world_size=ctx.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=workers,
                             pin_memory=features is None and device.type == "cuda", generator=loader_gen,
                             persistent_workers=False, worker_init_fn=ignore_stop_signals if workers else None)
    return loader_gen, sampler, loader


class TrainStep(nn.Module):
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
