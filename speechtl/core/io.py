"""Atomic file writing: write to a temporary name in the same folder, then rename.

A reader never sees a half-written file, and a crash leaves either the old file or
the new one, never a truncated mix.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
    except Exception as e:
        if not is_write_failure(e):
            raise
        raise write_error(path, e) from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_WRITE_ERRNOS = {getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EIO") if hasattr(errno, n)}


def is_write_failure(e: BaseException) -> bool:
    """An error of the disk under a write (full, over quota, read-only, gone) as the libraries
    report it: an OSError, torch.save's ``basic_ios::clear: iostream error`` or ``file write
    failed``, safetensors' ``SafetensorError ... os error 28``."""
    if isinstance(e, OSError):
        return e.errno in _WRITE_ERRNOS
    text = str(e)
    return type(e).__name__ == "SafetensorError" and "os error" in text or isinstance(e, RuntimeError) and any(
        s in text for s in ("iostream error", "file write failed", "No space left", "os error"))


def write_error(path: str | os.PathLike, e: BaseException) -> OSError:
    """An OSError that names ``path``, what went wrong and how much room its disk has left."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [type(e).__name__])[0]
    try:
        free = f"; {shutil.disk_usage(Path(path).parent).free / 1e6:.0f} MB free there"
    except OSError:
        free = ""
    err = OSError(getattr(e, "errno", None), f"{path}: cannot write it ({reason}{free}); is the disk full? "
                                              f"Any earlier version of the file is unchanged")
    err.filename = None  # the message names the path already
    return err


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; swap it into place on success.

    An existing folder at ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():  # a process killed between the two renames below
        os.replace(old, path)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        had_old = path.exists()
        if had_old:
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if had_old:
            shutil.rmtree(old, ignore_errors=True)
    except Exception as e:
        if not is_write_failure(e):
            raise
        raise write_error(path, e) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_safetensors(path: str | os.PathLike) -> dict:
    """``safetensors.torch.load_file``, with errors that name the file (safetensors' own, such
    as ``incomplete metadata`` for a file cut short, do not)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read these weights ({type(e).__name__}: {e}); the file is damaged or cut "
                         f"short (a full disk, an interrupted copy?): copy it again, or write it again") from e


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove_stale(path: Path) -> None:
    """Delete temporary siblings of ``path`` left by a process killed while writing it
    (one writer per path: a second process writing the same path at once is not supported)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
