"""Dataset, duration-bucketed dynamic batch sampler and collate function.

Batches are capped by *padded* seconds (``max(duration) * batch_size``), so a batch of
short clips holds many and a batch of long clips holds few, and sorting by duration
keeps padding small. Waveforms travel as ``(values, lengths)``: ``values`` is
``(batch, max_samples)`` float32 zero-padded, ``lengths`` is ``(batch,)`` int64
samples.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.constants import SMALL_JOB_CLIPS, SMALL_JOB_SECONDS  # noqa: F401  (re-exported)
from ..core.cpus import cap_workers, cpu_threads
from .audio import SAMPLE_RATE, change_speed, load_audio
from .batching import cut_batches
from .manifest import Utterance

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """A padded batch. Shapes: waveforms (B, S) samples; targets (B, L) token ids."""

    waveforms: torch.Tensor
    lengths: torch.Tensor  # (B,) valid samples per clip
    targets: torch.Tensor  # (B, L) zero-padded token ids (empty if no tokenizer)
    target_lengths: torch.Tensor  # (B,)
    ids: list[str]
    texts: list[str]
    durations: list[float]
    clean: torch.Tensor | None = None  # (B, S) the waveforms before augmentation, when kept (a teacher's input)

    def pin_memory(self) -> "Batch":
        self.waveforms = self.waveforms.pin_memory()
        if self.clean is not None:
            self.clean = self.clean.pin_memory()
        self.lengths = self.lengths.pin_memory()
        self.targets = self.targets.pin_memory()
        self.target_lengths = self.target_lengths.pin_memory()
        return self

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(
            self.waveforms.to(device, non_blocking=non_blocking),
            self.lengths.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            self.target_lengths.to(device, non_blocking=non_blocking),
            self.ids,
            self.texts,
            self.durations,
            None if self.clean is None else self.clean.to(device, non_blocking=non_blocking),
        )


class UtteranceDataset(Dataset):
    """Utterances with their training labels; subclasses add the model input.

    ``normalize`` maps transcripts to training text; ``encode`` maps that text to ids.
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        normalize: Callable[[str], str] | None = None,
        encode: Callable[[str], list[int]] | None = None,
    ):
        self.utterances = list(utterances)
        self.normalize = normalize or (lambda s: s)
        self.encode = encode

    def __len__(self) -> int:
        return len(self.utterances)

    @property
    def durations(self) -> list[float]:
        return [u.duration for u in self.utterances]

    def labels(self, u: Utterance) -> dict:
        text = self.normalize(u.text)
        ids = self.encode(text) if self.encode else []
        return {"ids": torch.tensor(ids, dtype=torch.long), "id": u.id, "text": text, "duration": u.duration}


class AudioDataset(UtteranceDataset):
    """Items are ``dict(wav, ids, id, text, duration)``; audio is decoded on access.

    ``augment`` (a length-preserving ``wav -> wav`` such as :class:`speechtl.data.augment.Augmenter`)
    corrupts each clip with probability ``augment_prob``; ``keep_clean`` adds the clip as it
    was before that, as ``clean``."""

    def __init__(self, utterances, normalize=None, encode=None, sample_rate: int = SAMPLE_RATE,
                 augment: Callable[[np.ndarray], np.ndarray] | None = None, augment_prob: float = 1.0, keep_clean: bool = False):
        super().__init__(utterances, normalize, encode)
        self.sample_rate = sample_rate
        self.augment, self.augment_prob, self.keep_clean = augment, augment_prob, keep_clean

    def __getitem__(self, i: int) -> dict:
        u = self.utterances[i]
        wav = load_audio(u.audio, self.sample_rate)
        if u.speed != 1:
            wav = change_speed(wav, u.speed, self.sample_rate)
        clean = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
        item = {"wav": clean, **self.labels(u)}
        # drawn from torch's stream (seeded per DataLoader worker), so an exact resume redraws the same
        if self.augment is not None and float(torch.rand(())) < self.augment_prob:
            item["wav"] = torch.from_numpy(np.ascontiguousarray(self.augment(wav), dtype=np.float32))
        if self.keep_clean:
            item["clean"] = clean
        return item


