"""CTC heads and the learnable weighted sum of encoder layers.

Shapes: hidden states are ``(B, T, D)`` frames; ``lengths`` are ``(B,)`` valid
frames; heads return logits ``(B, T, V)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class WeightedLayerSum(nn.Module):
    """softmax(w)-weighted sum of L layer outputs (SUPERB style).

    Each layer is layer-normalised (no learnable affine) before summing so that
    layers with large activations don't dominate the sum by scale alone.
    """

    def __init__(self, num_layers: int, layer_norm: bool = True):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))
        self.layer_norm = layer_norm

    def forward(self, hidden_states: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """hidden_states: L tensors (B, T, D), or one stacked (L, B, T, D) tensor."""
        stacked = hidden_states if torch.is_tensor(hidden_states) else torch.stack(list(hidden_states))
        if stacked.shape[0] != self.weights.numel():
            raise ValueError(f"expected {self.weights.numel()} layers, got {stacked.shape[0]}")
        stacked = stacked.float()
        if self.layer_norm:
            stacked = F.layer_norm(stacked, stacked.shape[-1:])
        w = torch.softmax(self.weights, dim=0)
        return torch.einsum("l,lbtd->btd", w, stacked)


class LinearHead(nn.Module):
    """Dropout then a linear projection to the vocabulary (as in ``Wav2Vec2ForCTC``)."""

    def __init__(self, input_size: int, vocab_size: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(input_size, vocab_size)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.dropout(x))


class BiLSTMHead(nn.Module):
    """A small bidirectional LSTM over frames, then a linear projection.

    Sequences are packed by ``lengths`` so padding never reaches the LSTM state,
    which keeps batched and single-clip outputs equal.
    """

    def __init__(self, input_size: int, vocab_size: int, hidden_size: int = 256, num_layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            input_size, hidden_size, num_layers=num_layers, bidirectional=True, batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.proj = nn.Linear(2 * hidden_size, vocab_size)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dropout(x)
        total = x.shape[1]
        if lengths is None:
            lengths = torch.full((x.shape[0],), total, dtype=torch.long)
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        y, _ = self.lstm(packed)
        y, _ = pad_packed_sequence(y, batch_first=True, total_length=total)
        return self.proj(self.dropout(y))


def mask_spans(x: torch.Tensor, lengths: torch.Tensor | None, time_prob: float, time_length: int,
               feature_prob: float = 0.0, feature_length: int = 10) -> torch.Tensor:
    """SpecAugment-style masking of frame features ``(B, T, D)``, drawn from torch's RNG.

    As with transformers' ``mask_time_prob``, about ``time_prob`` of each clip's valid frames
    are zeroed, in spans of ``time_length`` frames; ``feature_prob`` does the same over
    channels (one channel mask per clip, shared by its frames).
    """
    if time_prob <= 0 and feature_prob <= 0:
        return x
    b, t, d = x.shape
    keep = torch.ones(b, t, 1, device=x.device, dtype=x.dtype)
    if time_prob > 0:
        valid = torch.full((b,), t, dtype=torch.long) if lengths is None else lengths.cpu()
        for i in range(b):
            n = int(valid[i])
            spans = int(time_prob * n / time_length + torch.rand(()))  # stochastic rounding
            if n <= time_length or spans == 0:
                continue
            starts = torch.randint(0, n - time_length + 1, (spans,))
            for s0 in starts.tolist():
                keep[i, s0:s0 + time_length] = 0
    x = x * keep
    if feature_prob > 0:
        chan = torch.ones(b, 1, d, device=x.device, dtype=x.dtype)
        spans = max(int(feature_prob * d / feature_length), 1)
        for i in range(b):
            for s0 in torch.randint(0, max(d - feature_length, 0) + 1, (spans,)).tolist():
                chan[i, 0, s0:s0 + feature_length] = 0
        x = x * chan
    return x


def build_head(kind: str, input_size: int, vocab_size: int, dropout: float = 0.1, hidden_size: int = 256, num_layers: int = 2) -> nn.Module:
    if kind == "linear":
        return LinearHead(input_size, vocab_size, dropout)
    if kind == "bilstm":
        return BiLSTMHead(input_size, vocab_size, hidden_size, num_layers, dropout)
    raise ValueError(f"unknown head {kind!r}; choose linear or bilstm")
