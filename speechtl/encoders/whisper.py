"""Whisper's encoder as a speech encoder: log-mel front end in torch, each clip at its own length.

OpenAI's Whisper pads every input to 30 s. Here each clip keeps its own length: the
log-mel frames are computed for the clip, the positional embeddings are cut to the
clip's frames (as ESPnet's Whisper encoder does), and a padded batch is masked so that
it gives the same features as its clips one at a time (to float rounding; a test):

- the STFT of each clip is taken over that clip reflect-padded at its own ends (as
  ``torch.stft(center=True)`` does for a single clip), never over its neighbour's zeros;
- the log-mel floor (``max - 8``) is taken over each clip's own frames;
- mel frames and first-convolution outputs past a clip's end are zeroed, so the
  ``padding=1`` convolutions see the zeros a single clip would;
- self-attention ignores padded frames (a key mask).

Geometry: 16 kHz samples -> ``samples // 160`` mel frames (10 ms) -> ``(mel - 1) // 2 + 1``
encoder frames (20 ms, like wav2vec2). At most ``max_source_positions`` frames (30 s).

Hidden states: the input to the first layer (convolutions + positions), then each
layer's output, the last one after the final LayerNorm, as transformers' Whisper encoder
returns them with ``output_hidden_states``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import EncoderOutput, mask_spans
from .ct2 import is_ct2_dir, load_ct2_whisper
from .lora import base_state_dict
from .native import read_whisper_encoder

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160

# training-time keys speechtl uses (wav2vec2 names) -> WhisperConfig names
CONFIG_NAMES = {"hidden_dropout": "dropout", "attention_dropout": "attention_dropout",
                "activation_dropout": "activation_dropout", "layerdrop": "encoder_layerdrop"}


class LogMel(nn.Module):
    """Whisper's log-mel spectrogram (``WhisperFeatureExtractor``'s numbers) on a padded batch."""

    def __init__(self, n_mels: int = 80):
        super().__init__()
        from torchaudio.functional import melscale_fbanks

        # WhisperFeatureExtractor's filters (Slaney mel scale and norm, 0-8 kHz: those OpenAI's
        # Whisper ships, made by librosa), from torchaudio, whose import is light (a test
        # compares the log-mel output with WhisperFeatureExtractor's)
        mel = melscale_fbanks(1 + N_FFT // 2, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE, norm="slaney",
                              mel_scale="slaney").T.contiguous().float()
        self.register_buffer("filters", mel, persistent=False)  # (n_mels, 201)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.n_mels = n_mels

    @staticmethod
    def frames(samples: torch.Tensor | int) -> torch.Tensor | int:
        """Mel frames of a clip of ``samples`` samples (one per 10 ms)."""
        if isinstance(samples, int):
            return samples // HOP
        return torch.div(samples, HOP, rounding_mode="floor")

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms (B, S) float, zero-padded; lengths (B,) samples (each >= HOP).
        Returns mel (B, n_mels, T) with zeros past each clip's frames, and frames (B,)."""
        half = N_FFT // 2
        lens = lengths.tolist()
        total = max(lens) + 2 * half
        x = waveforms.new_zeros(waveforms.shape[0], total)
        for i, n in enumerate(lens):
            clip = waveforms[i, :n][None, None]
            mode = "reflect" if n > half else "replicate"  # reflect needs more samples than the pad
            x[i, : n + 2 * half] = F.pad(clip.float(), (half, half), mode=mode)[0, 0]
        spec = torch.stft(x, N_FFT, HOP, window=self.window, center=False, return_complex=True)
        power = spec.abs().pow(2)  # (B, 201, frames)
        frames = self.frames(lengths.to(x.device))
        t = int(frames.max())
        power = power[..., :t]
        mel = torch.clamp(self.filters @ power, min=1e-10).log10()
        valid = torch.arange(t, device=x.device)[None, :] < frames[:, None]  # (B, T)
        peak = mel.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)
        mel = torch.maximum(mel, peak - 8.0)
        mel = (mel + 4.0) / 4.0
        return mel * valid[:, None, :], frames


