"""Training: :func:`train` runs one configuration in any mode.

One loop, one code path: ``frozen``, ``finetune``, ``scratch`` and ``adapter`` differ
only in the freezing policy of :class:`speechtl.models.ctc.CTCModel` and in which parameter
groups the optimiser sees. The run is built once (:mod:`.build`), trained by :mod:`.loop`,
evaluated by :mod:`.evaluate` and checkpointed by :mod:`.checkpoint`.

Outputs in ``cfg.out``: ``checkpoints/last.pt`` (full training state, for
``resume``), ``model/`` (best model by dev error, or the last one without a dev set),
``metrics.csv``, ``dev/`` scoring artefacts of the best checkpoint, and
``train_summary.json``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..core import distributed as dist_util
from ..core.cpus import apply_budget
from ..core.distributed import DistContext
from ..core.io import atomic_path, write_json
from . import checkpoint
from .build import build_run, seed_everything
from .config import RUN_CONFIG_HEADER, TrainConfig
from .data import min_ctc_frames, read_data
from .evaluate import average_snapshots
from .loop import train_loop
from .lr import lr_lambda
from .outdir import OutLock, check_out, clear_previous_run
from .run import Run, TrainingInterrupted, TrainState

logger = logging.getLogger(__name__)


def train(cfg: TrainConfig, progress: bool = True, should_stop: Callable[[int], bool] | None = None) -> dict:
    """Train per ``cfg``; returns the training summary (also written to train_summary.json).

    ``should_stop(step)`` is called after every update; returning True saves a
    checkpoint and raises :class:`TrainingInterrupted` (used to test resume).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs this function: the
    sampler deals each rank its own batches, DistributedDataParallel averages the
    gradients, dev scoring is gathered across ranks, and only rank 0 writes files. One
    update then covers ``world_size x grad_accum`` micro-batches.

    On a CPU the run uses the threads :func:`speechtl.core.cpus.cpu_budget` allows, each
    update on all of them or on one, whichever measures faster at the time; float results
    may then differ in their last bits between two runs. ``threads=N`` runs every update
    on N threads (at most the budget), so that a run and its resumed copy repeat exactly;
    the caller's thread count comes back afterwards.
    """
    check_out(cfg.out, cfg.resume, cfg.overwrite)  # before any process writes there
    caller_threads = torch.get_num_threads()
    apply_budget(cfg.threads)
    try:
        return _train_on(cfg, progress, should_stop)
    finally:
        if cfg.threads is not None:
            torch.set_num_threads(caller_threads)


def _train_on(cfg: TrainConfig, progress: bool, should_stop: Callable[[int], bool] | None) -> dict:
    ctx, device = dist_util.setup(cfg.device)
    interrupt = _GracefulInterrupt()
    stop = interrupt if should_stop is None else (lambda step: should_stop(step) or interrupt(step))
    try:
        with OutLock(cfg.out) if ctx.is_main else contextlib.nullcontext(), interrupt:
            if cfg.overwrite and ctx.is_main:
                clear_previous_run(Path(cfg.out))
            if cfg.policy.seq2seq:
                from .seq2seq import train_seq2seq

                return train_seq2seq(cfg, progress and ctx.is_main, stop)
            return _train(cfg, ctx, device, progress and ctx.is_main, stop)
    except TrainingInterrupted:
        if interrupt.asked:  # a stop signal: the checkpoint is saved; end as an interrupt does
            raise Stopped(interrupt.signum) from None
        raise
    finally:
        dist_util.teardown(ctx)


class Stopped(KeyboardInterrupt):
    """Training stopped on a signal after saving its checkpoint; ``exit_status`` is the shell's
    128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name}; the checkpoint is saved: resume=true goes on")
        self.exit_status = 128 + signum


