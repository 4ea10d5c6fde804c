"""Encoders for inference without transformers' model code.

Importing transformers' modelling code costs a command seconds before any work
(``transformers.activations`` pulls in accelerate and torch.distributed,
``masking_utils`` torch._dynamo; see ``benchmarks/README.md``), more than transcribing a
short file takes. For inference, the encoder families whose forward pass is a few
standard layers are built here from torch modules alone:

- wav2vec2 (XLS-R, MMS bases without adapters) and HuBERT, both layer-norm variants;
- Whisper's encoder (speechtl's :class:`~speechtl.encoders.whisper.WhisperSpeechEncoder` runs its
  own forward and needs only the layers);
- with LoRA adapters, each language's updates folded into the weights
  (:func:`speechtl.models.adapters.fold_lora`), without peft.

The modules carry transformers' parameter names and module layout, so a checkpoint's
safetensors load as they are and everything speechtl does by name (the time-major CNN,
per-clip group norm, layer freezing) applies unchanged. They compute what transformers'
modules compute in eval mode, to float rounding (tests compare every hidden state).
They are inference-only: a forward pass in training mode is refused, because dropout,
layerdrop and SpecAugment are not here. Training, export, MMS adapter layers and every
other family load through transformers (:func:`speechtl.encoders.registry.load_encoder`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# transformers' ACT2FN names for the activations these modules take
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu, "gelu_new": _gelu_tanh,
               "gelu_pytorch_tanh": _gelu_tanh}


class NativeConfig(SimpleNamespace):
    """A model's ``config.json`` as attributes (what speechtl reads of a transformers config)."""

    def to_dict(self) -> dict:
        return dict(vars(self))

    def to_json_string(self, use_diff: bool = False) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)


# transformers' config class defaults (5.24) of the keys these modules and the fingerprint
# read: a config.json written before a key existed, or by hand, may leave it out, and
# transformers then uses these (a test compares them with the config classes)
_WAV2VEC2_COMMON = dict(conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
                        conv_bias=False, feat_extract_norm="group", feat_extract_activation="gelu", hidden_size=768,
                        num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                        layer_norm_eps=1e-5, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
                        do_stable_layer_norm=False, mask_time_prob=0.05, mask_feature_prob=0.0, adapter_attn_dim=None)
DEFAULTS = {
    "wav2vec2": {**_WAV2VEC2_COMMON, "add_adapter": False},
    "hubert": {**_WAV2VEC2_COMMON, "feat_proj_layer_norm": True, "conv_pos_batch_norm": False},
    "whisper": dict(num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                    max_source_positions=1500, activation_function="gelu", dropout=0.0, encoder_layerdrop=0.0),
}


def with_defaults(raw: dict) -> dict:
    """``raw`` (a config.json) with its family's defaults under it."""
    return {**DEFAULTS.get(raw.get("model_type"), {}), **raw}


def unsupported(cfg: dict) -> str | None:
    """Why a config (with its defaults, :func:`with_defaults`, or transformers' ``to_dict()``)
    describes a model these modules do not run; None when they do."""
    kind = cfg.get("model_type")
    if kind not in DEFAULTS:
        return f"model type {kind!r}"
    if cfg.get("tie_last_hidden_states") is not None:
        return "tie_last_hidden_states"
    if kind == "whisper":
        acts = [cfg.get("activation_function")]
    else:
        acts = [cfg.get("hidden_act"), cfg.get("feat_extract_activation")]
        if cfg.get("add_adapter") or cfg.get("adapter_attn_dim") is not None:
            return "adapter layers"
        if cfg.get("conv_pos_batch_norm"):
            return "a batch-normed positional convolution"
        if cfg.get("feat_extract_norm") not in ("group", "layer"):
            return f"feat_extract_norm {cfg.get('feat_extract_norm')!r}"
        if not len(cfg.get("conv_dim") or ()) == len(cfg.get("conv_kernel") or ()) == len(cfg.get("conv_stride") or ()):
            return "conv_dim, conv_kernel and conv_stride of different lengths"
    bad = [a for a in acts if a not in ACTIVATIONS]
    return f"activation {bad[0]!r}" if bad else None


# ----------------------------------------------------------------------------- wav2vec2, HuBERT


