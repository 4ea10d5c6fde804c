"""An on-disk cache of frozen-encoder features, written by ``speechtl extract``.

Layout of a cache directory::

    cache.json               what was extracted (encoder fingerprint, layers, dtype, the
                             precision the encoder ran in, preprocessing), the shard plan
                             and the index id -> shard
    shard-00000.safetensors  one tensor per clip, named by utterance id, shaped
                             (layers, frames, hidden) in the cache dtype

Clips are sorted by duration and cut into shards of about ``shard_seconds`` of audio.
Every shard carries a key (in its safetensors metadata) that hashes the encoder, the
layers, the dtype, the compute precision (float32, or a bf16/fp16 autocast), the
preprocessing and each of its manifest entries, so:

- an interrupted extraction resumes by skipping the shards already on disk with the
  right key (each shard is written atomically, so a shard on disk is whole);
- a cache made with other weights, layers, precision or audio is detected as stale and
  is never read silently (:class:`StaleCacheError`);
- with ``torchrun``, rank r extracts shards r, r + N, r + 2N, ... of one shared plan;
- an entry's key holds its audio's content, not its path (``"entry_keys": "content"`` in
  ``cache.json``), so a corpus moved with its cache to another folder or machine is still
  current; caches written before also hashed the absolute path and are read as written.

The keys are made in :mod:`speechtl.features.fingerprint` (the encoder's part, a hash of all
its weights, is computed once per encoder folder and kept in a small per-user store), and the
features by :func:`speechtl.features.extract.extract_to_cache`.

Reading a clip opens only its shard (memory-mapped), and only the layers asked for.
"""


from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open

from ..data.manifest import Utterance
from .fingerprint import encoder_fingerprint, entry_key  # noqa: F401  (encoder_fingerprint re-exported)

CACHE_FILE = "cache.json"
CACHE_VERSION = 4  # 2: the compute precision is part of every key; 3: audio content in keys, per-entry keys;
# 4: wav2vec2, HuBERT and Whisper fingerprints hash the config keys that decide the forward pass
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class StaleCacheError(RuntimeError):
    """The cache on disk was made from a different encoder, layers, dtype or audio."""


