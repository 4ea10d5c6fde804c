"""Encoder features computed once for frozen-mode training.

A frozen encoder in eval mode is a fixed function, so its layer outputs for a clip are
the same every epoch. :func:`extract_in_memory` runs it once over a set of utterances
(duration-sorted batches, ``inference_mode``) and keeps every layer's output per clip in
float16; :class:`FeatureDataset` then serves them to the head, which is all that trains.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..core.precision import encoder_autocast_dtype
from ..data.loader import AudioDataset, UtteranceDataset, collate, encoder_batch_seconds, pad_targets, sorted_loader
from ..data.manifest import Utterance
from ..encoders.wav2vec2 import SpeechEncoder

logger = logging.getLogger(__name__)


def estimate_bytes(encoder: SpeechEncoder, utterances: Sequence[Utterance], bytes_per_value: int = 2) -> int:
    """Memory the float16 features of ``utterances`` take (all layers)."""
    frames = sum(int(encoder.frame_lengths(int(u.duration * 16_000))) for u in utterances)
    return frames * encoder.num_layers * encoder.hidden_size * bytes_per_value


def cpu_streams(device: torch.device | str) -> int:
    """Default number of batches an encoder runs at once: on a CPU, one per core, each on
    one intra-op thread (several small matrix products side by side keep the cores busier
    than one split across them); on a GPU, one."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), 8))


_END = object()


def side_by_side(fn: Callable, jobs: Sequence, streams: int) -> Iterator:
    """``fn(job)`` for every job, ``streams`` at a time on threads with one intra-op thread
    each (several small matrix products side by side keep a CPU's cores busier than one
    split across them), yielding the results in the jobs' order. At most two jobs per
    thread are started ahead of the one being yielded; the thread count is restored after."""
    if streams <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield fn(job)
        return

    def run(job):
        torch.set_num_threads(1)
        return fn(job)

    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=streams)
    try:
        pending = iter(jobs)
        in_flight: deque = deque(pool.submit(run, job) for job in itertools.islice(pending, 2 * streams))
        while in_flight:
            result = in_flight.popleft().result()
            nxt = next(pending, _END)
            if nxt is not _END:
                in_flight.append(pool.submit(run, nxt))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def encode_batches(
    encoder: SpeechEncoder,
    batches: Iterable,
    device: torch.device,
    layer_ids: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float16,
    streams: int | None = None,
    amp: str = "auto",
) -> Iterator[tuple[object, list[torch.Tensor]]]:
    """Run a frozen encoder over ``batches`` (:class:`~speechtl.data.loader.Batch`) and yield each
    batch with its clips' features, ``(layers, frames, dim)`` in ``dtype`` on the CPU, in
    the order the batches came.

    Under ``inference_mode``, with the autocast of :func:`encoder_autocast_dtype` (bf16 or
    fp16 on CUDA, bf16 on a CPU with AMX, unless ``amp="none"``). With ``streams > 1``
    (CPUs only; default :func:`cpu_streams`), that many batches run at once on threads
    with one intra-op thread each; the encoder keeps its per-call state per thread. Each
    thread also draws its next batch from ``batches`` itself (one at a time, under a
    lock), so that reading and padding audio happens on the threads that compute rather
    than on a third thread competing with them for the cores; a thread that finishes
    takes the next batch at once, and results still come in order. The caller's random
    stream is left as it was (transformers draws layerdrop numbers even in eval mode);
    iterate under ``contextlib.closing`` so that an error in the caller's loop restores it
    (and the thread count) at once.
    """
    amp_dtype = encoder_autocast_dtype(device, amp)
    streams = cpu_streams(device) if streams is None else streams
    if device.type != "cpu":  # a GPU runs one big batch at a time
        streams = 1

    def run(batch):
        if streams > 1:
            torch.set_num_threads(1)
        with torch.inference_mode():
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                b = batch.to(device, non_blocking=True)
                enc = encoder(b.waveforms, b.lengths, all_layers=True)
            # outside autocast: layers may come in mixed dtypes (float32 norms, bf16 products)
            hidden = enc.hidden_states if layer_ids is None else [enc.hidden_states[i] for i in layer_ids]
            frames = enc.lengths.tolist()
            if device.type == "cpu":  # one copy per clip: its valid frames, converted in place
                feats = []
                for k, n in enumerate(frames):
                    f = torch.empty(len(hidden), n, hidden[0].shape[-1], dtype=dtype)
                    for i, h in enumerate(hidden):
                        f[i].copy_(h[k, :n])
                    feats.append(f)
                return batch, feats
            # one device-to-host transfer per batch, then the clips are cut on the host
            stacked = torch.stack([h.to(dtype) for h in hidden]).cpu()  # (L, B, T, D)
            return batch, [stacked[:, k, :n].contiguous() for k, n in enumerate(frames)]

    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        if streams <= 1:
            for batch in batches:
                yield run(batch)
            return
        source = iter(batches)
        lock = threading.Lock()
        drawn = 0  # batches taken from the source so far

        def draw_and_run():
            nonlocal drawn
            with lock:  # the source is read by one thread at a time, in order
                n = drawn
                batch = next(source, None)
                if batch is None:
                    return n, None
                drawn += 1
            return n, run(batch)

        pool = ThreadPoolExecutor(max_workers=streams)
        try:
            # streams tasks running and as many waiting: a thread that finishes starts the next at once
            in_flight: deque = deque(pool.submit(draw_and_run) for _ in range(2 * streams))
            done: dict[int, tuple] = {}
            exhausted, nxt = False, 0
            while in_flight:
                n, result = in_flight.popleft().result()
                if result is None:
                    exhausted = True
                else:
                    done[n] = result
                    if not exhausted:
                        in_flight.append(pool.submit(draw_and_run))
                while nxt in done:
                    yield done.pop(nxt)
                    nxt += 1
        finally:
            # on an error or an early close, the waiting tasks are dropped, not run
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads)


def extract_in_memory(
    encoder: SpeechEncoder,
    utterances: Sequence[Utterance],
    device: torch.device | str = "cpu",
    max_batch_seconds: float | None = None,
    num_workers: int = 0,
    progress: bool = False,
    streams: int | None = None,
    amp: str = "auto",
) -> dict[str, torch.Tensor]:
    """Return ``{utterance id: (layers, frames, dim) float16}`` for every utterance."""
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
