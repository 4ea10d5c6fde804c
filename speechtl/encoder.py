"""Loading pretrained speech encoders, and running them on padded batches.

Every call into ``transformers`` model classes goes through :func:`load_encoder`.
It accepts a local directory, a hub id (for users who have the hub), or
``"default"`` for the encoder bundled with speechtl. Any ``transformers`` audio
encoder that returns hidden states works: wav2vec2 (XLS-R, MMS), HuBERT, WavLM,
data2vec-audio, wav2vec2-conformer.

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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_cnn

logger = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).parent / "pretrained"
DEFAULT_ENCODER = "default"
PADDING_SENSITIVE = ("data2vec-audio", "wav2vec2-conformer")
# the clip lengths of the batch a group-norm feature encoder is running on (see _patch_feature_encoder)
_CLIP_LENGTHS: ContextVar[list[int] | None] = ContextVar("speechtl_clip_lengths", default=None)

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


# encoders that ``tools/fetch_encoder.sh NAME`` downloads and converts (into fetched_dir())
FETCHABLE = ("whisper-base", "whisper-tiny.en")


def fetched_dir(name: str | None = None) -> Path:
    """Where fetched encoders live: ``$SPEECHTL_CACHE/encoders`` (default ``~/.cache/speechtl``)."""
    root = Path(os.environ.get("SPEECHTL_CACHE") or Path.home() / ".cache" / "speechtl") / "encoders"
    return root / name if name else root


def resolve_encoder(name: str) -> str:
    """Map ``"default"`` (or a bundled name) to its folder, and a fetched encoder's name
    (``whisper-base``) to its converted folder; other names pass through."""
    if name in FETCHABLE and not Path(name).exists():
        path = fetched_dir(name)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"encoder {name!r} has not been fetched; run `bash tools/fetch_encoder.sh {name}` "
                                    f"(it downloads and converts the weights into {path})")
        return str(path)
    if name == DEFAULT_ENCODER or (BUNDLED_DIR / name / "config.json").is_file():
        path = BUNDLED_DIR / name
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"the bundled encoder {name!r} is not installed at {path}; pass encoder=<local dir or hub id>"
            )
        return str(path)
    return name


@dataclass
class EncoderOutput:
    """hidden_states: layer outputs, each (B, T, D), index 0 = input to the transformer;
    lengths: (B,) valid frames per clip."""

    hidden_states: tuple[torch.Tensor, ...]
    lengths: torch.Tensor


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
        # flows through it; see speechtl.fast_cnn. ``fast_cnn = False`` restores transformers' own.
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
      (:func:`speechtl.fast_cnn.time_major_cnn`), unless ``SpeechEncoder.fast_cnn`` is False;
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


def load_encoder(
    name_or_path: str,
    random_init: bool = False,
    seed: int = 0,
    config_overrides: dict | None = None,
    trust_remote_code: bool = False,
    inference: bool = False,
) -> SpeechEncoder:
    """Load an encoder by local directory, hub id, or ``"default"``.

    Args:
        random_init: build the same architecture with fresh random weights (the
            ``scratch`` baseline); only the config is read.
        config_overrides: training-time config keys (``mask_time_prob``,
            ``layerdrop``, ...), applied before the model is built.
        trust_remote_code: passed to transformers; off unless the user turns it on.
        inference: the encoder will only run in eval mode. A local wav2vec2, HuBERT or
            Whisper directory is then built from speechtl's own modules
            (:mod:`speechtl.native`), which spares the command the import of transformers'
            modelling code; ``SPEECHTL_NATIVE=0`` turns this off.
    """
    from .whisper import WhisperSpeechEncoder, is_whisper_source, load_whisper_encoder

    source = resolve_encoder(name_or_path)
    overrides = dict(config_overrides or {})
    unknown = set(overrides) - set(TRAINING_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"cannot override encoder config keys {sorted(unknown)}")
    if not os.path.exists(source) and (source.startswith(("/", ".", "~")) or source.count("/") > 1):
        # a hub id is owner/name; anything else that does not exist is a mistyped folder
        raise FileNotFoundError(f"encoder folder {source} does not exist")
    if inference and not random_init and not overrides and os.path.isdir(source) and native_enabled():
        from .native import load_native

        model = load_native(source)
        if model is not None:
            if model.config.model_type == "whisper":
                return WhisperSpeechEncoder(model, source=str(name_or_path)).eval()
            return SpeechEncoder(model, normalize_waveform=_read_do_normalize(source), source=str(name_or_path)).eval()
    from transformers import AutoConfig, AutoModel

    if is_whisper_source(source):
        return load_whisper_encoder(source, str(name_or_path), random_init, seed, overrides)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    if not hasattr(config, "conv_kernel"):
        raise ValueError(f"{source}: {type(config).__name__} is not a wav2vec2-style audio encoder (no conv feature encoder)")
    # the checkpoint holds a learned mask embedding only if its config masks; build the
    # model with the checkpoint's masking so its weights load cleanly, then apply ours
    # (masking is read from the config at forward time)
    saved_masking = {k: getattr(config, k, 0.0) for k in ("mask_time_prob", "mask_feature_prob")}
    for k, v in overrides.items():
        setattr(config, k, v)
    build_masking = saved_masking if any(saved_masking.values()) and not random_init else {}

    final_masking = {k: getattr(config, k, 0.0) for k in saved_masking}
    for k, v in build_masking.items():
        setattr(config, k, v)
    if random_init:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    else:
        model = AutoModel.from_pretrained(source, config=config, trust_remote_code=trust_remote_code)
    for k, v in final_masking.items():
        setattr(model.config, k, v)
    return SpeechEncoder(model, normalize_waveform=_read_do_normalize(source), source=str(name_or_path))


def native_enabled() -> bool:
    """Whether inference may use speechtl's own encoder modules (``SPEECHTL_NATIVE``, default on)."""
    return os.environ.get("SPEECHTL_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def encoder_from_config(config, normalize_waveform: bool = True, seed: int = 0) -> SpeechEncoder:
    """A random-weight encoder from a ``transformers`` config object (tests, pretraining)."""
    from transformers import AutoModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModel.from_config(config)
    return SpeechEncoder(model, normalize_waveform=normalize_waveform, source="config")


def save_encoder(encoder: SpeechEncoder, out_dir: str | os.PathLike) -> None:
    """Save as a standard HF model directory (config + safetensors + preprocessor config),
    without any adapters attached to it (:mod:`speechtl.adapters`)."""
    from transformers import Wav2Vec2FeatureExtractor

    from .whisper import WhisperSpeechEncoder, save_whisper_encoder

    if isinstance(encoder, WhisperSpeechEncoder):
        save_whisper_encoder(encoder, out_dir)
        return

    from .adapters import base_state_dict

    # a model built from this config has a mask embedding only if the config masks;
    # keep the saved weights consistent with the saved config. Adapters are not part of
    # the encoder: it is saved as it was before they were attached
    state = base_state_dict(encoder.model, getattr(encoder, "adapter_keys", ()))
    cfg = encoder.model.config
    if not (getattr(cfg, "mask_time_prob", 0) > 0 or getattr(cfg, "mask_feature_prob", 0) > 0):
        state.pop("masked_spec_embed", None)
    encoder.model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16_000,
        padding_value=0.0,
        do_normalize=encoder.normalize_waveform,
        return_attention_mask=not encoder.per_clip_cnn,
    ).save_pretrained(str(out_dir))