class WhisperSpeechEncoder(nn.Module):
    """Whisper's encoder with speechtl's ``(waveforms, lengths)`` interface.

    Args:
        model: a ``transformers`` ``WhisperEncoder``.
        source: where the model came from (recorded in model directories).
    """

    normalize_waveform = False  # the log-mel front end scales the signal itself
    per_clip_cnn = False
    fast_cnn = False

    def __init__(self, model: nn.Module, source: str = ""):
        super().__init__()
        self.model = model
        self.source = source
        self.front_end = LogMel(model.config.num_mel_bins)
        # SpecAugment on the log-mel input while fine-tuning (WhisperModel masks its input features)
        self.masking: tuple[float, int, float, int] = (0.0, 10, 0.0, 10)

    # -- geometry ---------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.model.config.encoder_layers + 1

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    @property
    def receptive_field(self) -> int:
        """Samples for one output frame."""
        return HOP

    @property
    def frame_rate(self) -> float:
        return SAMPLE_RATE / (2 * HOP)

    @property
    def max_seconds(self) -> float:
        """Longest clip the positional embeddings cover (30 s for OpenAI's models)."""
        return self.model.config.max_source_positions * 2 * HOP / SAMPLE_RATE

    @property
    def feature_encoder(self) -> nn.ModuleList:
        """The convolutional front end (frozen while fine-tuning by default)."""
        return nn.ModuleList([self.model.conv1, self.model.conv2])

    @property
    def fixed_parameters(self) -> list[nn.Parameter]:
        """Parameters never trained in any mode: the positional embeddings (fixed sinusoids
        in OpenAI's Whisper; transformers freezes them too)."""
        return [self.model.embed_positions.weight]

    def frame_lengths(self, lengths: torch.Tensor | int) -> torch.Tensor | int:
        mel = LogMel.frames(lengths)
        if isinstance(mel, int):
            return (mel - 1) // 2 + 1 if mel > 0 else 0
        return torch.where(mel > 0, torch.div(mel - 1, 2, rounding_mode="floor") + 1, torch.zeros_like(mel))

    # -- forward ----------------------------------------------------------------
    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor, all_layers: bool = True):
        """Args: waveforms (B, S) float at 16 kHz, zero-padded; lengths (B,) samples.
        Returns an :class:`~speechtl.encoders.base.EncoderOutput`."""
        enc = self.model
        lengths = lengths.clamp(min=HOP)
        if waveforms.shape[1] < HOP:
            waveforms = F.pad(waveforms, (0, HOP - waveforms.shape[1]))
        # up to HOP - 1 samples past the span still make the same number of mel frames
        limit = int(self.max_seconds * SAMPLE_RATE) + HOP - 1
        if int(lengths.max()) > limit:
            raise ValueError(f"a clip of {int(lengths.max()) / SAMPLE_RATE:.2f} s is longer than this Whisper encoder's "
                             f"{self.max_seconds:g} s; cut it into windows (transcription does this itself)")
        with torch.autocast(waveforms.device.type, enabled=False):
            mel, mel_frames = self.front_end(waveforms, lengths)
        if self.training and any(self.masking[i] > 0 for i in (0, 2)):
            mel = mask_spans(mel.transpose(1, 2), mel_frames, *self.masking).transpose(1, 2)
        dtype = enc.conv1.weight.dtype
        mel = mel.to(dtype)
        t_mel = mel.shape[-1]
        mel_valid = (torch.arange(t_mel, device=mel.device)[None, :] < mel_frames[:, None])[:, None, :]
        h = F.gelu(enc.conv1(mel)) * mel_valid  # zeros past the end, as a lone clip's padding
        h = F.gelu(enc.conv2(h)).transpose(1, 2)  # (B, T, D)
        frames = self.frame_lengths(lengths).to(h.device)
        t = h.shape[1]
        h = h + enc.embed_positions.weight[:t].to(h.dtype)
        h = F.dropout(h, p=enc.config.dropout, training=self.training)
        padded = bool((frames < t).any())
        mask = None
        if padded:
            keep = torch.arange(t, device=h.device)[None, :] < frames[:, None]
            mask = torch.zeros(h.shape[0], 1, 1, t, dtype=h.dtype, device=h.device)
            mask = mask.masked_fill(~keep[:, None, None, :], torch.finfo(h.dtype).min).expand(-1, 1, t, t)
        states = [h]
        layerdrop = enc.config.encoder_layerdrop if self.training else 0.0
        for layer in enc.layers:
            if layerdrop > 0 and float(torch.rand(())) < layerdrop:
                states.append(h)
                continue
            h = layer(h, mask)
            states.append(h)
        states[-1] = enc.layer_norm(h)
        hs = tuple(states) if all_layers else (states[-1],)
        return EncoderOutput(hs, frames)


