"""Running work on a few threads at once, results in order.

On a CPU, several small matrix products side by side keep the cores busier than one split
across them: :func:`in_order` runs a function over a stream of items on ``streams`` threads
with one intra-op thread each and yields the results in the items' order.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:
    import torch

START_TIMEOUT_S = 5.0  # the first tasks wait this long at most for each other


def in_order(fn: Callable, items: Iterable, streams: int) -> Iterator:
    """``fn(item)`` for every item, ``streams`` at a time, yielding the results in order.

    Each thread draws its next item from ``items`` itself (one thread at a time, in order),
    so that producing an item (reading and padding audio) happens on the threads that
    compute rather than on another thread competing with them for the cores; a thread
    that finishes takes the next item at once. ``streams`` items run and as many wait; the
    first ``streams`` tasks start together, one per thread, so that every thread takes a
    share even on a busy machine, where a thread started late would otherwise find the
    work done. The caller's torch thread count is restored afterwards; on an error or an
    early close the waiting tasks are dropped, not run. ``streams <= 1`` runs everything on
    this thread.
    """
    if streams <= 1:
        for item in items:
            yield fn(item)
        return
    import torch

    source = iter(items)
    lock = threading.Lock()
    drawn = 0  # items taken from the source so far
    end = object()
    together = threading.Barrier(streams)
    tasks = itertools.count()

    def draw_and_run():
        nonlocal drawn
        if next(tasks) < streams:  # one of the first tasks: each waits for a thread of its own
            with contextlib.suppress(threading.BrokenBarrierError):
                together.wait(timeout=START_TIMEOUT_S)
        with lock:  # the source is read by one thread at a time, in order
            n = drawn
            item = next(source, end)
            if item is end:
                return n, end
            drawn += 1
        torch.set_num_threads(1)
        return n, fn(item)

    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=streams)
    try:
        in_flight: deque = deque(pool.submit(draw_and_run) for _ in range(2 * streams))
        done: dict[int, object] = {}
        exhausted, nxt = False, 0
        while in_flight:
            n, result = in_flight.popleft().result()
            if result is end:
                exhausted = True
            else:
                done[n] = result
                if not exhausted:
                    in_flight.append(pool.submit(draw_and_run))
            while nxt in done:
                yield done.pop(nxt)
                nxt += 1
    finally:
        together.abort()  # a first task cancelled before it started must not hold the others
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def cpu_streams(device: torch.device | str) -> int:
    """Default number of batches an encoder runs at once: on a CPU, one per core, each on
    one intra-op thread (several small matrix products side by side keep the cores busier
    than one split across them); on a GPU, one."""
    import torch

    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), 8))
