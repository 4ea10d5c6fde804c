"""Checkpoint averaging: the element-wise mean of several checkpoints' weights.

Averaging the last few checkpoints of a run (or several runs' final models, of one
architecture and vocabulary) usually scores a little better than any one of them, as
ESPnet's and icefall's ``average_checkpoints`` show. Floating-point tensors are averaged
in float64 and stored in their own dtype; integer buffers are taken from the last one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from ..core.io import atomic_dir, atomic_path, load_safetensors

logger = logging.getLogger(__name__)


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]], names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The mean of ``states``, which must hold the same keys with the same shapes."""
    if not states:
        raise ValueError("nothing to average")
    names = list(names or [f"checkpoint {i}" for i in range(len(states))])
    first = states[0]
    for name, s in zip(names[1:], states[1:]):
        if s.keys() != first.keys():
            diff = sorted(set(s) ^ set(first))
            raise ValueError(f"{name} and {names[0]} hold different tensors ({', '.join(diff[:5])}); "
                             "only checkpoints of one architecture can be averaged")
        for k, v in s.items():
            if v.shape != first[k].shape:
                raise ValueError(f"{name}: {k} has shape {tuple(v.shape)}, {names[0]} {tuple(first[k].shape)}; "
                                 "only checkpoints of one architecture can be averaged")
    out = {}
    for k, v in first.items():
        if v.is_floating_point():
            out[k] = (sum(s[k].double() for s in states) / len(states)).to(v.dtype)
        else:
            out[k] = states[-1][k].clone()
    return out


WEIGHT_FILES = ("head.safetensors", "encoder/model.safetensors")


def _weight_files(model_dir: Path) -> list[str]:
    """The weight files of a model directory: head and encoder, and an adapter model's languages."""
    return [n for n in WEIGHT_FILES if (model_dir / n).is_file()] + sorted(p.name for p in model_dir.glob("adapter.*.safetensors"))


def _vocabularies(model_dir: Path) -> dict:
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(model_dir.glob("vocab*.json"))}


def average_model_dirs(model_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir``: the first model directory with every weight file replaced by the
    mean over all of them. They must share mode, head and vocabulary (adapter models: the
    adapters, languages and each language's vocabulary)."""
    from .model_dir import MODEL_FILE, resolve_model_dir

    dirs = [resolve_model_dir(d) for d in model_dirs]
    if len(dirs) < 2:
        raise ValueError("give at least two model directories to average")
    metas = [json.loads((d / MODEL_FILE).read_text(encoding="utf-8")) for d in dirs]

    def shape(d: Path, m: dict):
        return m["mode"], m["head"], m.get("adapter"), _vocabularies(d), _weight_files(d)

    for d, m in zip(dirs[1:], metas[1:]):
        if shape(d, m) != shape(dirs[0], metas[0]):
            raise ValueError(f"{d}: its mode, head, adapters, languages or vocabulary differ from {dirs[0]}'s; only models "
                             "of one architecture and vocabulary can be averaged")
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(dirs[0], tmp, dirs_exist_ok=True)
        for name in _weight_files(dirs[0]):
            states = [load_safetensors(d / name) for d in dirs]
            save_file(average_state_dicts(states, [str(d / name) for d in dirs]), str(tmp / name), metadata={"format": "pt"})
        meta = dict(metas[0], averaged_from=[str(d) for d in dirs])
        (tmp / MODEL_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return Path(out_dir)


def write_snapshot(folder: Path, step: int, state: dict[str, torch.Tensor], keep: int) -> None:
    """Save ``state`` as ``folder/eval-{step}.safetensors`` and delete all but the last ``keep``
    snapshots (for ``average_last``)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(folder / f"eval-{step:08d}.safetensors") as tmp:
        save_file(state, str(tmp))
    for old in sorted(folder.glob("eval-*.safetensors"))[:-keep]:
        old.unlink()


def mean_of_snapshots(folder: Path, keep: int) -> tuple[list[int], dict[str, torch.Tensor]] | None:
    """The steps and mean weights of the last ``keep`` snapshots in ``folder``; None (with a
    warning) when fewer than two were written."""
    files = sorted(folder.glob("eval-*.safetensors"))[-keep:]
    if len(files) < 2:
        logger.warning("average_last=%d: only %d evaluation(s) to average; no model_avg written", keep, len(files))
        return None
    steps = [int(f.stem.split("-")[1]) for f in files]
    return steps, average_state_dicts([load_safetensors(f) for f in files], [f.name for f in files])
