"""``out/checkpoints/last.pt``: a run's complete state, saved and restored over each part's
``state_dict()`` (model, optimiser, scheduler, grad scaler, distiller, sampler, loader
generator) with the random streams of every rank, so that a resumed run continues exactly.

The format (unchanged since the first release of resume): a ``torch.save`` dict of tensors and
plain data, loaded with ``weights_only=True``, with the keys ``model``, ``optimizer``,
``scheduler``, ``scaler``, ``state`` (:class:`~speechtl.training.run.TrainState` and the
sampler's position), ``rng`` (and ``rng_ranks``), ``loader_rng``, ``vocab``, ``units``,
``tokenizer`` (subword units), ``distill`` (with a teacher), ``config`` and (since resume checks it)
``encoder_fingerprint``, the starting encoder's.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..core import distributed as dist_util
from ..core.distributed import DistContext
from ..core.io import atomic_path
from ..data.units import SubwordVocabulary, units_of
from ..models.ctc import CTCModel
from .config import TrainConfig
from .run import Run, TrainState

logger = logging.getLogger(__name__)


def checkpoint_path(out: Path) -> Path:
    return out / "checkpoints" / "last.pt"


def previous_path(path: Path) -> Path:
    """The checkpoint before ``path``, kept so that a damaged last one can be resumed past."""
    return path.with_name("previous.pt")


REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "state", "rng", "loader_rng", "vocab")


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, loaded with ``weights_only=True``: tensors and plain data only.
    A file that needs anything more (pickled code) is refused, never executed; a file that is
    not a whole torch checkpoint (empty, cut short, other bytes) is named as damaged."""
    import pickle
    import zipfile

    damaged = (f"{path}: not a readable checkpoint ({{}}): the file is damaged (a full disk or a copy cut short?). "
               f"Restore it, or delete it and start afresh without resume=true")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else cannot be one of ours
        raise ValueError(damaged.format("empty" if path.stat().st_size == 0 else "not a torch zip archive"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: refused to load: the checkpoint holds objects other than tensors and plain data"
                         f" (torch.load weights_only=True: {first}). speechtl never unpickles code; delete the file"
                         " or start without resume=true") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(damaged.format(f"{type(e).__name__}: {first}" if first else type(e).__name__)) from None


def _load_training_checkpoint(path: Path) -> dict:
    ck = load_checkpoint(path)
    missing = [k for k in REQUIRED_KEYS if k not in ck] if isinstance(ck, dict) else list(REQUIRED_KEYS)
    if missing or not isinstance(ck.get("state"), dict) or "step" not in ck["state"]:
        raise ValueError(f"{path}: not a speechtl training checkpoint (it lacks {', '.join(missing) or 'state.step'}); "
                         f"restore the run's own checkpoint, or delete it and start afresh without resume=true")
    return ck


def read_checkpoint(path: Path, cfg: TrainConfig, ctx: DistContext) -> dict | None:
    """The checkpoint to resume from (``cfg.resume``), or None to start afresh. A damaged
    ``last.pt`` falls back to ``previous.pt`` (and is set aside as ``last.pt.damaged``)."""
    if not cfg.resume:
        return None
    previous = previous_path(path)
    if not path.is_file() and not previous.is_file():
        logger.warning("resume: no checkpoint at %s, starting fresh", path)
        return None
    try:
        if not path.is_file():  # killed between setting the last one aside and putting the new one in place
            raise ValueError(f"{path}: missing")
        ck = _load_training_checkpoint(path)
    except ValueError as e:
        if not previous.is_file():
            raise
        try:
            ck = _load_training_checkpoint(previous)
        except ValueError as e2:
            raise ValueError(f"{e}\nand the previous one: {e2}") from None
        logger.warning("%s\nresuming from the previous checkpoint %s (step %d) instead", e, previous, ck["state"]["step"])
        if ctx.is_main and path.is_file():  # kept for a look, and never moved over the good previous one
            os.replace(path, path.with_name(path.name + ".damaged"))
    written_by = ck["state"].get("world_size", 1)
    if written_by != ctx.world_size:
        raise ValueError(f"{path}: written by a {written_by}-process run; resume it with the same number of "
                         f"processes (this run has {ctx.world_size}), or start afresh without resume=true")
    return ck


def save(run: Run) -> None:
    """Write ``run``'s state to its checkpoint (rank 0; every rank sends its random streams)."""
    rngs = dist_util.gather_objects(rng_state(), run.ctx)  # every rank's random streams, for an exact resume
    if not run.ctx.is_main:
        return
    vocab = run.data.vocab
    ck = {"model": trainable_state(run.model), "optimizer": run.optimizer.state_dict(),
          "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
          "state": {**asdict(run.state), **run.sampler.state_dict()}, "rng": rngs[0],
          "loader_rng": run.loader_gen.get_state(), "vocab": vocab.tokens, "units": units_of(vocab), "config": asdict(run.cfg)}
    if isinstance(vocab, SubwordVocabulary):
        ck["tokenizer"] = vocab.to_str()
    if run.distiller is not None:
        ck["distill"] = run.distiller.state_dict()
    if run.encoder_fingerprint:
        ck["encoder_fingerprint"] = run.encoder_fingerprint
    if run.ctx.enabled:
        ck["rng_ranks"] = rngs
    with atomic_path(run.checkpoint) as tmp:
        torch.save(ck, tmp)
        if run.checkpoint.is_file():  # the last one becomes the previous one once the new one is whole
            _keep_as_previous(run.checkpoint)


def _keep_as_previous(path: Path) -> None:
    """``path`` also becomes ``previous.pt`` while staying where it is, so that a kill at any
    moment leaves a whole ``last.pt`` (until the new one is renamed over it)."""
    previous = previous_path(path)
    staged = previous.with_name(previous.name + ".tmp")
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)
    except OSError:  # a file system without hard links
        shutil.copyfile(path, staged)
    os.replace(staged, previous)


