"""Adapters: small trainable modules inside a fixed encoder, one set per language.

``mode=adapter`` keeps every weight of the pretrained encoder as it is and trains, with
the CTC head, one of two kinds of small modules:

- ``lora``: low-rank updates (LoRA) of the attention and feed-forward projections of
  every transformer layer, injected by ``peft``. WavLM's attention hands its projection
  weights to ``torch``'s fused attention without calling the layers, so on WavLM only
  the feed-forward projections get LoRA.
- ``mms``: a bottleneck adapter (layer norm, down-projection, ReLU, up-projection) added
  to the output of every transformer layer, the ``Wav2Vec2AttnAdapterLayer`` that
  transformers' MMS models use (``adapter_attn_dim``). wav2vec2 encoders only. In a
  stable-layer-norm encoder (MMS, XLS-R) transformers' own layer runs it, so an export
  loads with ``Wav2Vec2ForCTC.load_adapter(lang)``; a post-layer-norm one
  (wav2vec2-base style) has no such slot, and speechtl adds it after the layer with a
  forward hook (same placement, not exportable as MMS).

An encoder with adapters attached remembers them: :func:`base_state_dict` gives its
weights as they were before (what ``encoder/`` of a model directory holds), and
:func:`adapter_state` / :func:`load_adapter_state` read and write the adapters alone,
under names that do not depend on ``peft``'s internal adapter name.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.constants import ADAPTER_KINDS, check_lang  # noqa: F401  (re-exported)
from ..encoders.base import transformer_layers
from ..encoders.lora import _base_name, base_state_dict, canonical, lora_is_merged, lora_unmerged, set_lora_merged  # noqa: F401  (re-exported)
from ..encoders.native import is_native

logger = logging.getLogger(__name__)

DEFAULTS = {"lora_rank": 8, "adapter_dim": 16}
# the projections LoRA adapts, by their names in transformers' speech encoders
_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj", "linear_q", "linear_k", "linear_v", "linear_out")
_FEED_FORWARD = ("intermediate_dense", "output_dense", "fc1", "fc2")


@dataclass(frozen=True)
class AdapterConfig:
    """Which adapters, and their size. ``rank``/``alpha`` are LoRA's (updates scaled by
    ``alpha / rank``); ``dim`` is the MMS bottleneck width (``adapter_attn_dim``)."""

    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dim: int = 16

    def to_dict(self) -> dict:
        if self.kind == "lora":
            return {"kind": "lora", "rank": self.rank, "alpha": self.alpha}
        return {"kind": "mms", "dim": self.dim}

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        return cls(**{k: v for k, v in d.items() if k in ("kind", "rank", "alpha", "dim")})


def resolve_config(kind: str | None, rank: int | None, alpha: float | None, dim: int | None,
                   existing: dict | None = None, where: str = "") -> AdapterConfig:
    """The adapter configuration of a run: the keys given, else those of the model it adds a
    language to (``existing``), else the defaults. A key that contradicts the model's is an
    error: every language of one model has adapters of one shape beside the one base."""
    if existing is not None:
        have = AdapterConfig.from_dict(existing)
        given = {"adapter": (kind, have.kind)}
        if have.kind == "lora":
            given.update(lora_rank=(rank, have.rank), lora_alpha=(alpha, have.alpha))
        else:
            given.update(adapter_dim=(dim, have.dim))
        for key, (mine, theirs) in given.items():
            if mine is not None and mine != theirs:
                raise ValueError(f"config key {key!r}: {where} holds {have.kind} adapters with {key}={theirs!r}, this run "
                                 f"asks for {mine!r}; every language of one model shares the adapter kind and size "
                                 f"(leave {key} unset to take the model's)")
        if have.kind == "mms" and (rank is not None or alpha is not None):
            raise ValueError(f"config key 'lora_rank'/'lora_alpha': {where} holds mms adapters; they have adapter_dim")
        if have.kind == "lora" and dim is not None:
            raise ValueError(f"config key 'adapter_dim': {where} holds lora adapters; they have lora_rank and lora_alpha")
        return have
    kind = kind or "lora"
    if kind == "mms" and (rank is not None or alpha is not None):
        raise ValueError("config key 'lora_rank'/'lora_alpha': for adapter=lora (adapter=mms takes adapter_dim)")
    if kind == "lora" and dim is not None:
        raise ValueError("config key 'adapter_dim': for adapter=mms (adapter=lora takes lora_rank and lora_alpha)")
    rank = rank or DEFAULTS["lora_rank"]
    return AdapterConfig(kind, rank, float(alpha if alpha is not None else 2 * rank), dim or DEFAULTS["adapter_dim"])


def training_language(lang: str | None, utterances) -> str:
    """The language an adapter run trains: ``lang``, else the one every training clip names."""
    named = {u.lang for u in utterances if u.lang}
    if lang is not None:
        if named - {lang}:
            logger.warning("lang=%s, and the training manifest names %s", lang, ", ".join(sorted(named)))
        return lang
    if len(named) == 1 and all(u.lang for u in utterances):
        return check_lang(named.pop())
    found = f"its manifest names {', '.join(sorted(named))}" if named else "its manifest names none"
    raise ValueError(f"config key 'lang': mode=adapter needs the language the adapter is for (lang=cs, say); {found}")


def check_supported(encoder, config: AdapterConfig) -> None:
    """Refuse adapters the encoder cannot take, naming the key."""
    model_type = getattr(encoder.config, "model_type", "")
    if config.kind == "mms" and model_type != "wav2vec2":
        raise ValueError(f"config key 'adapter': adapter=mms puts transformers' wav2vec2 adapter layers "
                         f"(adapter_attn_dim) in a wav2vec2 encoder; this encoder is {model_type!r}. Use adapter=lora, "
                         "which works on every encoder")
    if config.kind == "lora" and not lora_targets(encoder):
        raise ValueError(f"config key 'adapter': no attention or feed-forward projections found for LoRA in this "
                         f"{model_type!r} encoder")


def lora_targets(encoder) -> list[str]:
    """Names (in ``encoder.model``) of the linear layers LoRA adapts: each transformer
    layer's attention and feed-forward projections."""
    inside = {id(m) for layer in transformer_layers(encoder) for m in layer.modules()}
    # WavLM's attention passes these weights straight to torch's fused attention (LoRA would not act)
    leaves = _FEED_FORWARD if encoder.config.model_type == "wavlm" else _ATTENTION + _FEED_FORWARD
    return [name for name, m in encoder.model.named_modules()
            if id(m) in inside and isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in leaves]


