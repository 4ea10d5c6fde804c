"""The training loop, read top to bottom: accumulate the micro-batches' losses, step, one
collective per update, then log, evaluate, save and stop, in that order."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..core import distributed as dist_util
from ..core.cpus import OthersMeter, requested
from ..core.threads import ThreadTuner
from ..models.ctc import ctc_loss
from . import checkpoint
from .config import TrainConfig
from .evaluate import evaluate_and_keep
from .lr import fit_to_budget, refit_due
from .run import Run, TrainingInterrupted, TrainState


def micro_step(run: Run, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward and backward of one micro-batch; its share of the update's loss, and of the
    distillation loss within it (None without a teacher), as detached tensors: reading them
    waits for the device, which the loop does once per update."""
    cfg = run.cfg
    b = batch.to(run.device, non_blocking=True)
    with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        if run.features is not None:
            logits, frames, aux = run.step_module(b.hidden, b.frame_lengths, from_features=True)
        else:
            logits, frames, aux = run.step_module(b.waveforms, b.lengths, clean=b.clean)
    loss = ctc_loss(logits, frames, b.targets, b.target_lengths)
    if aux is not None:
        loss = loss + cfg.distill_weight * aux
    loss = loss / cfg.grad_accum
    run.scaler.scale(loss).backward()
    # float64, as Python floats summed them: the logged loss does not depend on how it is read
    return loss.detach().double(), None if aux is None else aux.detach().double() / cfg.grad_accum


