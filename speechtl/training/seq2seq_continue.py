"""Continued self-supervised training of Whisper's encoder on the target's own audio
(``mode=seq2seq`` with ``continue_steps``), before it learns from transcripts.

Masked self-distillation, as data2vec trains its student but with the teacher held fixed:
the unadapted encoder, a frozen copy taken before any update, encodes each clip as it is;
the encoder being trained (its LoRA updates with ``seq2seq_train=lora``, all but the
convolutions with ``full``) sees the same clip with spans of its input masked, and learns
to give the teacher's outputs at the masked frames (``continue_frames=all``: at every frame
of the clip, masked or not, which also holds the unmasked frames where the decoder reads
them). It learns to fill in the target's
speech from context on the target's own recordings (the unlabelled audio, and the labelled
clips' audio; never the dev set's), while the outputs it aims at stay those the decoder
already reads.

Spans are chosen with transformers' wav2vec2 SpecAugment sampler at the encoder's 50 Hz,
``continue_mask_prob`` of the frames (an upper bound: spans overlap) in spans of
``mask_time_length`` frames; a masked encoder frame's two log-mel frames take the clip's
mean log-mel value. The schedule warms up over the first tenth of ``continue_steps``, then
falls linearly to zero. The trained encoder weights are written to
``out/checkpoints/continued.safetensors``; a resumed run whose stage had finished loads
them rather than training again.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data.audio import load_audio
from ..models import seq2seq as s2s

if TYPE_CHECKING:
    from .seq2seq import _Run

logger = logging.getLogger(__name__)

CONTINUED = "checkpoints/continued.safetensors"


def encoder_params(model) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters of the encoder half, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and ".encoder." in f".{n}"}


def mask_spans(lengths: list[int], total: int, prob: float, span: int, rng: np.random.Generator) -> torch.Tensor:
    """(B, total) bool: the encoder frames masked, within each clip's own ``lengths``, at
    least one span per clip."""
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

    attn = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        attn[b, :n] = 1
    state = np.random.get_state()  # the sampler draws from numpy's global generator: seed it from ours, then put it back
    np.random.seed(int(rng.integers(2**31)))
    try:
        mask = _compute_mask_indices((len(lengths), total), prob, min(span, min(lengths)), attn, min_masks=1)
    finally:
        np.random.set_state(state)
    return torch.from_numpy(mask) & attn.bool()


def _batch_loss(run: _Run, student, teacher, wavs: list[np.ndarray], rng: np.random.Generator) -> torch.Tensor:
    feats = run.processor.feature_extractor(wavs, sampling_rate=s2s.SAMPLE_RATE, return_tensors="pt").input_features
    limit = student.config.max_source_positions
    t = max(s2s.kept_frames(len(w), limit) for w in wavs) if run.cfg.seq2seq_window == "clip" else limit
    feats = feats[..., : 2 * t].to(run.device, student.conv1.weight.dtype)
    own = [min(t, int(np.ceil(len(w) / s2s.SAMPLE_RATE / s2s.ENCODER_FRAME_S))) for w in wavs]  # the clip's frames
    mask = mask_spans(own, t, run.cfg.continue_mask_prob, run.cfg.mask_time_length, rng).to(run.device)
    with torch.no_grad():
        target = s2s.encode_frames(teacher, feats)
    mel_mask = mask.repeat_interleave(2, dim=1)[:, None, :]  # each encoder frame is two log-mel frames
    mean = torch.stack([f[:, : 2 * n].mean() for f, n in zip(feats, own)])[:, None, None]
    pred = s2s.encode_frames(student, torch.where(mel_mask, mean, feats))
    if run.cfg.continue_frames == "all":  # every frame of the clip, masked or not
        own_frames = torch.arange(t, device=run.device)[None, :] < torch.tensor(own, device=run.device)[:, None]
        return torch.nn.functional.mse_loss(pred[own_frames], target[own_frames])
    return torch.nn.functional.mse_loss(pred[mask], target[mask])


def continue_encoder(run: _Run, progress: bool) -> dict:
    """Run the stage (or load its result on resume); returns what it did, for the summary."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from ..core.io import atomic_path

    cfg, path = run.cfg, run.out / CONTINUED
    params = encoder_params(run.model)
    if cfg.resume and path.is_file():
        state = load_file(str(path))
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        logger.info("continued pretraining: its encoder weights loaded from %s", path)
        return {"steps": cfg.continue_steps, "loaded_from": str(path)}
    utts = run.unlabelled + run.train.utts
    lr = cfg.continue_lr or (cfg.lr if run.part == "lora" else cfg.encoder_lr)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.continue_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (cfg.continue_steps - s) / (cfg.continue_steps - warm + 1)))
    student = run.model.get_encoder()
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed + 1000)
    rng = np.random.default_rng(cfg.seed)
    from .seq2seq import _batches

    run.model.train()
    losses, batches, start = [], [], time.time()
    bar = tqdm(total=cfg.continue_steps, desc="continue (encoder, unlabelled audio)", disable=not progress)
    for step in range(cfg.continue_steps):
        if not batches:
            batches = _batches(utts, cfg.max_batch_seconds, gen)
        loss = _batch_loss(run, student, teacher, [load_audio(utts[i].audio) for i in batches.pop(0)], rng)
        if not torch.isfinite(loss):
            raise RuntimeError(f"continued pretraining, update {step + 1}: the loss is {loss.item()}; lower continue_lr")
        loss.backward()
        if cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    bar.close()
    wall = time.time() - start
    del teacher
    with atomic_path(path) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp))
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    logger.info("continued pretraining: %d updates on %d clips in %.0f s; masked-frame loss %.4f -> %.4f",
                cfg.continue_steps, len(utts), wall, first, last)
    return {"steps": cfg.continue_steps, "clips": len(utts), "lr": lr, "wall_time_s": round(wall, 1),
            "seconds_per_update": round(wall / cfg.continue_steps, 3), "loss_first10": round(first, 5),
            "loss_last10": round(last, 5)}