class _GracefulInterrupt:
    """The first SIGINT (Ctrl-C), SIGTERM (what ``timeout``, systemd, docker, Kubernetes and
    SLURM send) or SIGHUP (a closed terminal) asks training to stop after the update in
    progress, with a checkpoint that ``resume=true`` continues from; a second one stops at once."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self):
        self.asked = False
        self.signum = 0
        self._previous: dict = {}

    def __call__(self, step: int) -> bool:
        return self.asked

    def _handle(self, signum, frame):
        import signal

        if self.asked:
            raise KeyboardInterrupt
        self.asked, self.signum = True, signum
        logger.warning("%s: saving a checkpoint after this update (send it again to stop at once)",
                       signal.Signals(signum).name)

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        return False


def _train(cfg: TrainConfig, ctx: DistContext, device: torch.device, progress: bool,
           should_stop: Callable[[int], bool] | None) -> dict:
    out = Path(cfg.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config_yaml(cfg, out / "config.yaml")
    seed_everything(cfg.seed)
    data = read_data(cfg)
    ck = checkpoint.read_checkpoint(checkpoint.checkpoint_path(out), cfg, ctx)
    complete = ck is not None and _run_complete(TrainState.from_dict(ck["state"]), cfg)
    if complete and (out / "train_summary.json").is_file():
        logger.warning("%s: this run is complete (%s at step %d); nothing to do. Raise max_steps to train on, "
                       "or start afresh without resume=true", out, ck["state"]["finished"], ck["state"]["step"])
        return json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    run = build_run(cfg, ctx, device, data, ck, progress)
    try:
        reason, wall_s = train_loop(run, should_stop, complete)
    except TrainingInterrupted:  # every rank stops at the same update (the stop votes are summed)
        _leave_group(run)  # rank 0 has saved the checkpoint; the ranks close the group together
        raise
    averaged = average_snapshots(run) if cfg.average_last else None
    _leave_group(run)
    return summary(run, reason, wall_s, averaged, _words(run, progress))


def _leave_group(run: Run) -> None:
    """After the last collective: DistributedDataParallel lets go of the group (its reducer
    holds it), and the ranks close the group together before rank 0 works on alone."""
    if isinstance(run.step_module, nn.parallel.DistributedDataParallel):
        run.step_module = run.step_module.module
        gc.collect()  # the wrapper's hooks form cycles: free it while the group is still open
    dist_util.finish(run.ctx)


def _words(run: Run, progress: bool) -> dict | None:
    """The model folder's own decoding (:mod:`.words`), written by rank 0."""
    if not run.ctx.is_main:
        return None
    if run.model.policy.adapters:
        return {"decoder": "greedy", "reason": "adapter models carry no LM yet: pass --lm to evaluate and transcribe"}
    from .words import attach_decoding

    texts = [run.data.normalizer(u.text) for u in run.data.train[: run.data.originals]]
    return attach_decoding(run.cfg, run.out / "model", texts, run.data.dev, run.data.normalizer, progress)


def summary(run: Run, stop_reason: str | None, wall_s: float, averaged: dict | None = None,
            decoding: dict | None = None) -> dict:
    """``train_summary.json`` (written by rank 0), and the dict it holds."""
    cfg, st, data = run.cfg, run.state, run.data
    summary = {
        "mode": cfg.mode,
        "encoder": cfg.encoder,
        "steps": st.step,
        "epochs": run.sampler.epoch + run.sampler.consumed / max(len(run.sampler), 1),
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
        "trainable_parameters": sum(p.numel() for g in run.groups for p in g["params"]),
        "total_parameters": run.model.encoder_info.get("parameters", 0) + sum(p.numel() for p in run.model.head_parameters())
                            + sum(p.numel() for p in run.model.adapter_parameters()),
        "world_size": run.ctx.world_size,
        "global_batch": {"processes": run.ctx.world_size, "grad_accum": cfg.grad_accum,
                         "max_batch_seconds": cfg.max_batch_seconds, "max_seconds_per_update": run.global_seconds},
        "device": str(run.device),
        "amp": str(run.amp_dtype) if run.amp_dtype else "none",
        "model_dir": str(run.out / "model"),
        "config": {k: v for k, v in asdict(cfg).items()},
    }
    if run.model.policy.adapters:
        summary.update(adapter=run.model.adapter_config.to_dict(), language=run.model.language,
                       languages=sorted({run.model.language, *run.model.other_languages}),
                       adapter_parameters=sum(p.numel() for p in run.model.adapter_parameters()))
    if averaged is not None:
        summary["average"] = averaged
    if decoding is not None:
        summary["decoding"] = decoding
    if run.ctx.is_main:
        write_json(run.out / "train_summary.json", summary)
    return summary


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
        tmp.write_text(f"{RUN_CONFIG_HEADER}; `speechtl train THIS_FILE` repeats it in this folder\n"
                       + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


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