def _sha(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def _base_key(fingerprint: str, layers: Sequence[int], dtype: str, compute: str, prep: dict) -> str:
    """What every shard key of one cache shares: format, encoder, layers, dtype, compute
    precision, preprocessing."""
    return _sha(str(CACHE_VERSION), fingerprint, json.dumps(list(layers)), dtype, compute,
                json.dumps(prep, sort_keys=True))


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Shard:
    file: str
    key: str
    ids: tuple[str, ...]


def plan_shards(utterances: Sequence[Utterance], base_key: str, shard_seconds: float,
                keys: dict[str, str] | None = None) -> list[Shard]:
    """Duration-sorted shards of about ``shard_seconds`` of audio, keyed by their entries
    (``keys``: :func:`entry_key` by id, when already computed)."""
    keys = keys if keys is not None else {u.id: entry_key(u) for u in utterances}
    order = sorted(range(len(utterances)), key=lambda i: (utterances[i].duration, utterances[i].id))
    groups: list[list[int]] = []
    total = 0.0
    for i in order:
        if not groups or total >= shard_seconds:
            groups.append([])
            total = 0.0
        groups[-1].append(i)
        total += utterances[i].duration
    return [
        Shard(f"shard-{n:05d}.safetensors", _sha(base_key, *(keys[utterances[i].id] for i in g)),
              tuple(utterances[i].id for i in g))
        for n, g in enumerate(groups)
    ]


def _shard_key_on_disk(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("key")
    except Exception:  # missing, truncated or not a safetensors file: not done
        return None


def _resolve_layers(layers: str | Sequence[int], num_layers: int) -> list[int]:
    if isinstance(layers, str):
        if layers == "all":
            return list(range(num_layers))
        layers = [int(x) for x in layers.split(",") if x.strip()]
    out = [i + num_layers if i < 0 else i for i in layers]
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad or not out:
        raise ValueError(f"layers must be 'all' or indices in [0, {num_layers - 1}] (0 = CNN/projection output), got {layers}")
    return out


# --------------------------------------------------------------------------- read


class FeatureCache:
    """Read access to a cache directory: ``cache[utt_id]`` -> ``(layers, frames, hidden)``.

    Args:
        path: the cache directory.
        layers: positions within the cached layers to return (default: all of them).
    """

    def __init__(self, path: str | os.PathLike, layers: Sequence[int] | None = None):
        self.path = Path(path)
        meta_path = self.path / CACHE_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path}: no feature cache here ({CACHE_FILE} is missing)")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("version") != CACHE_VERSION:
            raise StaleCacheError(f"{self.path}: cache format {self.meta.get('version')}, this speechtl reads {CACHE_VERSION}")
        self.shards = [Shard(s["file"], s["key"], tuple(s["ids"])) for s in self.meta["shards"]]
        self.index = {uid: n for n, s in enumerate(self.shards) for uid in s.ids}
        self.layers = None if layers is None else list(layers)
        self._open: dict[int, object] = {}

    @property
    def fingerprint(self) -> str:
        return self.meta["encoder"]["fingerprint"]

    @property
    def num_layers(self) -> int:
        return len(self.meta["layers"]) if self.layers is None else len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.meta["encoder"]["hidden_size"])

    def __contains__(self, uid: str) -> bool:
        return uid in self.index

    def __len__(self) -> int:
        return len(self.index)

    def missing_shards(self) -> list[str]:
        """Shards whose file is absent or carries another key (an unfinished extraction)."""
        return [s.file for s in self.shards if _shard_key_on_disk(self.path / s.file) != s.key]

    def check(self, utterances: Iterable[Utterance], fingerprint: str | None = None, layers: Sequence[int] | None = None,
              compute: str | None = None) -> None:
        """Raise :class:`StaleCacheError` unless the cache holds exactly these clips'
        current features (and, if given, was made by this encoder with these layers, the
        encoder running in ``compute`` precision: "float32", "bfloat16" or "float16")."""
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise StaleCacheError(f"{self.path}: made by a different encoder (weights or config changed)")
        if layers is not None and list(layers) != self.meta["layers"]:
            raise StaleCacheError(f"{self.path}: holds layers {self.meta['layers']}, not {list(layers)}")
        if compute is not None and compute != self.meta["compute"]:
            raise StaleCacheError(f"{self.path}: the encoder ran in {self.meta['compute']} for this cache, "
                                  f"this run computes in {compute} (see amp)")
        base = _base_key(self.fingerprint, self.meta["layers"], self.meta["dtype"], self.meta["compute"],
                         self.meta["preprocessing"])
        utterances = list(utterances)
        absent = [u.id for u in utterances if u.id not in self.index]
        if absent:
            raise StaleCacheError(f"{self.path}: {len(absent)} clip(s) are not in the cache, e.g. {absent[0]!r}")
        entries = self.meta["entries"]
        with_path = self.meta.get("entry_keys") != "content"  # a cache written before keys left the path out
        changed = [u.id for u in utterances if entries.get(u.id) != _sha(base, entry_key(u, with_path))]
        if changed:
            raise StaleCacheError(f"{self.path}: {len(changed)} clip(s) were cached from other audio or another manifest "
                                  f"entry, e.g. {changed[0]!r}")
        missing = self.missing_shards()
        if missing:
            raise StaleCacheError(f"{self.path}: {len(missing)} shard(s) unfinished or stale, e.g. {missing[0]} "
                                  "(run speechtl extract again to finish)")

    def _handle(self, n: int):
        h = self._open.get(n)
        if h is None:
            h = self._open[n] = safe_open(str(self.path / self.shards[n].file), framework="pt")
        return h

    def __getitem__(self, uid: str) -> torch.Tensor:
        n = self.index.get(uid)
        if n is None:
            raise KeyError(f"{uid!r} is not in the feature cache {self.path}")
        h = self._handle(n)
        if self.layers is None:
            return h.get_tensor(uid)
        sl = h.get_slice(uid)
        return torch.stack([sl[i] for i in self.layers])

    def __getstate__(self):  # DataLoader workers reopen their own handles
        state = dict(self.__dict__)
        state["_open"] = {}
        return state
