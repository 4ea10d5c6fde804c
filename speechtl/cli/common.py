"""What every command module shares: the parser class, the common flags, argument types,
and the start-up that pauses the garbage collector while a command imports and loads."""

from __future__ import annotations

import argparse
import contextlib
import gc
from typing import Callable


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose description can be a function, called when help is shown
    (``train``'s lists every config key, and reading those imports torch)."""

    def __init__(self, *args, describe: Callable[[], str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._describe = describe

    def format_help(self) -> str:
        if self._describe is not None:
            self.description, self._describe = self._describe(), None
        return super().format_help()


@contextlib.contextmanager
def start_up(args):
    """Imports and model loading: pause the garbage collector while they run, then freeze
    what they made.

    They create about a million long-lived objects and next to no garbage, and the
    collector would walk all of them several times over (about 1.5 s of a 10 s `extract` of
    two clips on a busy 2-core machine); frozen, they are skipped by later collections and
    at the interpreter's exit. Only in a process started as the command (:func:`main`
    without ``argv``): a caller's own process keeps its collector as it is.
    """
    if not getattr(args, "as_program", False):
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def add_common(p: argparse.ArgumentParser, threads: bool = False) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars; warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    if threads:
        p.add_argument("--threads", type=at_least_one, default=None,
                       help="CPU threads at most (default: the CPUs this process may use, after taskset, a cgroup "
                            "CPU quota and OMP_NUM_THREADS)")


def at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {n})")
    return n


def number(text: str) -> float:
    """A flag's value as a float, or argparse's usage error naming it."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float(text: str) -> float:
    """A finite number greater than 0 (seconds, sizes): 0, negatives, nan and inf are refused here."""
    import math

    x = number(text)
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0 (got {text})")
    return x


def floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def int_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        r = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO-HI, e.g. 130-200, got {text!r}") from None
    if r[0] > r[1]:
        raise argparse.ArgumentTypeError(f"empty range {text!r}")
    return r
