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
- with ``torchrun``, rank r extracts shards r, r + N, r + 2N, ... of one shared plan.

The encoder's part of the key, a hash of all its weights, is computed once per encoder
folder and kept in a small per-user store (:func:`encoder_fingerprint`).

Reading a clip opens only its shard (memory-mapped), and only the layers asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.io import atomic_path, write_json, write_text
from ..core.paths import cache_root
from ..core.precision import AMP_FOR_COMPUTE, compute_dtype_name
from ..data.audio import SAMPLE_RATE
from ..data.loader import AudioDataset, collate, cut_batches, decode_workers, encoder_batch_seconds, is_small_job
from ..data.manifest import Utterance
from ..encoders.registry import resolve_encoder
from ..encoders.wav2vec2 import SpeechEncoder
from .cpu_plan import choose as choose_schedule
from .extract import encode_batches

logger = logging.getLogger(__name__)

CACHE_FILE = "cache.json"
CACHE_VERSION = 4  # 2: the compute precision is part of every key; 3: audio content in keys, per-entry keys;
# 4: wav2vec2, HuBERT and Whisper fingerprints hash the config keys that decide the forward pass
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class StaleCacheError(RuntimeError):
    """The cache on disk was made from a different encoder, layers, dtype or audio."""


# --------------------------------------------------------------------------- keys


def encoder_fingerprint(encoder: SpeechEncoder, reuse: bool = True) -> str:
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


def _config_json(encoder: SpeechEncoder) -> str:
    """The architecture part of the fingerprint. Families that speechtl's own modules can run
    (wav2vec2, HuBERT, Whisper) hash the config keys that decide the forward pass, so that an
    encoder loaded through either transformers or :mod:`speechtl.encoders.native` has one
    fingerprint; other families hash their whole config."""
    from ..encoders.native import architecture

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


def _source_files(encoder: SpeechEncoder) -> list | None:
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


