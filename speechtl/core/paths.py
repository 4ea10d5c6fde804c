"""Where speechtl keeps its per-user files: one cache root, ``$SPEECHTL_CACHE`` (default
``~/.cache/speechtl``), with fetched encoders, encoder fingerprints and the CPU thread plan
under it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SPEECHTL_CACHE``, or ``~/.cache/speechtl`` when it is unset or empty."""
    return Path(os.environ.get("SPEECHTL_CACHE") or Path.home() / ".cache" / "speechtl")


def fetched_dir(name: str | None = None) -> Path:
    """Where fetched encoders live: ``$SPEECHTL_CACHE/encoders`` (default ``~/.cache/speechtl``)."""
    root = cache_root() / "encoders"
    return root / name if name else root
