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

from ..encoders.base import mask_spans  # noqa: F401  (re-exported)


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

    Padding never reaches the LSTM state, so batched and single-clip outputs are equal.
    On a GPU the sequences are packed by ``lengths`` (cuDNN runs packed sequences well).
    On a CPU, where PyTorch steps a packed sequence one time step at a time (about ten
    times slower than a padded batch, forward and backward), each direction of each layer
    runs as one padded batch instead: the forward direction reads the clips as they are
    (trailing padding cannot reach earlier frames), and the backward direction reads
    each clip reversed within its own length, so it too starts on the clip's last valid
    frame. Frames past a clip's length come out as zeros, as from a packed run.

    Each time step of the recurrence is a small matrix product split across torch's
    intra-op threads: on an idle 2-core machine 2 threads run a 2 x 384 BiLSTM over
    4 x 500 frames twice as fast as one, but beside one other busy process 2 threads take
    twice as long as one, and on a loaded machine steps stall for seconds
    (``benchmarks/bench_lstm_threads.py``). Transcription therefore runs batches side by
    side on one thread each (``Transcriber``'s ``streams``), and training runs each update
    on all threads or on one, whichever measures faster at the time
    (:class:`speechtl.core.threads.ThreadTuner`).
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
        lengths = lengths.clamp(min=1)
        if x.device.type == "cpu":
            y = self._lstm_padded(x, lengths.to(x.device))
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            y, _ = self.lstm(packed)
            y, _ = pad_packed_sequence(y, batch_first=True, total_length=total)
        return self.proj(self.dropout(y))

    def _lstm_padded(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``self.lstm`` over a padded batch, direction by direction (see the class docstring)."""
        lstm = self.lstm
        b, t, _ = x.shape
        steps = torch.arange(t, device=x.device)[None, :]
        valid = steps < lengths[:, None]
        # reversing each clip within its length; padding frames stay where they are
        flip = torch.where(valid, lengths[:, None] - 1 - steps, steps)[..., None]

        def reverse(z: torch.Tensor) -> torch.Tensor:  # its own inverse
            return z.gather(1, flip.expand_as(z))

        zeros = x.new_zeros(1, b, lstm.hidden_size)
        for layer in range(lstm.num_layers):
            outs = []
            for suffix, order in (("", lambda z: z), ("_reverse", reverse)):
                params = [getattr(lstm, f"{name}_l{layer}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                          if lstm.bias or name.startswith("weight")]
                out = torch.lstm(order(x), (zeros, zeros), params, lstm.bias, 1, 0.0, self.training, False, True)[0]
                outs.append(order(out))
            x = torch.cat(outs, dim=-1) * valid[..., None]
            if layer < lstm.num_layers - 1 and lstm.dropout > 0:
                x = F.dropout(x, lstm.dropout, self.training)
        return x


def build_head(kind: str, input_size: int, vocab_size: int, dropout: float = 0.1, hidden_size: int = 256, num_layers: int = 2) -> nn.Module:
    if kind == "linear":
        return LinearHead(input_size, vocab_size, dropout)
    if kind == "bilstm":
        return BiLSTMHead(input_size, vocab_size, hidden_size, num_layers, dropout)
    raise ValueError(f"unknown head {kind!r}; choose linear or bilstm")
