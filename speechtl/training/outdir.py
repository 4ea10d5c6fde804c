"""A run's output folder (``out=``): never replaced without being asked, never shared.

:func:`check_out` refuses, before any work, a folder that holds a run or a model unless
``resume=true`` (continue it) or ``overwrite=true`` (replace it) says what to do with it.
:class:`OutLock` keeps a second run out of a folder in use: it holds an advisory ``flock``
on ``out/.lock`` for the whole run. The kernel drops that lock when its process dies, however
it dies, so a lock file left by a dead process is simply taken over.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# what a finished or interrupted run (or a model folder) leaves: replacing these loses work
RUN_MARKERS = ("checkpoints/last.pt", "model", "model_avg", "model_labelled", "train_summary.json", "speechtl.json")


def check_out(out: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse to start afresh in a folder holding a run or a model, unless told to."""
    out = Path(out)
    if resume or overwrite or not out.is_dir():
        return
    found = [m for m in RUN_MARKERS if (out / m).exists()]
    if found:
        raise ValueError(f"{out}: holds a training run or a model already ({', '.join(found)}); add resume=true to "
                         f"continue that run, or overwrite=true to replace it, or choose another out=")


def clear_previous_run(out: Path) -> None:
    """``overwrite=true``: forget the previous run's checkpoint and summary, so that a kill
    before this run's first checkpoint cannot leave a folder that resumes the old run. Its
    model folders are replaced when this run writes its own."""
    if (out / "checkpoints").is_dir():
        shutil.rmtree(out / "checkpoints")
    (out / "train_summary.json").unlink(missing_ok=True)


class OutLock:
    """Exclusive use of a run folder while the ``with`` block runs; a folder in use by a live
    process raises RuntimeError at once, naming that process."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self._file = None
        self._created = False

    def __enter__(self) -> "OutLock":
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run unlocked
            return self
        self._created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RuntimeError(f"{self.out}: in use by a live training run ({holder}, lock {self.path}); wait for "
                               f"it to end, or choose another out=") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> bool:
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
            if self._created and [p.name for p in self.out.iterdir()] == [LOCK_NAME]:
                # a run refused before any work leaves no folder behind
                self.path.unlink(missing_ok=True)
                self.out.rmdir()
        return False