def transformer_layers(encoder: SpeechEncoder) -> nn.ModuleList:
    """The encoder's transformer layers, bottom to top (wav2vec2 family and Whisper alike)."""
    inner = getattr(encoder.model, "encoder", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if layers is None:
        layers = getattr(encoder.model, "layers", None)
    if layers is None:
        raise ValueError(f"{encoder.config.model_type}: cannot find this encoder's transformer layers")
    return layers


def parameter_groups(encoder: SpeechEncoder) -> dict[str, list[nn.Parameter]]:
    """Split encoder parameters into the convolutional feature encoder and the rest."""
    cnn = {id(p) for p in encoder.feature_encoder.parameters()}
    groups: dict[str, list[nn.Parameter]] = {"feature_encoder": [], "transformer": []}
    for p in encoder.model.parameters():
        groups["feature_encoder" if id(p) in cnn else "transformer"].append(p)
    return groups


def tiny_config(family: str = "wav2vec2", **kw):
    """A tiny random-init config of a supported family, for tests and smoke runs."""
    import transformers

    classes = {
        "wav2vec2": transformers.Wav2Vec2Config,
        "hubert": transformers.HubertConfig,
        "wavlm": transformers.WavLMConfig,
        "data2vec-audio": transformers.Data2VecAudioConfig,
        "wav2vec2-conformer": transformers.Wav2Vec2ConformerConfig,
    }
    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),  # the standard 20 ms frame stack
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        do_stable_layer_norm=False,
        mask_time_prob=0.0,
        vocab_size=8,
    )
    if family == "data2vec-audio":
        base["num_conv_pos_embeddings"] = 5  # data2vec uses a stack of small pos convs
    base.update(kw)
    return classes[family](**base)