def speed_copies(utterances: Sequence[Utterance], factors: Sequence[float]) -> list[Utterance]:
    """The utterances, then one copy of each at every speed factor (id prefixed
    ``sp{factor}-``, duration divided by the factor); :class:`AudioDataset` changes the
    audio's speed when it reads a copy."""
    out = list(utterances)
    for f in factors:
        out += [dataclasses.replace(u, id=f"sp{f:g}-{u.id}", duration=u.duration / f, speed=float(f)) for u in utterances]
    ids: set[str] = set()
    for u in out:
        if u.id in ids:
            raise ValueError(f"speed perturbation: two training items would share the id {u.id!r}; rename the "
                             "manifest's ids that start with 'sp<factor>-'")
        ids.add(u.id)
    return out


def pad_targets(items: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded ``(targets (B, L), target_lengths (B,))`` from items' ``ids``."""
    tlens = torch.tensor([it["ids"].numel() for it in items], dtype=torch.long)
    targets = torch.zeros(len(items), int(tlens.max()) if len(items) else 0, dtype=torch.long)
    for k, it in enumerate(items):
        targets[k, : tlens[k]] = it["ids"]
    return targets, tlens


def pad_waveforms(waves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad 1-D waveforms into ``(values (B, S), lengths (B,))``."""
    lengths = torch.tensor([w.numel() for w in waves], dtype=torch.long)
    values = torch.zeros(len(waves), int(lengths.max()) if len(waves) else 0)
    for k, w in enumerate(waves):
        values[k, : w.numel()] = w
    return values, lengths


def collate(items: Sequence[dict]) -> Batch:
    """Zero-pad waveforms and targets; lengths ride alongside."""
    waveforms, lengths = pad_waveforms([it["wav"] for it in items])
    targets, tlens = pad_targets(items)
    clean = pad_waveforms([it["clean"] for it in items])[0] if items and "clean" in items[0] else None
    return Batch(waveforms, lengths, targets, tlens, [it["id"] for it in items], [it["text"] for it in items],
                 [it["duration"] for it in items], clean)


class DynamicBucketSampler(Sampler[list[int]]):
    """Yields lists of indices whose padded duration stays under ``max_batch_seconds``.

    Clips are sorted by duration (ties broken by a seeded shuffle), cut greedily into
    batches, and the batch order is shuffled per epoch. With ``world_size > 1`` the
    batch list is padded by repetition to a multiple of ``world_size`` and dealt out
    round-robin, so every rank runs the same number of steps.

    Deterministic given ``seed`` and the epoch set by :meth:`set_epoch`.
    """

    def __init__(
        self,
        durations: Sequence[float],
        max_batch_seconds: float,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_batch_size: int | None = None,
        drop_last: bool = False,
    ):
        if max_batch_seconds <= 0:
            raise ValueError("max_batch_seconds must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.durations = [float(d) for d in durations]
        self.max_batch_seconds = float(max_batch_seconds)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_batch_size = max_batch_size
        self.drop_last = drop_last
        self.epoch = 0
        self.skip = 0  # batches of the current epoch the next pass leaves out (for resume)
        self.consumed = 0  # batches of the current epoch taken by the training loop (:meth:`advance`)
        too_long = sum(d > max_batch_seconds for d in self.durations)
        if too_long:
            logger.warning("%d clip(s) exceed max_batch_seconds=%.1f and form batches of one", too_long, max_batch_seconds)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        """Where training stands in the batch order: the epoch, and the batches of it consumed.
        A DataLoader draws batches ahead of the loop, so the loop reports what it takes (:meth:`advance`)."""
        return {"epoch": self.epoch, "batch_in_epoch": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`: the next pass starts after the batches consumed."""
        self.epoch, self.consumed = int(state.get("epoch", 0)), int(state.get("batch_in_epoch", 0))
        self.skip = self.consumed

    def advance(self) -> None:
        """The training loop took one more batch of this epoch."""
        self.consumed += 1

    def next_epoch(self) -> None:
        """The epoch's batches are all consumed: go on to the next epoch's order."""
        self.epoch += 1
        self.consumed = self.skip = 0

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.durations)))
        if self.shuffle:
            rng.shuffle(order)
        order.sort(key=lambda i: self.durations[i])  # stable: shuffled ties
        batches = cut_batches(order, self.durations, self.max_batch_seconds, self.max_batch_size)
        if self.shuffle:
            rng.shuffle(batches)
        if self.world_size > 1 and batches:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % self.world_size]
            else:
                pad = (-len(batches)) % self.world_size  # cyclic: fewer batches than ranks still fill every rank
                batches = batches + [batches[i % len(batches)] for i in range(pad)]
        return batches

    def batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch, in order."""
        return self._all_batches()[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.batches()
        skip, self.skip = self.skip, 0
        yield from mine[skip:]

    def __len__(self) -> int:
        return len(self.batches())

    def padding_overhead(self) -> float:
        """Fraction of padded batch seconds that is padding, over one epoch (all ranks)."""
        padded = real = 0.0
        for b in self._all_batches():
            ds = [self.durations[i] for i in b]
            padded += max(ds) * len(ds)
            real += sum(ds)
        return 0.0 if padded == 0 else 1.0 - real / padded


def random_batches(durations: Sequence[float], max_batch_seconds: float, seed: int = 0) -> list[list[int]]:
    """Batches of shuffled clips capped by padded seconds (the unsorted baseline)."""
    order = list(range(len(durations)))
    random.Random(seed).shuffle(order)
    return cut_batches(order, durations, max_batch_seconds)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: Ctrl-C, ``kill`` and a closed terminal reach
    the whole process group (SLURM and systemd signal every process too), and a worker they
    killed would end training before it saves. The main process alone handles them and then
    shuts its workers down (a worker also exits when its parent is gone)."""
    import signal

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def sorted_loader(dataset, max_batch_seconds: float, collate_fn, num_workers: int = 0, device=None) -> DataLoader:
    """Duration-sorted, unshuffled batches for inference and feature extraction."""
    sampler = DynamicBucketSampler(dataset.durations, max_batch_seconds, shuffle=False)
    pin = device is not None and torch.device(device).type == "cuda"
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=cap_workers(num_workers), pin_memory=pin)