class ConvLayer(nn.Module):
    """One layer of the CNN feature encoder: convolution, optional norm, activation."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool, norm: str | None, act: str):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size=kernel, stride=stride, bias=bias)
        if norm == "layer":
            self.layer_norm = nn.LayerNorm(c_out)
        elif norm == "group":
            self.layer_norm = nn.GroupNorm(num_groups=c_out, num_channels=c_out, affine=True)
        else:
            self.layer_norm = None
        self.activation = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        x = self.conv(x)
        if isinstance(self.layer_norm, nn.LayerNorm):
            x = self.layer_norm(x.transpose(-2, -1)).transpose(-2, -1)
        elif self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.activation(x)


class FeatureEncoder(nn.Module):
    def __init__(self, cfg: NativeConfig):
        super().__init__()
        dims, act, group = list(cfg.conv_dim), cfg.feat_extract_activation, cfg.feat_extract_norm == "group"
        self.conv_layers = nn.ModuleList(
            ConvLayer(dims[i - 1] if i else 1, dims[i], cfg.conv_kernel[i], cfg.conv_stride[i], cfg.conv_bias,
                      ("group" if i == 0 else None) if group else "layer", act)
            for i in range(len(dims)))

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, C, T)
        x = input_values[:, None]
        for layer in self.conv_layers:
            x = layer(x)
        return x


class FeatureProjection(nn.Module):
    def __init__(self, cfg: NativeConfig):
        super().__init__()
        # HuBERT checkpoints may leave the norm out (feat_proj_layer_norm); wav2vec2 always has it
        if cfg.model_type != "hubert" or getattr(cfg, "feat_proj_layer_norm", True):
            self.layer_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        else:
            self.layer_norm = None
        self.projection = nn.Linear(cfg.conv_dim[-1], cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x if self.layer_norm is None else self.layer_norm(x))


class PositionalConv(nn.Module):
    """The grouped convolution that adds relative position, weight-normed over every
    dimension but the kernel's, as transformers builds it (so the weights, and the
    encoder's fingerprint, are the same)."""

    def __init__(self, cfg: NativeConfig):
        super().__init__()
        k = cfg.num_conv_pos_embeddings
        conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, kernel_size=k, padding=k // 2,
                         groups=cfg.num_conv_pos_embedding_groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.remove = 1 if k % 2 == 0 else 0
        self.activation = ACTIVATIONS[cfg.feat_extract_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        h = self.conv(x.transpose(1, 2))
        if self.remove:
            h = h[:, :, : -self.remove]
        return self.activation(h).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with transformers' projection names; ``mask`` is a boolean
    (B, 1, 1, T) of keys to attend to, or an additive float mask, or None."""

    def __init__(self, dim: int, heads: int, key_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(dim, dim, bias=key_bias)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, cfg: NativeConfig):
        super().__init__()
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(self.act(self.intermediate_dense(x)))


class EncoderLayer(nn.Module):
    """A transformer layer: post-norm (wav2vec2 base) or pre-norm (``do_stable_layer_norm``)."""

    def __init__(self, cfg: NativeConfig):
        super().__init__()
        self.pre_norm = bool(cfg.do_stable_layer_norm)
        self.attention = Attention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attention(self.layer_norm(x), mask)
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.attention(x, mask))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, cfg: NativeConfig):
        super().__init__()
        self.pre_norm = bool(cfg.do_stable_layer_norm)
        self.pos_conv_embed = PositionalConv(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (B, T, D); keep (B, T) valid frames or None. Returns the input to each layer
        and the top layer's output, and the last hidden state (after the final norm of the
        pre-norm variant), as transformers' model gives them."""
        mask = None
        if keep is not None:
            x = x * keep[..., None].to(x.dtype)  # padded frames are zero before the positional conv
            mask = keep[:, None, None, :]
        x = x + self.pos_conv_embed(x)
        if not self.pre_norm:
            x = self.layer_norm(x)
        states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            states.append(x)
        return states, self.layer_norm(x) if self.pre_norm else x


class Wav2Vec2Native(nn.Module):
    """wav2vec2 / HuBERT for inference: ``forward(input_values, attention_mask,
    output_hidden_states)`` as ``Wav2Vec2Model``'s, returning ``hidden_states`` and
    ``last_hidden_state``."""

    def __init__(self, cfg: NativeConfig):
        super().__init__()
        self.config = cfg
        self.feature_extractor = FeatureEncoder(cfg)
        self.feature_projection = FeatureProjection(cfg)
        self.encoder = Encoder(cfg)
        if getattr(cfg, "mask_time_prob", 0) > 0 or getattr(cfg, "mask_feature_prob", 0) > 0:
            # unused here; kept so that the weights are those of transformers' model
            self.masked_spec_embed = nn.Parameter(torch.zeros(cfg.hidden_size))

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, return_dict: bool = True) -> SimpleNamespace:
        _inference_only(self)
        feats = self.feature_extractor(input_values).transpose(1, 2)  # (B, T, C)
        keep = None
        if attention_mask is not None:
            n = attention_mask.sum(-1)
            for k, s in zip(self.config.conv_kernel, self.config.conv_stride):
                n = torch.div(n - k, s, rounding_mode="floor") + 1
            keep = torch.arange(feats.shape[1], device=feats.device)[None, :] < n[:, None]
        states, last = self.encoder(self.feature_projection(feats), keep)
        return SimpleNamespace(hidden_states=tuple(states) if output_hidden_states else None, last_hidden_state=last)


# ----------------------------------------------------------------------------- Whisper