def optimizer_step(run: Run) -> torch.Tensor | None:
    """Clip, step, schedule. Returns the gradient norm (None without clipping) where a
    non-finite one reaches the weights: without a grad scaler, which skips such steps itself."""
    run.scaler.unscale_(run.optimizer)
    norm = None
    if run.cfg.clip_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_([p for g in run.groups for p in g["params"]], run.cfg.clip_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return None if run.scaler.is_enabled() else norm


NONFINITE_LIMIT = 3  # updates in a row with a NaN or infinite loss (or gradient) before the run stops


class NonFiniteLoss(RuntimeError):
    """The loss stayed NaN or infinite: the run stopped without saving the broken weights."""


def _check_finite(run: Run, loss: float, norm: torch.Tensor | None, bad: int, last: bool) -> int:
    """Updates in a row whose loss or gradient was not finite, this one counted; raises
    :class:`NonFiniteLoss` at :data:`NONFINITE_LIMIT`, or at the ``last`` update. Such updates are neither evaluated nor
    saved, so the last checkpoint and model hold the last good weights."""
    if math.isfinite(loss) and (norm is None or math.isfinite(float(norm))):
        return 0
    bad += 1
    if bad >= NONFINITE_LIMIT or last:
        raise NonFiniteLoss(
            f"the training loss (or its gradient) was NaN or infinite for {bad} updates in a row (steps "
            f"{run.state.step - bad + 1}-{run.state.step}); stopped without saving them: {run.checkpoint} and "
            f"{run.out / 'model'} keep the last good weights. Lower lr (or encoder_lr), set clip_norm, or check the "
            f"data; resume=true restarts from that checkpoint")
    return bad


def stop_reason(cfg: TrainConfig, st: TrainState, time_votes: float) -> str | None:
    if st.step >= cfg.max_steps:
        return "max_steps"
    if time_votes:
        return "max_minutes"
    if cfg.patience and st.bad_evals >= cfg.patience:
        return "early_stopping"
    return None


def train_loop(run: Run, should_stop: Callable[[int], bool] | None, complete: bool) -> tuple[str | None, float]:
    """Train until a stop reason; returns it and the run's wall seconds (summed over resumes).
    ``complete``: the checkpoint's run had ended (killed before its summary was written), so
    nothing is trained and its reason is returned."""
    cfg, st, ctx, sampler = run.cfg, run.state, run.ctx, run.sampler
    start = time.monotonic() - st.elapsed
    budget = None if cfg.max_minutes is None else cfg.max_minutes * 60
    bar = tqdm(total=cfg.max_steps, initial=st.step, desc=f"train[{cfg.mode}]", unit="step", disable=not run.progress)
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    reason = st.finished if complete else None
    save_every = cfg.save_every or cfg.eval_every
    # on a CPU each micro-batch (and the update it ends) runs on the threads that measure
    # fastest now: all of them on an idle machine, one beside other busy processes; threads
    # named by the user (threads=, --threads) are kept throughout
    tune = run.device.type == "cpu" and cfg.threads is None and requested() is None and torch.get_num_threads() > 1
    others = OthersMeter() if tune else None  # read first after the tuner's two calls on one thread
    tuner = ThreadTuner(torch.get_num_threads(), tune=tune, others=others.read if others else None)
    micro, loss_acc, aux_acc, audio_acc, utts_acc = 0, 0.0, 0.0, 0.0, 0  # since the last update
    nonfinite = 0  # updates in a row with a NaN or infinite loss
    while reason is None:
        for batch in run.loader:  # the sampler starts the epoch after the batches it has handed out
            sampler.advance()
            run.model.encoder_trainable = cfg.policy.encoder_grad and st.step >= cfg.freeze_encoder_steps
            # gradients are averaged across ranks on the last micro-batch of an update only
            sync = micro + 1 >= cfg.grad_accum or not ctx.enabled
            with tuner.run(max(batch.durations) * len(batch.durations)):
                with contextlib.nullcontext() if sync else run.step_module.no_sync():
                    loss, aux = micro_step(run, batch)
                micro += 1
                if micro >= cfg.grad_accum:
                    norm = optimizer_step(run)
            loss_acc = loss_acc + loss
            aux_acc = aux_acc if aux is None else aux_acc + aux
            audio_acc += float(sum(batch.durations))
            utts_acc += len(batch.durations)
            if micro < cfg.grad_accum:
                continue
            st.step += 1
            st.elapsed = time.monotonic() - start
            if budget is not None and refit_due(st.step, run.horizon):
                total = fit_to_budget(run.horizon, st.step, st.elapsed, budget, cfg.max_steps, ctx, run.device)
                st.schedule_total = total if total is not None else st.schedule_total
            # one collective per update: mean loss, audio seen, and the stop votes, so every rank
            # stops at the same update (a rank that stopped alone would hang the others)
            time_up = budget is not None and st.elapsed >= budget
            asked = should_stop is not None and should_stop(st.step)
            loss_sum, aux_sum, audio, utts, time_votes, stop_votes = dist_util.sum_across(
                [float(loss_acc), float(aux_acc), audio_acc, utts_acc, time_up, asked], ctx, run.device)
            st.loss, st.audio_seconds, st.utterances = loss_sum / ctx.world_size, st.audio_seconds + audio, st.utterances + int(utts)
            if run.distiller is not None:
                st.distill_loss = aux_sum / ctx.world_size
            micro, loss_acc, aux_acc, audio_acc, utts_acc = 0, 0.0, 0.0, 0.0, 0
            bar.update(1)
            last = st.step >= cfg.max_steps or bool(time_votes) or bool(stop_votes)  # no later update to recover on
            nonfinite = _check_finite(run, st.loss, norm, nonfinite, last)
            if nonfinite:  # not logged, evaluated or saved: the weights may be broken
                continue
            run.shown["loss"] = f"{st.loss:.3f}"
            if st.distill_loss is not None:
                run.shown["distill"] = f"{st.distill_loss:.3f}"
            bar.set_postfix(run.shown)
            # the metrics row goes out before the checkpoint: a kill between the two leaves a row
            # that resume trims and writes again, never a checkpoint whose row is lost
            evaluated = st.step % cfg.eval_every == 0 or st.step >= cfg.max_steps
            row = evaluate_and_keep(run) if evaluated else {} if st.step % cfg.log_every == 0 else None
            if row is not None:
                run.metrics.append(st, sampler.epoch, run.optimizer, row)
            if evaluated or st.step % save_every == 0:
                checkpoint.save(run)
            reason = stop_reason(cfg, st, time_votes)
            if reason is None and stop_votes:
                checkpoint.save(run)
                bar.close()
                raise TrainingInterrupted(f"stopped at step {st.step}")
            if reason:
                break
        else:
            sampler.next_epoch()
    if not complete:
        if st.step % cfg.eval_every != 0 and st.step < cfg.max_steps:
            run.metrics.append(st, sampler.epoch, run.optimizer, evaluate_and_keep(run))  # every rank: it gathers dev results
        st.finished = reason  # resume=true on this checkpoint is then a no-op
        checkpoint.save(run)
    bar.close()
    return reason, time.monotonic() - start