def restore(ck: dict, run: Run) -> None:
    """Load a checkpoint into ``run``'s parts, built as the checkpointed run built them."""
    missing, unexpected = run.model.load_state_dict(ck["model"], strict=False)
    if unexpected or any(not k.startswith("encoder.") for k in missing):
        raise RuntimeError(f"{run.checkpoint}: checkpoint does not match the model ({unexpected or missing})")
    if (run.distiller is None) != ("distill" not in ck):
        raise ValueError(f"{run.checkpoint}: written {'with' if 'distill' in ck else 'without'} a teacher; resume with "
                         "the same teacher setting, or start afresh")
    if run.distiller is not None:
        run.distiller.load_state_dict(ck["distill"])
    run.optimizer.load_state_dict(ck["optimizer"])
    run.scheduler.load_state_dict(ck["scheduler"])
    run.scaler.load_state_dict(ck["scaler"])
    run.state = TrainState.from_dict(ck["state"])
    run.sampler.load_state_dict(ck["state"])
    run.horizon.total = run.state.schedule_total or run.cfg.max_steps
    set_rng_state(ck["rng_ranks"][run.ctx.rank] if "rng_ranks" in ck else ck["rng"])
    run.loader_gen.set_state(ck["loader_rng"])
    logger.info("resumed from %s at step %d", run.checkpoint, run.state.step)


def trainable_state(model: CTCModel) -> dict:
    """The weights a checkpoint holds: all but an encoder that never changes."""
    # a frozen encoder (and an adapter model's base) never changes and is reloaded from its source on resume
    if model.policy.adapters:
        adapters = {f"encoder.model.{k}" for k in model.encoder.adapter_keys}
        return {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.") or k in adapters}
    return {k: v for k, v in model.state_dict().items() if model.policy.encoder_grad or not k.startswith("encoder.")}


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
