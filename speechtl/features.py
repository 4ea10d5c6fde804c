"""Encoder features computed once for frozen-mode training.

A frozen encoder in eval mode is a fixed function, so its layer outputs for a clip are
the same every epoch. :func:`extract_in_memory` runs it once over a set of utterances
(duration-sorted batches, ``inference_mode``) and keeps every layer's output per clip in
float16; :class:`FeatureDataset` then serves them to the head, which is all that trains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .encoder import SpeechEncoder
from .loader import AudioDataset, UtteranceDataset, collate, encoder_batch_seconds, pad_targets, sorted_loader
from .manifest import Utterance

logger = logging.getLogger(__name__)


def estimate_bytes(encoder: SpeechEncoder, utterances: Sequence[Utterance], bytes_per_value: int = 2) -> int:
    """Memory the float16 features of ``utterances`` take (all layers)."""
    frames = sum(int(encoder.frame_lengths(int(u.duration * 16_000))) for u in utterances)
    return frames * encoder.num_layers * encoder.hidden_size * bytes_per_value


@torch.inference_mode()
def extract_in_memory(
    encoder: SpeechEncoder,
    utterances: Sequence[Utterance],
    device: torch.device | str = "cpu",
    max_batch_seconds: float | None = None,
    num_workers: int = 0,
    progress: bool = False,
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
    for batch in loader:
        b = batch.to(device, non_blocking=True)
        with torch.random.fork_rng(devices=[]):  # transformers draws layerdrop numbers even in eval
            enc = encoder(b.waveforms, b.lengths, all_layers=True)
        stacked = torch.stack(enc.hidden_states)  # (L, B, T, D)
        for i, uid in enumerate(b.ids):
            out[uid] = stacked[:, i, : int(enc.lengths[i])].to("cpu", torch.float16).clone()
        bar.update(round(sum(b.durations)))
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