def attach(encoder, config: AdapterConfig) -> None:
    """Add fresh adapters to ``encoder`` (initialised from the current random state) and
    record their names, so that the base weights can still be told apart."""
    if getattr(encoder, "adapter_config", None) is not None:
        raise ValueError("this encoder already has adapters")
    check_supported(encoder, config)
    if is_native(encoder):  # inference: each language's LoRA updates are folded into the weights (fold_lora)
        if config.kind != "lora":
            raise ValueError(f"speechtl's own encoder modules take LoRA adapters only, not {config.kind!r}")
        encoder.adapter_config, encoder.adapter_keys = config, ()
        return
    before = set(encoder.model.state_dict())
    if config.kind == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, bias="none",
                          target_modules=lora_targets(encoder))
        inject_adapter_in_model(lora, encoder.model)
        keys = [k for k in encoder.model.state_dict() if "lora_" in k]
    else:
        keys = _attach_mms(encoder, config.dim)
    encoder.adapter_config = config
    encoder.adapter_keys = tuple(keys)
    renamed = {_base_name(k) for k in encoder.model.state_dict() if k not in keys}
    if renamed != before - set(keys):
        raise RuntimeError("attaching adapters changed the base encoder's weight names unexpectedly")


def _attach_mms(encoder, dim: int) -> list[str]:
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2AttnAdapterLayer

    config = copy.deepcopy(encoder.config)
    config.adapter_attn_dim = dim
    keys = []
    layer_names = {id(m): n for n, m in encoder.model.named_modules()}
    for layer in transformer_layers(encoder):
        existing = getattr(layer, "adapter_layer", None)
        if existing is not None:  # an MMS checkpoint's own adapter: it becomes this language's
            if existing.linear_1.out_features != dim:
                raise ValueError(f"config key 'adapter_dim': this encoder's adapter layers have adapter_attn_dim="
                                 f"{existing.linear_1.out_features}, not {dim}")
            module = existing
        else:
            module = Wav2Vec2AttnAdapterLayer(config)
            native = hasattr(layer, "adapter_layer")  # transformers' stable-layer-norm layer runs it itself
            layer.adapter_layer = module
            if not native:
                layer.register_forward_hook(_add_adapter_output)
        _init_mms(module, config.initializer_range)
        prefix = layer_names[id(layer)]
        keys += [f"{prefix}.adapter_layer.{k}" for k, _ in module.named_parameters()]
    return keys


