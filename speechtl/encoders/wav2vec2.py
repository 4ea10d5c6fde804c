"""The wav2vec2 family (wav2vec2, XLS-R, MMS, HuBERT, WavLM, data2vec-audio,
wav2vec2-conformer): any ``transformers`` audio encoder with a convolutional feature
encoder that returns hidden states, run on padded batches. Loading goes through
:func:`speechtl.encoders.registry.load_encoder`.

:class:`SpeechEncoder` takes ``(waveforms, lengths)`` and returns every layer's
output plus the frame lengths. Encoders whose first convolution uses group norm
(wav2vec2-base style) normalise over the whole time axis, so zero padding would
change the features of the shorter clips in a batch; for those the convolutional
feature encoder runs clip by clip (the transformer still runs batched, with an
attention mask), which makes a batch give the same features as single clips.
"""

from __future__ import annotations

import logging
import os
from contextvars import ContextVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_cnn
from .base import EncoderOutput

logger = logging.getLogger(__name__)

PADDING_SENSITIVE = ("data2vec-audio", "wav2vec2-conformer")
# the clip lengths of the batch a group-norm feature encoder is running on (see _patch_feature_encoder)
_CLIP_LENGTHS: ContextVar[list[int] | None] = ContextVar("speechtl_clip_lengths", default=None)

class SpeechEncoder(nn.Module):
    """A transformers audio encoder with a ``(waveforms, lengths)`` interface.

    Args:
        model: a ``transformers`` base model (``Wav2Vec2Model``, ``HubertModel``, ...).
        normalize_waveform: zero-mean/unit-variance per clip over its valid samples,
            as ``Wav2Vec2FeatureExtractor(do_normalize=True)`` does.
        source: where the model came from (recorded in model directories).
    """

    def __init__(self, model: nn.Module, normalize_waveform: bool = True, source: str = ""):
        super().__init__()
        self.model = model
        self.normalize_waveform = normalize_waveform
        self.source = source
        cfg = model.config
        self.kernels = list(cfg.conv_kernel)
        self.strides = list(cfg.conv_stride)
        self.per_clip_cnn = getattr(cfg, "feat_extract_norm", "layer") == "group"
        # their convolutions after the feature encoder (data2vec's stacked positional
        # convs, the conformer conv module) read padded frames, so they run unpadded
        self.per_clip_model = getattr(cfg, "model_type", "") in PADDING_SENSITIVE
        # on CPU, the CNN as strided matrix products in (time, channel) layout when no gradient
        # flows through it; see speechtl.encoders.fast_cnn. ``fast_cnn = False`` restores transformers' own.
        self.fast_cnn = fast_cnn.time_major_supported(model.feature_extractor)
        self._patch_feature_encoder()

    # -- geometry ---------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        """Number of hidden states returned: transformer layers + 1 (its input)."""
        return self.model.config.num_hidden_layers + 1

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def feature_encoder(self) -> nn.Module:
        """The convolutional feature encoder (frozen while fine-tuning by default)."""
        return self.model.feature_extractor

    @property
    def max_seconds(self) -> float:
        """Longest clip the encoder takes in one piece (no limit for wav2vec2-style models)."""
        return float("inf")

    @property
    def receptive_field(self) -> int:
        """Samples needed for one output frame."""
        r = 1
        for k, s in reversed(list(zip(self.kernels, self.strides))):
            r = (r - 1) * s + k
        return r

    @property
    def frame_rate(self) -> float:
        """Output frames per second at 16 kHz."""
        hop = 1
        for s in self.strides:
            hop *= s
        return 16_000 / hop

    def frame_lengths(self, lengths: torch.Tensor | int) -> torch.Tensor | int:
        """Frames produced for ``lengths`` samples (the conv stack's output length)."""
        if isinstance(lengths, int):
            n = lengths
            for k, s in zip(self.kernels, self.strides):
                n = max((n - k) // s + 1, 0)
            return n
        n = lengths
        for k, s in zip(self.kernels, self.strides):
            n = torch.div(n - k, s, rounding_mode="floor").add(1).clamp(min=0)
        return n

    # -- forward ----------------------------------------------------------------
    def _patch_feature_encoder(self) -> None:
        # an object, not a closure: copies of the encoder (copy.deepcopy, pickle) get their own
        # bound to their own module, so a copy never runs the original's weights
        self.model.feature_extractor.forward = _FeatureEncoderForward(self)

    def _prepare(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.receptive_field
        lengths = lengths.clamp(min=r)  # a clip shorter than one frame is zero-padded to one
        if waveforms.shape[1] < r:
            waveforms = F.pad(waveforms, (0, r - waveforms.shape[1]))
        mask = torch.arange(waveforms.shape[1], device=waveforms.device)[None, :] < lengths[:, None]
        x = waveforms * mask
        if self.normalize_waveform:
            n = lengths[:, None].to(x.dtype)
            mean = x.sum(1, keepdim=True) / n
            var = ((x - mean) * mask).pow(2).sum(1, keepdim=True) / n
            x = (x - mean) / torch.sqrt(var + 1e-7) * mask
        return x, lengths

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor, all_layers: bool = True) -> EncoderOutput:
        """Args: waveforms (B, S) float at 16 kHz, zero-padded; lengths (B,) samples.

        Returns every hidden state (``all_layers``) or only the last one.
        """
        if self.per_clip_model and waveforms.shape[0] > 1 and bool((lengths != lengths.max()).any()):
            return self._forward_per_clip(waveforms, lengths, all_layers)
        x, lengths = self._prepare(waveforms, lengths)
        # without padding the mask changes nothing, and leaving it out takes transformers' faster path
        padded = bool((lengths < x.shape[1]).any())
        mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).long() if padded else None
        # per call, per thread: batches may run on several threads at once (features.encode_batches)
        token = _CLIP_LENGTHS.set(lengths.tolist() if self.per_clip_cnn else None)
        try:
            out = self.model(x, attention_mask=mask, output_hidden_states=all_layers, return_dict=True)
        finally:
            _CLIP_LENGTHS.reset(token)
        hs = tuple(out.hidden_states) if all_layers else (out.last_hidden_state,)
        frames = self.frame_lengths(lengths).clamp(max=hs[-1].shape[1])
        return EncoderOutput(hs, frames)


    def _forward_per_clip(self, waveforms: torch.Tensor, lengths: torch.Tensor, all_layers: bool) -> EncoderOutput:
        outs = [self.forward(waveforms[i : i + 1, : int(n)], lengths[i : i + 1], all_layers) for i, n in enumerate(lengths)]
        frames = torch.cat([o.lengths for o in outs])
        total = int(max(o.hidden_states[0].shape[1] for o in outs))
        hs = tuple(
            torch.cat([F.pad(o.hidden_states[k], (0, 0, 0, total - o.hidden_states[k].shape[1])) for o in outs])
            for k in range(len(outs[0].hidden_states))
        )
        return EncoderOutput(hs, frames)


