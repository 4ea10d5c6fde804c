"""``speechtl.core.distributed.finish``: ranks close the group together, in two real gloo processes."""

from __future__ import annotations

import json
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, store_file: str, out: str) -> None:
    from speechtl.core.distributed import DistContext, finish

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world_size=2, owns_group=True)
    if rank == 0:
        time.sleep(2.0)  # rank 0 is still busy while rank 1 has finished its part
    arrived = time.time()
    finish(ctx)
    left = time.time()
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"arrived": arrived, "left": left, "initialized_after": dist.is_initialized()}, f)


def test_finish_waits_for_every_rank_then_closes_the_group(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank.0").read_text())
    r1 = json.loads((tmp_path / "rank.1").read_text())
    assert r1["left"] >= r0["arrived"]  # rank 1 did not close its end while rank 0 was busy
    assert r1["left"] - r1["arrived"] > 1.0
    assert not r0["initialized_after"] and not r1["initialized_after"]
