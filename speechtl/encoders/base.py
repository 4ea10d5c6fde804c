"""What every encoder family gives the layers above it.

An encoder takes ``(waveforms, lengths)`` (float32 samples at 16 kHz, ``(B, S)``, and valid
samples per clip, ``(B,)``) and returns an :class:`EncoderOutput`: every layer's hidden
states and the valid frames per clip. :class:`Encoder` states the rest of the contract that
the model, feature extraction and the cache rely on; :class:`~speechtl.encoders.wav2vec2.SpeechEncoder`
(wav2vec2, HuBERT, WavLM, data2vec-audio) and
:class:`~speechtl.encoders.whisper.WhisperSpeechEncoder` implement it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

# config keys that only matter during training; callers may override them at load time
TRAINING_CONFIG_KEYS = (
    "mask_time_prob",
    "mask_time_length",
    "mask_feature_prob",
    "mask_feature_length",
    "layerdrop",
    "hidden_dropout",
    "attention_dropout",
    "activation_dropout",
    "feat_proj_dropout",
    "final_dropout",
)


@dataclass
class EncoderOutput:
    """hidden_states: layer outputs, each (B, T, D), index 0 = input to the transformer;
    lengths: (B,) valid frames per clip."""

    hidden_states: tuple[torch.Tensor, ...]
    lengths: torch.Tensor


@runtime_checkable
class Encoder(Protocol):
    """The interface every encoder family implements (an ``nn.Module`` besides).

    Attributes:
        model: the underlying network (a transformers or :mod:`speechtl.encoders.native` module).
        config: its configuration (``model_type``, sizes).
        source: where it was loaded from (recorded in model folders and cache keys).
        normalize_waveform: whether clips are normalised to zero mean and unit variance.
        num_layers: hidden states returned (transformer layers + 1).
        hidden_size: width of each hidden state.
        frame_rate: frames per second of audio.
        max_seconds: the longest clip it takes (``inf`` when unbounded).
        fast_cnn: whether its CNN may run through :mod:`speechtl.encoders.fast_cnn`.
    """

    model: nn.Module
    source: str
    normalize_waveform: bool
    fast_cnn: bool

    @property
    def config(self): ...

    @property
    def num_layers(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def frame_rate(self) -> float: ...

    @property
    def max_seconds(self) -> float: ...

    def frame_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames for clips of ``sample_lengths`` samples."""

    @property
    def feature_encoder(self) -> nn.Module:
        """The convolutional (or log-mel) front end, frozen in fine-tuning."""

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor, all_layers: bool = True) -> EncoderOutput:
        """Every layer's hidden states of a padded batch (the last one only without ``all_layers``)."""


def transformer_layers(encoder: Encoder) -> nn.ModuleList:
    """The encoder's transformer layers, bottom to top (wav2vec2 family and Whisper alike)."""
    inner = getattr(encoder.model, "encoder", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if layers is None:
        layers = getattr(encoder.model, "layers", None)
    if layers is None:
        raise ValueError(f"{encoder.config.model_type}: cannot find this encoder's transformer layers")
    return layers


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