def fingerprint_reuse_key(encoder: SpeechEncoder, cfg_json: str | None = None, state: dict | None = None,
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


def preprocessing(encoder: SpeechEncoder) -> dict:
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


def entry_key(u: Utterance) -> str:
    """What of a manifest entry the features depend on: its id, audio file (path, size and
    content), duration and speed."""
    speed = f"\tspeed={u.speed!r}" if u.speed != 1 else ""  # a speed-perturbed copy (train speed_perturb)
    return f"{u.id}\t{os.path.abspath(u.audio)}\t{u.duration:.4f}\t{audio_digest(u.audio)}{speed}"


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


# --------------------------------------------------------------------------- extract


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _check_request(encoder: SpeechEncoder, utterances: Sequence[Utterance], dtype: str, shard_seconds: float,
                   shard_gb: float) -> None:
    """Refuse a bad request before any work: the encoder would refuse an overlong clip half-way."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if not (shard_seconds > 0 and shard_gb > 0):
        raise ValueError(f"shard_seconds and shard_gb must be positive (got {shard_seconds}, {shard_gb})")
    span = getattr(encoder, "max_seconds", float("inf"))
    too_long = [u.id for u in utterances if u.duration > span]
    if too_long:
        raise ValueError(f"{len(too_long)} clip(s) are longer than this encoder's {span:g} s span "
                         f"(first: {', '.join(too_long[:5])}); cut them, or leave them out of the manifest")


def extract_to_cache(
    encoder: SpeechEncoder,
    utterances: Sequence[Utterance],
    out_dir: str | os.PathLike,
    layers: str | Sequence[int] = "all",
    dtype: str = "float16",
    device: str | torch.device = "cpu",
    amp: str = "auto",
    max_batch_seconds: float | None = None,
    num_workers: int | None = None,
    streams: int | None = None,
    shard_seconds: float = 1800.0,
    shard_gb: float = 0.5,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> "FeatureCache | None":
    """Extract the features of ``utterances`` into ``out_dir``; resume what is there.

    ``max_batch_seconds`` defaults to 10 s of padded audio on a CPU, where big batches
    of a big model run slower than small ones (their activations leave the caches), and
    to 300 s on a GPU, which needs big batches to stay busy. ``num_workers`` (audio
    decoding processes) defaults to none for a small job (under 200 clips or 10 minutes
    of audio left to extract, :func:`~speechtl.data.loader.is_small_job`), where starting them
    costs more than they save, and on a CPU with at most 4 cores, where they would only
    take cores from the model; otherwise to 2 on a CPU and up to 8 on a GPU machine.
    ``streams`` (batches run at once on a CPU, each on one thread) defaults to one per
    core there for a small job; for a bigger one, the streams and the CNN are chosen by
    timing them on this machine once (:mod:`speechtl.features.cpu_plan`). ``amp`` (auto | bf16 | fp16 | none) picks the precision the encoder runs
    in (:func:`~speechtl.core.precision.encoder_autocast_dtype`: ``auto`` is bf16 on CUDA and
    on CPUs with AMX, float32 on other CPUs); it is part of the cache key. A shard holds at
    most ``shard_seconds`` of audio and about ``shard_gb`` of features, whichever is
    less: a shard is held in memory until it is written, so a big encoder (XLS-R 1B
    writes 6 MB per second of audio in float16) gets shorter shards.

    Returns the opened cache, or ``None`` on a rank of a multi-process run that
    finished before the others (rank 0 returns the cache once all shards exist).
    """
    _check_request(encoder, utterances, dtype, shard_seconds, shard_gb)
    if rank is None or world_size is None:
        rank, world_size = _dist_info()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    if max_batch_seconds is None:
        max_batch_seconds = encoder_batch_seconds(device)
    layer_ids = _resolve_layers(layers, encoder.num_layers)
    fingerprint = encoder_fingerprint(encoder)
    prep = preprocessing(encoder)
    compute = compute_dtype_name(device, amp)
    distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        # one precision for the whole cache, even where machines differ (an AMX CPU beside one without)
        box = [compute]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] != compute:
            logger.warning("rank %d: computing in %s as rank 0 does (amp=%s gives %s here)", rank, box[0], amp, compute)
            compute = box[0]
            amp = AMP_FOR_COMPUTE[compute]
    base_key = _base_key(fingerprint, layer_ids, dtype, compute, prep)
    bytes_per_second = encoder.frame_rate * len(layer_ids) * encoder.hidden_size * DTYPES[dtype].itemsize
    keys = {u.id: entry_key(u) for u in utterances}
    shards = plan_shards(utterances, base_key, min(shard_seconds, shard_gb * 1e9 / bytes_per_second), keys)
    meta = {
        "version": CACHE_VERSION,
        "key": _sha(base_key, *(s.key for s in shards)),
        "encoder": {"source": encoder.source, "fingerprint": fingerprint, "model_type": encoder.config.model_type,
                    "num_layers": encoder.num_layers, "hidden_size": encoder.hidden_size, "frame_rate": encoder.frame_rate},
        "layers": layer_ids,
        "dtype": dtype,
        "compute": compute,
        "preprocessing": prep,
        "shards": [{"file": s.file, "key": s.key, "ids": list(s.ids)} for s in shards],
        # every entry's own key, so that a subset of a shard is verified too
        "entries": {uid: _sha(base_key, k) for uid, k in keys.items()},
        "utterances": len(utterances),
        "audio_hours": sum(u.duration for u in utterances) / 3600,
    }
    if rank == 0:
        write_json(out / CACHE_FILE, meta)

    by_id = {u.id: u for u in utterances}
    mine = [s for n, s in enumerate(shards) if n % world_size == rank]
    todo = [s for s in mine if _shard_key_on_disk(out / s.file) != s.key]
    if len(todo) < len(mine):
        logger.info("rank %d: %d of %d shard(s) already extracted", rank, len(mine) - len(todo), len(mine))
    todo_durations = [by_id[i].duration for s in todo for i in s.ids]
    if todo and num_workers is None:
        num_workers = decode_workers(device, todo_durations)
    if todo:
        fast_cnn = encoder.fast_cnn
        if streams is None and device.type == "cpu" and not is_small_job(todo_durations):
            # a job this size repays timing the ways of running the encoder here (once per machine)
            schedule = choose_schedule(encoder, device, amp)
            streams, encoder.fast_cnn = schedule.streams, schedule.fast_cnn and fast_cnn
        try:
            _extract_shards(encoder, todo, by_id, out, layer_ids, DTYPES[dtype], device, max_batch_seconds, num_workers,
                            streams, amp, progress)
        finally:
            encoder.fast_cnn = fast_cnn
    if distributed:
        torch.distributed.barrier()
    if rank != 0:
        return None
    return FeatureCache(out)


def _extract_shards(encoder, shards, by_id, out, layer_ids, dtype, device, max_batch_seconds, num_workers, streams,
                    amp, progress) -> None:
    utts = [by_id[i] for s in shards for i in s.ids]
    ds = AudioDataset(utts)
    durations = ds.durations
    batches, bounds, start = [], [], 0
    for s in shards:  # batches never cross a shard boundary, so each shard is written as soon as it is done
        idx = list(range(start, start + len(s.ids)))
        batches += cut_batches(idx, durations, max_batch_seconds)
        start += len(s.ids)
        bounds.append(start)
    loader = DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    was_training = encoder.training
    encoder.eval().to(device)
    hours = sum(durations) / 3600
    bar = tqdm(total=round(hours, 4), desc="extract", unit="h", disable=not progress, bar_format=(
        "{desc}: {percentage:3.0f}%|{bar}| {n:.3f}/{total:.3f} audio-h [{elapsed}<{remaining}, {rate_fmt}]"))
    pending: dict[str, torch.Tensor] = {}
    shard_i, done = 0, 0
    # shards are written by one background thread while the encoder runs on; at most one
    # write is in flight, and a failed write raises here
    writer = ThreadPoolExecutor(max_workers=1)
    writing = None

    def write(path: Path, tensors: dict, key: str) -> None:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"key": key})

    try:
        with closing(encode_batches(encoder, loader, device, layer_ids, dtype, streams, amp)) as encoded:
            for batch, feats in encoded:
                pending.update(zip(batch.ids, feats))
                done += len(batch.ids)
                bar.update(round(sum(batch.durations) / 3600, 6))
                while shard_i < len(shards) and done >= bounds[shard_i]:
                    s = shards[shard_i]
                    if writing is not None:
                        writing.result()
                    writing = writer.submit(write, out / s.file, {uid: pending.pop(uid) for uid in s.ids}, s.key)
                    shard_i += 1
        if writing is not None:
            writing.result()
    finally:
        writer.shutdown(wait=True)
    bar.close()
    encoder.train(was_training)


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
        changed = [u.id for u in utterances if entries.get(u.id) != _sha(base, entry_key(u))]
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
