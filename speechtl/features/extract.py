"""Encoder features computed once for frozen-mode training.

A frozen encoder in eval mode is a fixed function, so its layer outputs for a clip are
the same every epoch. :func:`extract_in_memory` runs it once over a set of utterances
(duration-sorted batches, ``inference_mode``) and keeps every layer's output per clip in
float16; :func:`extract_to_cache` writes them into an on-disk cache
(:mod:`speechtl.features.cache`) instead, resuming what is there. :class:`FeatureDataset`
then serves them to the head, which is all that trains.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.cpus import apply_budget, cap_workers
from ..core.io import atomic_path, write_json
from ..core.precision import AMP_FOR_COMPUTE, compute_dtype_name
from ..data.loader import (
    AudioDataset,
    UtteranceDataset,
    collate,
    cut_batches,
    decode_workers,
    encoder_batch_seconds,
    is_small_job,
    pad_targets,
    sorted_loader,
)
from ..data.manifest import Utterance
from ..encoders.base import Encoder
from .cache import (
    CACHE_FILE,
    CACHE_VERSION,
    DTYPES,
    FeatureCache,
    Shard,
    _base_key,
    _resolve_layers,
    _sha,
    _shard_key_on_disk,
    plan_shards,
)
from .cpu_plan import choose as choose_schedule
from .encode import encode_batches
from .fingerprint import audio_digest, encoder_fingerprint, entry_key, preprocessing

logger = logging.getLogger(__name__)


def estimate_bytes(encoder: Encoder, utterances: Sequence[Utterance], bytes_per_value: int = 2) -> int:
    """Memory the float16 features of ``utterances`` take (all layers)."""
    frames = sum(int(encoder.frame_lengths(int(u.duration * 16_000))) for u in utterances)
    return frames * encoder.num_layers * encoder.hidden_size * bytes_per_value


def extract_in_memory(
    encoder: Encoder,
    utterances: Sequence[Utterance],
    device: torch.device | str = "cpu",
    max_batch_seconds: float | None = None,
    num_workers: int = 0,
    progress: bool = False,
    streams: int | None = None,
    amp: str = "auto",
) -> dict[str, torch.Tensor]:
    """Return ``{utterance id: (layers, frames, dim) float16}`` for every utterance."""
    apply_budget()
    device = torch.device(device)
    if max_batch_seconds is None:
        max_batch_seconds = encoder_batch_seconds(device)
    was_training = encoder.training
    encoder.eval()
    ds = AudioDataset(utterances)
    loader = sorted_loader(ds, max_batch_seconds, collate, num_workers, device)
    out: dict[str, torch.Tensor] = {}
    bar = tqdm(total=round(sum(ds.durations)), desc="encode", unit="s", disable=not progress, leave=False)
    with closing(encode_batches(encoder, loader, device, streams=streams, amp=amp)) as encoded:
        for batch, feats in encoded:
            out.update(zip(batch.ids, feats))
            bar.update(round(sum(batch.durations)))
    bar.close()
    encoder.train(was_training)
    return out


@dataclass
class FeatureBatch:
    """hidden: (L, B, T, D) float32 zero-padded; frame_lengths (B,); targets as in Batch."""

    hidden: torch.Tensor
    frame_lengths: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor
    ids: list[str]
    texts: list[str]
    durations: list[float]

    def to(self, device, non_blocking: bool = False) -> "FeatureBatch":
        return FeatureBatch(self.hidden.to(device, non_blocking=non_blocking), self.frame_lengths.to(device),
                            self.targets.to(device), self.target_lengths.to(device), self.ids, self.texts, self.durations)


class FeatureDataset(UtteranceDataset):
    """Cached features of ``utterances`` with their (normalised, encoded) transcripts."""

    def __init__(self, utterances: Sequence[Utterance], features: dict[str, torch.Tensor],
                 normalize: Callable[[str], str] | None = None, encode: Callable[[str], list[int]] | None = None):
        super().__init__(utterances, normalize, encode)
        self.features = features

    def __getitem__(self, i: int) -> dict:
        u = self.utterances[i]
        return {"feats": self.features[u.id], **self.labels(u)}


def collate_features(items: Sequence[dict]) -> FeatureBatch:
    lengths = torch.tensor([it["feats"].shape[1] for it in items], dtype=torch.long)
    L, _, D = items[0]["feats"].shape
    hidden = torch.zeros(L, len(items), int(lengths.max()), D)
    for k, it in enumerate(items):
        hidden[:, k, : lengths[k]] = it["feats"].float()
    targets, tlens = pad_targets(items)
    return FeatureBatch(hidden, lengths, targets, tlens, [it["id"] for it in items], [it["text"] for it in items],
                        [it["duration"] for it in items])


# --------------------------------------------------------------------------- into an on-disk cache


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _check_request(encoder: Encoder, utterances: Sequence[Utterance], dtype: str, shard_seconds: float,
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
    encoder: Encoder,
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
    apply_budget()
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
        compute, amp = _rank_zero_precision(compute, amp, rank)
    base_key = _base_key(fingerprint, layer_ids, dtype, compute, prep)
    bytes_per_second = encoder.frame_rate * len(layer_ids) * encoder.hidden_size * DTYPES[dtype].itemsize
    digests = {u.audio: audio_digest(u.audio) for u in utterances}
    with_path = _current_with_paths(out, base_key, utterances, digests)
    keys = {u.id: entry_key(u, with_path, digests[u.audio]) for u in utterances}
    shards = plan_shards(utterances, base_key, min(shard_seconds, shard_gb * 1e9 / bytes_per_second), keys)
    meta = _cache_meta(encoder, utterances, fingerprint, base_key, layer_ids, dtype, compute, prep, shards, keys)
    if not with_path:
        meta["entry_keys"] = "content"
    if rank == 0:
        write_json(out / CACHE_FILE, meta)

    by_id = {u.id: u for u in utterances}
    mine = [s for n, s in enumerate(shards) if n % world_size == rank]
    todo = [s for s in mine if _shard_key_on_disk(out / s.file) != s.key]
    if len(todo) < len(mine):
        logger.info("rank %d: %d of %d shard(s) already extracted", rank, len(mine) - len(todo), len(mine))
    if todo:
        _extract_todo(encoder, todo, by_id, out, layer_ids, DTYPES[dtype], device, max_batch_seconds, num_workers,
                      streams, amp, progress)
    if distributed:
        torch.distributed.barrier()
    if rank != 0:
        return None
    return FeatureCache(out)


def _current_with_paths(out: Path, base_key: str, utterances: Sequence[Utterance], digests: dict[str, str]) -> bool:
    """Whether ``out`` holds a cache written before keys left the audio path out that is
    current for ``utterances``: it is then kept as it is, with its keys, rather than
    extracted again only for a change of key."""
    try:
        meta = json.loads((out / CACHE_FILE).read_text(encoding="utf-8"))
        if meta.get("version") != CACHE_VERSION or meta.get("entry_keys") == "content":
            return False
        entries = meta["entries"]
        return len(entries) == len(utterances) and all(
            entries.get(u.id) == _sha(base_key, entry_key(u, True, digests[u.audio])) for u in utterances)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _cache_meta(encoder: Encoder, utterances: Sequence[Utterance], fingerprint: str, base_key: str,
                layer_ids: list[int], dtype: str, compute: str, prep: dict, shards: list[Shard], keys: dict[str, str]) -> dict:
    """``cache.json``: what was extracted, the shard plan and every entry's key."""
    return {
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


def _rank_zero_precision(compute: str, amp: str, rank: int) -> tuple[str, str]:
    """One precision for the whole cache, even where machines differ (an AMX CPU beside one
    without): rank 0's, with the ``amp`` that gives it."""
    box = [compute]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] != compute:
        logger.warning("rank %d: computing in %s as rank 0 does (amp=%s gives %s here)", rank, box[0], amp, compute)
        return box[0], AMP_FOR_COMPUTE[box[0]]
    return compute, amp