# ----------------------------------------------------------------------------- loading


def is_whisper_source(source: str) -> bool:
    """A transformers Whisper directory, a faster-whisper directory, or a Whisper hub id."""
    p = Path(source)
    if p.is_dir():
        if is_ct2_dir(p):
            return True
        cfg = p / "config.json"
        if cfg.is_file():
            try:
                return json.loads(cfg.read_text()).get("model_type") == "whisper"
            except ValueError:
                return False
        return False
    return "whisper" in source.lower()


def _read_encoder_weights(path: Path) -> dict[str, torch.Tensor]:
    """The encoder's weights from a transformers Whisper directory (single or sharded
    safetensors), whatever prefix the checkpoint used (``model.encoder.``, ``encoder.``)."""
    out = read_whisper_encoder(path)
    if out is None:
        raise FileNotFoundError(f"{path}: no model.safetensors (speechtl loads weights from safetensors only)")
    if not out:
        raise ValueError(f"{path}: no Whisper encoder weights found (keys starting model.encoder. or encoder.)")
    return out


def load_whisper_encoder(source: str, name: str, random_init: bool = False, seed: int = 0,
                         config_overrides: dict | None = None) -> WhisperSpeechEncoder:
    """Load Whisper's encoder from a transformers directory, a faster-whisper (CTranslate2)
    directory, or a hub id; ``config_overrides`` take speechtl's training keys."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    p = Path(source)
    state = None
    if p.is_dir() and is_ct2_dir(p):
        config, sd = load_ct2_whisper(p, decoder=False)
        state = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    elif p.is_dir():
        config = WhisperConfig.from_pretrained(str(p))
        if not random_init:
            state = _read_encoder_weights(p)
    else:  # a hub id
        config = WhisperConfig.from_pretrained(source)
        if not random_init:
            from transformers import WhisperModel

            state = WhisperModel.from_pretrained(source, use_safetensors=True).encoder.state_dict()
    masking = {"mask_time_prob": 0.0, "mask_time_length": 10, "mask_feature_prob": 0.0, "mask_feature_length": 10}
    for k, v in (config_overrides or {}).items():
        if k in CONFIG_NAMES:
            setattr(config, CONFIG_NAMES[k], v)
        elif k in masking:
            masking[k] = v
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = WhisperEncoder(config)
    if state is not None and not random_init:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{source}: Whisper encoder weights do not fit its config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    enc = WhisperSpeechEncoder(model.eval(), source=name)
    enc.masking = (float(masking["mask_time_prob"]), int(masking["mask_time_length"]),
                   float(masking["mask_feature_prob"]), int(masking["mask_feature_length"]))
    return enc


def save_whisper_encoder(encoder: WhisperSpeechEncoder, out_dir: str | os.PathLike) -> None:
    """A transformers Whisper directory holding the encoder: ``config.json``,
    ``model.safetensors`` (``encoder.*`` keys, as in ``WhisperModel``) and the feature
    extractor's config. ``WhisperModel.from_pretrained`` loads it (decoder left random)."""
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder.config.save_pretrained(str(out))
    base = base_state_dict(encoder.model, getattr(encoder, "adapter_keys", ()))  # without adapters
    state = {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in base.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins).save_pretrained(str(out))


def tiny_whisper_config(**kw):
    """A tiny random-init Whisper config (tests)."""
    from transformers import WhisperConfig

    base = dict(vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=1,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                max_source_positions=1500, max_target_positions=32, pad_token_id=1, bos_token_id=1,
                eos_token_id=1, decoder_start_token_id=2)
    base.update(kw)
    return WhisperConfig(**base)