def padding_overhead(batches: Sequence[Sequence[int]], durations: Sequence[float]) -> float:
    padded = sum(max(durations[i] for i in b) * len(b) for b in batches)
    real = sum(durations[i] for b in batches for i in b)
    return 0.0 if padded == 0 else 1.0 - real / padded



def encoder_batch_seconds(device: torch.device | str) -> float:
    """The one default cap on padded seconds per batch for running a model without gradients
    (feature extraction, evaluation, transcription):
    small on a CPU, where big batches leave the caches and run slower than small ones,
    large on a GPU, which needs big batches to stay busy."""
    return 300.0 if torch.device(device).type == "cuda" else 10.0


# A job smaller than either SMALL_JOB_CLIPS or SMALL_JOB_SECONDS decodes its audio in its own
# process: starting worker processes (a fork each, about 0.15 s on a 2-core machine even before
# the model is loaded) and shutting them down costs more than they can save there.


def is_small_job(durations: Sequence[float]) -> bool:
    """Fewer than :data:`SMALL_JOB_CLIPS` clips, or under :data:`SMALL_JOB_SECONDS` of audio."""
    return len(durations) < SMALL_JOB_CLIPS or sum(durations) < SMALL_JOB_SECONDS


def decode_workers(device: torch.device | str, durations: Sequence[float] | None = None) -> int:
    """Default DataLoader workers for decoding audio next to an encoder: none for a small
    job (:func:`is_small_job`, when the clips' ``durations`` are given); none on a CPU with
    at most 4 cores, where worker processes only take cores from the model; else 2 on a
    CPU and up to 8 on a GPU; never more than the CPUs this process may use
    (:func:`~speechtl.core.cpus.cpu_budget`: affinity, cgroup quota, ``--threads``)."""
    if durations is not None and is_small_job(durations):
        return 0
    cores = cpu_threads()
    if torch.device(device).type == "cuda":
        return min(8, max(cores - 1, 0))
    return 0 if cores <= 4 else 2