def _extract_todo(encoder, todo, by_id, out, layer_ids, dtype, device, max_batch_seconds, num_workers, streams, amp,
                  progress) -> None:
    """Extract the shards still to do, with the decoding processes and (for a big job on a
    CPU) the streams and CNN that suit the job."""
    todo_durations = [by_id[i].duration for s in todo for i in s.ids]
    num_workers = decode_workers(device, todo_durations) if num_workers is None else cap_workers(num_workers)
    fast_cnn = encoder.fast_cnn
    if streams is None and device.type == "cpu" and not is_small_job(todo_durations):
        # a job this size repays timing the ways of running the encoder here (once per machine)
        schedule = choose_schedule(encoder, device, amp)
        streams, encoder.fast_cnn = schedule.streams, schedule.fast_cnn and fast_cnn
    try:
        _extract_shards(encoder, todo, by_id, out, layer_ids, dtype, device, max_batch_seconds, num_workers, streams, amp,
                        progress)
    finally:
        encoder.fast_cnn = fast_cnn


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
    # unrounded: a total rounded down below the sum of the updates made tqdm clamp (a warning, a negative estimate)
    bar = tqdm(total=hours, desc="extract", unit="h", disable=not progress, bar_format=(
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
                bar.update(sum(batch.durations) / 3600)
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