class _FeatureEncoderForward:
    """The CNN feature encoder's ``forward`` as speechtl runs it:

    - group-norm CNNs run clip by clip over a padded batch (see the module docstring), the
      clip lengths coming from the call in progress (``_CLIP_LENGTHS``, per thread);
    - on a CPU, when no gradient flows through it, the CNN runs time-major
      (:func:`speechtl.encoders.fast_cnn.time_major_cnn`), unless ``SpeechEncoder.fast_cnn`` is False;
    - otherwise transformers' own ``forward``.

    It holds the encoder, not the module's bound method, so that ``copy.deepcopy`` and
    pickling rebind it to the copy's own module."""

    def __init__(self, encoder: "SpeechEncoder"):
        self.encoder = encoder

    def __call__(self, input_values: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        lens = _CLIP_LENGTHS.get() if enc.per_clip_cnn else None
        if lens is None or input_values.shape[0] == 1:
            return self._run(input_values)
        total = enc.frame_lengths(int(input_values.shape[1]))
        outs = []
        for i, n in enumerate(lens):
            o = self._run(input_values[i : i + 1, :n])
            outs.append(F.pad(o, (0, total - o.shape[-1])))
        return torch.cat(outs, dim=0)

    def _run(self, input_values: torch.Tensor) -> torch.Tensor:
        fe = self.encoder.model.feature_extractor
        # on CPUs only: GPUs run transformers' own convolutions well (cuDNN)
        if (self.encoder.fast_cnn and input_values.device.type == "cpu"
                and not (torch.is_grad_enabled() and any(p.requires_grad for p in fe.parameters()))):
            return fast_cnn.time_major_cnn(fe.conv_layers, input_values)
        return type(fe).forward(fe, input_values)


def _read_do_normalize(source: str) -> bool:
    """``do_normalize`` from the encoder's preprocessor config; True when absent."""
    path = Path(source) / "preprocessor_config.json"
    if path.is_file():
        import json

        return bool(json.loads(path.read_text()).get("do_normalize", True))
    if not os.path.isdir(source):
        try:
            from transformers import AutoFeatureExtractor

            return bool(getattr(AutoFeatureExtractor.from_pretrained(source), "do_normalize", True))
        except Exception:  # no preprocessor config published: wav2vec2 default
            return True
    return True


def parameter_groups(encoder: SpeechEncoder) -> dict[str, list[nn.Parameter]]:
    """Split encoder parameters into the convolutional feature encoder and the rest."""
    cnn = {id(p) for p in encoder.feature_encoder.parameters()}
    groups: dict[str, list[nn.Parameter]] = {"feature_encoder": [], "transformer": []}
    for p in encoder.model.parameters():
        groups["feature_encoder" if id(p) in cnn else "transformer"].append(p)
    return groups


