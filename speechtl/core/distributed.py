"""Multi-process training on PyTorch's own engine: ``torchrun`` starts the processes,
``torch.distributed`` connects them, and :class:`~torch.nn.parallel.DistributedDataParallel`
averages gradients.

``torchrun --nproc_per_node=N -m speechtl train CONFIG.yaml`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`setup` reads them.
gloo serves CPUs, nccl GPUs (one process per GPU, ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process initialised the group and tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(device: str | None = None) -> torch.device:
    """``auto`` (or None): CUDA when there is a GPU, else the CPU; otherwise as named."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group ``torchrun`` described, if any, and pick this rank's device.

    Single-process runs get ``DistContext()`` and ``device`` resolved as usual.
    """
    if not launched_by_torchrun() and not (dist.is_available() and dist.is_initialized()):
        return DistContext(), pick_device(device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = pick_device(device)
    if want.type == "cuda":
        if want.index is not None and want.index != local_rank:
            raise ValueError(f"device={want} under torchrun: every process would use the same GPU; use device=cuda"
                             " (or auto), and each process takes cuda:LOCAL_RANK (restrict GPUs with CUDA_VISIBLE_DEVICES)")
        want = torch.device("cuda", local_rank)
        torch.cuda.set_device(want)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if want.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=want if want.type == "cuda" else None)
        owns = True
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, owns)
    if not ctx.is_main:  # one voice in the log: rank 0's
        logging.getLogger("speechtl").setLevel(logging.WARNING)
    logger.info("distributed: %d processes, backend %s, rank 0 on %s", ctx.world_size, dist.get_backend(), want)
    return ctx, want


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def finish(ctx: DistContext) -> None:
    """End a run's collectives: every rank meets here once more, then each destroys the group
    if this process owns it, so that the ranks close it together.

    Call it on the success path, after the last collective and before work one rank does
    alone (rank 0 writing a model's decoding set-up, say). Without it, the other ranks would
    close their end of the group and exit while rank 0 still holds it open.
    """
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
    teardown(ctx)


def _device_for_collectives(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_across(values: Sequence[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=_device_for_collectives(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (picklable objects)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
