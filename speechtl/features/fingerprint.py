"""What a cached feature depends on, as keys: encoder fingerprints (kept in a small per-user
store, since hashing reads every weight), the preprocessing, and each manifest entry's audio
(its size and a digest of its bytes; not its path, so a moved cache stays current)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from ..core.io import write_text
from ..core.paths import cache_root
from ..data.audio import SAMPLE_RATE
from ..data.manifest import Utterance
from ..encoders.base import Encoder
from ..encoders.native import architecture
from ..encoders.registry import resolve_encoder

logger = logging.getLogger(__name__)


def encoder_fingerprint(encoder: Encoder, reuse: bool = True) -> str:
    """sha256 of the encoder's architecture (config) and every weight's bytes.

    Hashing reads every weight (1.2 GB for XLS-R 300M), so with ``reuse`` the result is
    kept in a small per-user store (``$SPEECHTL_CACHE/fingerprints``, default
    ``~/.cache/speechtl/fingerprints``) and read back by a later call with the same
    :func:`fingerprint_reuse_key`: the same config, the same files in the folder the
    encoder was loaded from (path, size, modification and change times, inode), and the
    same weights in memory as far as their names, dtypes, shapes and 64 evenly spaced
    values of each show. A changed weight file, another config, or weights changed in
    memory (trained, randomly initialised) are hashed afresh. Encoders not loaded from a
    local folder (a hub id, a config) are always hashed, and ``reuse=False`` always
    hashes (for weights edited in memory a few values at a time).
    """
    cfg_json = _config_json(encoder)
    state = encoder.model.state_dict()
    files = _source_files(encoder) if reuse else None
    memo = _fingerprint_store() / fingerprint_reuse_key(encoder, cfg_json, state, files) if files is not None else None
    if memo is not None:
        try:
            known = memo.read_text(encoding="ascii").strip()
            if len(known) == 64 and all(c in "0123456789abcdef" for c in known):
                with contextlib.suppress(OSError):
                    os.utime(memo)  # recently used: pruned last
                return known
        except (OSError, UnicodeDecodeError):
            pass
    fingerprint = _hash_weights(cfg_json, state)
    if memo is not None and not _racy(files):
        _remember(memo, fingerprint)
    return fingerprint


def _config_json(encoder: Encoder) -> str:
    """The architecture part of the fingerprint. Families that speechtl's own modules can run
    (wav2vec2, HuBERT, Whisper) hash the config keys that decide the forward pass, so that an
    encoder loaded through either transformers or :mod:`speechtl.encoders.native` has one
    fingerprint; other families hash their whole config."""
    cfg = architecture(encoder.config)
    if cfg is None:
        cfg = {k: v for k, v in encoder.config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
    return json.dumps(cfg, sort_keys=True, default=str)


def _hash_weights(cfg_json: str, state: dict) -> str:
    h = hashlib.sha256()
    h.update(cfg_json.encode())
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # the bytes, without a copy
    return h.hexdigest()


FINGERPRINT_STORE_VERSION = 1
FINGERPRINT_STORE_SIZE = 256  # fingerprints kept; the oldest go first
PROBE_VALUES = 64  # values of each weight that the reuse key reads
RACY_SECONDS = 2.0  # a file modified this recently could change again within its timestamp's resolution


def _fingerprint_store() -> Path:
    return cache_root() / "fingerprints"


def _source_files(encoder: Encoder) -> list | None:
    """The folder the encoder was loaded from, and ``[name, size, mtime_ns, ctime_ns, inode]``
    of each file in it; None when it was not loaded from a local folder."""
    source = getattr(encoder, "source", "") or ""
    if source in ("", "config"):  # encoder_from_config: weights from no file
        return None
    try:
        folder = resolve_encoder(source)
        if not os.path.isdir(folder):
            return None
        files = []
        with os.scandir(folder) as entries:
            for e in entries:
                if e.is_file():  # follows links (a hub snapshot's files link to blobs)
                    st = e.stat()
                    files.append([e.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    except (OSError, ValueError):
        return None
    return [os.path.realpath(folder), sorted(files)]


def fingerprint_reuse_key(encoder: Encoder, cfg_json: str | None = None, state: dict | None = None,
                          files: list | None = None) -> str | None:
    """The key under which :func:`encoder_fingerprint` keeps an encoder's fingerprint (see
    there), or None for an encoder that is always hashed. It reads 64 values of each weight
    and the folder's file list: milliseconds, against about a second per GB for the hash."""
    files = _source_files(encoder) if files is None else files
    if files is None:
        return None
    cfg_json = _config_json(encoder) if cfg_json is None else cfg_json
    state = encoder.model.state_dict() if state is None else state
    h = hashlib.sha256()
    h.update(f"speechtl-fingerprint-key-{FINGERPRINT_STORE_VERSION}\0".encode())
    h.update(cfg_json.encode())
    h.update(json.dumps(files).encode())
    for name, t in sorted(state.items()):
        flat = t.detach().reshape(-1)
        n = flat.numel()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if n:
            k = min(n, PROBE_VALUES)
            idx = torch.arange(k, device=flat.device) * (n - 1) // max(k - 1, 1)  # the first and the last among them
            h.update(flat[idx].cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def _racy(files: list) -> bool:
    """A file changed so recently that it could change again without its timestamps showing
    it (git's "racily clean" entries): such a fingerprint is not kept."""
    now = time.time_ns()
    return any(now - max(mtime, ctime) < RACY_SECONDS * 1e9 for _, _, mtime, ctime, _ in files[1])


def _remember(memo: Path, fingerprint: str) -> None:
    try:
        write_text(memo, fingerprint + "\n")
        entries = sorted(memo.parent.glob("[0-9a-f]" * 8 + "*"), key=lambda p: p.stat().st_mtime_ns)
        for old in entries[: max(0, len(entries) - FINGERPRINT_STORE_SIZE)]:
            old.unlink(missing_ok=True)
    except OSError as e:  # a read-only home, a store pruned by another process: hash next time
        logger.debug("encoder fingerprint not kept in %s: %s", memo.parent, e)


def preprocessing(encoder: Encoder) -> dict:
    """How audio becomes encoder input; part of every key."""
    prep = {"sample_rate": SAMPLE_RATE, "resampler": "soxr_hq", "channels": "mean", "normalize": encoder.normalize_waveform}
    front_end = getattr(encoder, "front_end", None)
    if front_end is not None:
        prep["front_end"] = f"whisper-log-mel-{front_end.n_mels}-v1"
    return prep


DIGEST_WHOLE = 1 << 20  # files up to this size are hashed whole; larger ones at their start, middle and end
DIGEST_PART = 1 << 18


def audio_digest(path: str) -> str:
    """The audio file's size and a hash of its bytes (all of them up to 1 MiB; beyond that
    256 KiB at the start, middle and end), so that audio re-rendered at the same length is
    seen as changed. "missing" when it cannot be read."""
    try:
        size = os.stat(path).st_size
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            if size <= DIGEST_WHOLE:
                h.update(f.read())
            else:
                for start in (0, size // 2 - DIGEST_PART // 2, size - DIGEST_PART):
                    f.seek(start)
                    h.update(f.read(DIGEST_PART))
    except OSError:
        return "missing"
    return f"{size}:{h.hexdigest()}"


def entry_key(u: Utterance, with_path: bool = False, digest: str | None = None) -> str:
    """What of a manifest entry the features depend on: its id, duration, speed and audio
    content (size and digest, :func:`audio_digest` unless ``digest`` is given), and not where
    the file lies, so that a corpus and its cache moved together, to another folder or
    machine, are still current. ``with_path``: the key of caches written before (their
    ``cache.json`` has no ``entry_keys``), which also held the file's absolute path."""
    speed = f"\tspeed={u.speed!r}" if u.speed != 1 else ""  # a speed-perturbed copy (train speed_perturb)
    where = f"\t{os.path.abspath(u.audio)}" if with_path else ""
    return f"{u.id}{where}\t{u.duration:.4f}\t{audio_digest(u.audio) if digest is None else digest}{speed}"