class WhisperLayer(nn.Module):
    def __init__(self, cfg: NativeConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(d, cfg.encoder_attention_heads, key_bias=False)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        _inference_only(self)
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # as transformers' layer does, against overflow
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x


class WhisperEncoderNative(nn.Module):
    """The parts of Whisper's encoder that :class:`~speechtl.encoders.whisper.WhisperSpeechEncoder`
    runs: the two convolutions, the positional table, the layers and the final norm."""

    def __init__(self, cfg: NativeConfig):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(WhisperLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)


# ----------------------------------------------------------------------------- loading


def is_native(encoder) -> bool:
    """Whether a speechtl encoder runs these modules (inference only) rather than transformers'."""
    return isinstance(getattr(encoder, "model", None), (Wav2Vec2Native, WhisperEncoderNative))


def _inference_only(module: nn.Module) -> None:
    if module.training:
        raise RuntimeError("speechtl's native encoders run inference only (no dropout, layerdrop or masking); "
                           "load the encoder with speechtl.encoders.registry.load_encoder (transformers) to train it")


def _rename_weight_norm(state: dict[str, torch.Tensor], prefix: str) -> None:
    """Older checkpoints keep a weight-normed convolution's (g, v) pair as
    ``weight_g``/``weight_v``; torch's parametrization (transformers' layout now) as
    ``parametrizations.weight.original0/1``."""
    for old, new in (("weight_g", "parametrizations.weight.original0"), ("weight_v", "parametrizations.weight.original1")):
        if prefix + old in state:
            state[prefix + new] = state.pop(prefix + old)


# what decides the forward pass of the models these modules run: the config keys an
# encoder's fingerprint hashes (speechtl.features.cache), the same whichever modules load it
ARCHITECTURE_KEYS = {
    "wav2vec2": ("conv_dim", "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm", "feat_extract_activation",
                 "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                 "layer_norm_eps", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "do_stable_layer_norm",
                 "feat_proj_layer_norm"),
    "whisper": ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                "max_source_positions", "activation_function"),
}
ARCHITECTURE_KEYS["hubert"] = ARCHITECTURE_KEYS["wav2vec2"]


def architecture(config) -> dict | None:
    """The architecture keys, with lists for tuples, of a config (transformers' or native)
    of a model these modules run; None for any other (whose fingerprint hashes its whole
    config, as only transformers loads it)."""
    full = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    if unsupported(full) is not None:
        return None
    out = {"model_type": full["model_type"]}
    for k in ARCHITECTURE_KEYS[full["model_type"]]:
        v = full.get(k)
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def read_safetensors(path: Path, keep=lambda name: True) -> dict[str, torch.Tensor] | None:
    """The tensors whose names ``keep`` accepts, from the single or sharded safetensors
    checkpoint in ``path`` (None when there is none); an unreadable file is an error that
    names it."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                for k in f.keys():
                    if keep(k):
                        state[k] = f.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types, which do not name the file
            raise ValueError(f"{path / name}: cannot read these weights ({type(e).__name__}: {e})") from e
    return state


def read_whisper_encoder(path: Path) -> dict[str, torch.Tensor] | None:
    """The encoder's weights of a transformers Whisper checkpoint, whatever prefix it uses
    (``model.encoder.``, ``encoder.``), under the encoder's own names; None without safetensors."""
    prefixes = ("model.encoder.", "encoder.")
    state = read_safetensors(path, lambda k: k.startswith(prefixes))
    if state is None:
        return None
    return {k[len(p):]: v for k, v in state.items() for p in prefixes if k.startswith(p)}


def load_native(path: str | Path) -> nn.Module | None:
    """The encoder in ``path`` (a transformers model directory) as native modules in eval
    mode, float32; None when its family, config or files need transformers (the reason is
    logged at debug level). A wav2vec2 or HuBERT checkpoint that transformers would load in
    another precision (its config's ``dtype``, else its weights') loads through
    transformers; Whisper's encoder runs in float32 either way."""
    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    full = with_defaults(raw)
    why = unsupported(full)
    kind = raw.get("model_type")
    # transformers loads a wav2vec2 or HuBERT checkpoint in its config's dtype, else in its weights' own
    declared = raw.get("dtype") or raw.get("torch_dtype")
    if why is None and kind != "whisper" and declared not in (None, "float32"):
        why = f"dtype {declared}"
    if why is not None:
        logger.debug("%s: loading through transformers (%s)", path, why)
        return None
    cfg = NativeConfig(**full)
    if kind == "whisper":
        model: nn.Module = WhisperEncoderNative(cfg)
        state = read_whisper_encoder(path)
    else:
        model = Wav2Vec2Native(cfg)
        state = read_safetensors(path)
        if state is not None:
            prefix = f"{kind}."  # a *ForCTC / *ForPreTraining checkpoint's base model
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
            _rename_weight_norm(state, "encoder.pos_conv_embed.conv.")
    if state is None:
        logger.debug("%s: loading through transformers (no safetensors weights)", path)
        return None
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(state))
    bad = [k for k in wanted if k in state and state[k].shape != wanted[k].shape]
    other = sorted({str(state[k].dtype) for k in wanted if k in state and state[k].dtype != torch.float32})
    if missing or bad or (other and kind != "whisper" and declared is None):
        logger.debug("%s: loading through transformers (weights missing %s, of another shape %s, in %s)",
                     path, missing[:5], bad[:5], other)
        return None
    model.load_state_dict({k: state[k] for k in wanted})  # other heads' weights (lm_head, quantizer) stay out
    return model.eval()