def _init_mms(module: nn.Module, std: float) -> None:
    """As transformers' ``init_adapter_layers``: normal linear weights, zero biases, unit norm."""
    with torch.no_grad():
        for lin in (module.linear_1, module.linear_2):
            lin.weight.normal_(0.0, std)
            lin.bias.zero_()
        module.norm.weight.fill_(1.0)
        module.norm.bias.zero_()


def _add_adapter_output(layer: nn.Module, args, output):
    """Forward hook of a post-layer-norm wav2vec2 layer: its output plus its adapter's, as the
    stable-layer-norm layer computes it."""
    if isinstance(output, tuple):
        return (output[0] + layer.adapter_layer(output[0]), *output[1:])
    return output + layer.adapter_layer(output)


def adapter_parameters(encoder) -> dict[str, nn.Parameter]:
    """The adapters' parameters by canonical name (empty without adapters)."""
    keys = set(getattr(encoder, "adapter_keys", ()))
    return {canonical(n): p for n, p in encoder.model.named_parameters() if n in keys}


def adapter_state(encoder) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().contiguous().clone() for k, p in adapter_parameters(encoder).items()}


def load_adapter_state(encoder, state: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Copy ``state`` (canonical names) into the encoder's adapters; the sets of names and
    shapes must match. An encoder of :mod:`speechtl.encoders.native` gets LoRA updates folded in."""
    if is_native(encoder):
        fold_lora(encoder, state, encoder.adapter_config, where=where)
        return
    params = adapter_parameters(encoder)
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"{where}: its adapter weights do not fit this model's adapters (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    for k, p in params.items():
        if p.shape != state[k].shape:
            raise ValueError(f"{where}: {k} has shape {tuple(state[k].shape)}, the model's adapter "
                             f"{tuple(p.shape)}")
    with torch.no_grad(), lora_unmerged(encoder.model):  # merged LoRA updates are re-folded with the new values
        for k, p in params.items():
            p.copy_(state[k])


def lora_merged(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], config: AdapterConfig) -> dict[str, torch.Tensor]:
    """Base weights with each LoRA update folded in: ``W + (B @ A) * alpha / rank``."""
    out = dict(base)
    scale = config.alpha / config.rank
    for key, a in adapters.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b = adapters[f"{module}.lora_B.weight"]
        w = out[f"{module}.weight"]
        out[f"{module}.weight"] = (w.double() + (b.double() @ a.double()) * scale).to(w.dtype)
    return out


def fold_lora(encoder, adapters: dict[str, torch.Tensor], config: AdapterConfig, where: str = "adapter") -> None:
    """Inference without peft (an encoder of :mod:`speechtl.encoders.native`): set each adapted
    projection's weight to its base weight with ``adapters``' LoRA update folded in. The base
    weights are kept aside the first time, so that another language's updates replace
    these rather than add to them. The names and shapes must be those of this encoder's
    LoRA targets."""
    targets = lora_targets(encoder)
    expected = {f"{m}.lora_{ab}.weight" for m in targets for ab in "AB"}
    if set(adapters) != expected:
        missing, extra = sorted(expected - set(adapters)), sorted(set(adapters) - expected)
        raise ValueError(f"{where}: its adapter weights do not fit this model's LoRA layers (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    layers = dict(encoder.model.named_modules())
    if getattr(encoder, "lora_base", None) is None:
        encoder.lora_base = {f"{m}.weight": layers[m].weight.detach().clone() for m in targets}
    for m in targets:
        w, a, b = encoder.lora_base[f"{m}.weight"], adapters[f"{m}.lora_A.weight"], adapters[f"{m}.lora_B.weight"]
        if a.shape != (config.rank, w.shape[1]) or b.shape != (w.shape[0], config.rank):
            raise ValueError(f"{where}: {m}'s LoRA weights have shapes {tuple(a.shape)} and {tuple(b.shape)}; "
                             f"a rank-{config.rank} update of a {tuple(w.shape)} weight needs "
                             f"{(config.rank, w.shape[1])} and {(w.shape[0], config.rank)}")
    merged = lora_merged(encoder.lora_base, adapters, config)
    with torch.no_grad():
        for m in targets:
            layers[m].weight.copy_(merged[f"{m}.weight"])


def adapter_file(model_dir: str | Path, lang: str) -> Path:
    return Path(model_dir) / f"adapter.{lang}.safetensors"


__all__ = ["ADAPTER_KINDS", "AdapterConfig", "adapter_file", "adapter_parameters", "adapter_state", "attach",
           "base_state_dict", "canonical", "check_lang", "check_supported", "fold_lora", "load_adapter_state", "lora_is_merged",
           "lora_merged", "lora_unmerged", "set_lora_merged",
           "lora_targets", "resolve_config", "training_language"]
