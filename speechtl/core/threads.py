"""Running work on a few threads at once, results in order.

On a CPU, several small matrix products side by side keep the cores busier than one split
across them: :func:`in_order` runs a function over a stream of items on ``streams`` threads
with one intra-op thread each and yields the results in the items' order.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:
    import torch

from .cpus import cpu_threads

START_TIMEOUT_S = 5.0  # the first tasks wait this long at most for each other
_stream = threading.local()


def in_stream() -> bool:
    """True on one of :func:`in_order`'s threads while it runs side by side with others: the
    work there should use one intra-op thread (torch's is set so; an ONNX Runtime model
    picks its one-thread session)."""
    return getattr(_stream, "on", False)


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
    this thread. torch's thread count is only touched where torch is imported already (the
    ONNX path runs without it; its threads see :func:`in_stream`).
    """
    if streams <= 1:
        for item in items:
            yield fn(item)
        return
    import sys

    torch = sys.modules.get("torch")
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
        if torch is not None:
            torch.set_num_threads(1)
        _stream.on = True
        try:
            return n, fn(item)
        finally:
            _stream.on = False

    threads = torch.get_num_threads() if torch is not None else None
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
        if torch is not None:
            torch.set_num_threads(threads)


def cpu_streams(device: torch.device | str) -> int:
    """Default number of batches an encoder runs at once: on a CPU, one per core, each on
    one intra-op thread (several small matrix products side by side keep the cores busier
    than one split across them); on a GPU, one."""
    import torch

    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), cpu_threads(), 8))


class ThreadTuner:
    """Runs a repeated piece of work (a training update) on the intra-op threads that
    measure fastest right now: ``threads`` or one.

    Splitting a small matrix product across threads pays on an idle machine, but when
    other processes hold cores a thread that is not running holds every other one at the
    end of each parallel region: a BiLSTM's time steps, which are many and small, then
    stall for seconds (``benchmarks/bench_lstm_threads.py``). No fixed rule knows whether
    the machine is busy, and that changes during a run, so the tuner measures seconds per
    unit of work (padded audio seconds) on each choice:

    - the first call warms up and the next is timed, both on one thread; the one after runs on
      ``threads``, and the faster goes on;
    - on one thread, ``threads`` is tried again after ``explore_every`` calls, an interval
      that doubles each time one thread still wins (up to ``explore_max``): other jobs end;
    - either way, the other count is tried at once when the chosen one turns ``slower_by``
      times slower than it was when chosen (another job started).

    An idle machine so pays two calls on one thread, and more only when its speed changes.

    A call on ``threads`` beside busy processes can stall for seconds, so it is only tried
    while the cores are free: ``others()`` gives the CPUs that other processes kept busy
    lately (:class:`speechtl.core.cpus.OthersMeter`), and while they leave fewer than
    ``threads`` CPUs of ``cpus`` free the tuner starts on one thread and postpones its
    tries of more (the interval doubling as before).

    Use as ``with tuner.run(work): ...``; the caller's thread count is restored when a
    call ends. With ``threads <= 1`` or ``tune=False`` every call runs on ``threads``.
    ``clock`` gives seconds (tests pass their own).

    Float results may differ in their last bits between thread counts (sums split
    differently), so a run that must repeat exactly names its threads (``threads=N``), and
    then runs on them throughout.
    """

    def __init__(self, threads: int, tune: bool = True, explore_every: int = 8, explore_max: int = 128,
                 slower_by: float = 1.5, margin: float = 0.95, clock: Callable[[], float] = time.perf_counter,
                 others: Callable[[], float | None] | None = None, cpus: int | None = None):
        self.clock = clock
        self.others = others
        self.cpus = cpus if cpus is not None else cpu_threads()
        self.options = [threads, 1] if threads > 1 and tune else [max(threads, 1)]
        self.explore_every, self.explore_max, self.slower_by, self.margin = explore_every, explore_max, slower_by, margin
        self.rate: dict[int, float] = {}  # seconds per unit of work, smoothed, per thread count
        self.settled: float | None = None  # the chosen way's rate when it was last confirmed
        self.calls = 0
        self.choice = self.options[0]
        self.interval = explore_every
        self.next_try = 0  # the call that tries the other way
        # the first ways to run: (threads, whether the call counts); the first warms up
        # one thread first (it cannot stall), then all of them if the cores are free by then
        self.plan = [(1, False), (1, True), (self.options[0], True)] if len(self.options) > 1 else []
        self.switches = 0
        self.postponed = 0  # tries of ``threads`` put off because the cores were taken

    def _room(self) -> bool:
        """Whether the CPUs others leave free hold all of ``threads`` (True when unknown)."""
        if self.others is None:
            return True
        busy = self.others()
        return busy is None or self.cpus - busy >= self.options[0] - 0.5

    def _pick(self) -> int:
        if len(self.options) == 1:
            return self.options[0]
        if self.plan and self.plan[0][0] > 1 and not self._room():  # busy: settle on one thread for now
            self.plan = []
            self.postponed += 1
            self._settle(1)
        if self.plan:
            return self.plan[0][0]
        if self.calls >= self.next_try:
            if self.choice == 1 and not self._room():  # the cores are taken: try later
                self.postponed += 1
                self.interval = min(2 * self.interval, self.explore_max)
                self.next_try = self.calls + self.interval
                return 1
            return self.options[1] if self.choice == self.options[0] else self.options[0]
        return self.choice

    def _record(self, threads: int, rate: float) -> None:
        self.calls += 1
        if self.plan:  # probing
            if self.plan.pop(0)[1]:
                self.rate[threads] = rate
            if not self.plan:
                self._settle(min(self.rate, key=self.rate.get))
            return
        if threads != self.choice:  # the other way, tried once
            self.rate[threads] = rate
            if rate < self.margin * self.rate[self.choice]:
                self.switches += 1
                self.interval = self.explore_every
                self._settle(threads)
            else:
                self.interval = min(2 * self.interval, self.explore_max)
                self._settle(self.choice)
            return
        self.rate[threads] = 0.7 * self.rate[threads] + 0.3 * rate
        if self.settled is not None and self.rate[threads] > self.slower_by * self.settled:
            self.next_try = self.calls  # slower than it was: is the other way faster now?

    def _settle(self, threads: int) -> None:
        """Go on with ``threads``; on one thread, try the others again after the interval."""
        self.choice = threads
        self.settled = self.rate[threads]
        self.next_try = self.calls + self.interval if threads == 1 else math.inf

    @contextlib.contextmanager
    def run(self, work: float = 1.0):
        """Time the block, run on the chosen thread count; ``work`` is its size in any unit
        that grows with its cost (padded audio seconds)."""
        import torch

        threads = self._pick()
        before = torch.get_num_threads()
        if before != threads:
            torch.set_num_threads(threads)
        t0 = self.clock()
        try:
            yield threads
        finally:
            elapsed = self.clock() - t0
            if before != threads:
                torch.set_num_threads(before)
        if len(self.options) > 1:
            self._record(threads, elapsed / max(work, 1e-9))
