"""An encoder folder's ``config.json`` checked before any model is built from it, so that a
hand-edited or mismatched one is named with its key, instead of failing deep in transformers
or torch (``Should have a model_type key``, a ``freeze_layers`` error for
``num_hidden_layers=-1``, "look at the above report!" for a wrong ``hidden_size``, raw
``TypeError``/``KeyError`` for a string size or an unknown activation)."""

from __future__ import annotations

import json
import re
from pathlib import Path

# sizes that must be whole numbers of at least 1, where the config has them
POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "num_feat_extract_layers",
                 "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins",
                 "max_source_positions")
INT_LISTS = ("conv_dim", "conv_kernel", "conv_stride")
ACTIVATION_KEYS = ("hidden_act", "feat_extract_activation", "activation_function")


def check_encoder_config(folder: str | Path) -> None:
    """Raise ValueError (FileNotFoundError for a missing file) naming ``folder/config.json``
    and the key that is wrong: not JSON, no ``model_type``, a size that is not a whole
    number of at least 1, conv lists of unequal lengths, ``hidden_size`` not divisible by
    the attention heads, an activation no encoder has, or sizes the weights contradict."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; an encoder folder holds its config.json beside its weights")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object of config keys")
    if not isinstance(cfg.get("model_type"), str) or not cfg["model_type"]:
        raise ValueError(f"{path}: no 'model_type' key naming the family (e.g. \"wav2vec2\", \"hubert\", \"wavlm\", "
                         f"\"whisper\"); restore the file that came with the weights")
    for key in POSITIVE_INTS:
        if key in cfg and (isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1):
            raise ValueError(f"{path}: key {key!r} must be a whole number of at least 1 (got {cfg[key]!r})")
    lengths = {}
    for key in INT_LISTS:
        if key in cfg:
            v = cfg[key]
            if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                raise ValueError(f"{path}: key {key!r} must be a list of whole numbers of at least 1 (got {v!r})")
            lengths[key] = len(v)
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: keys {', '.join(lengths)} must have one entry per conv layer (lengths {lengths})")
    heads = cfg.get("num_attention_heads")
    if isinstance(cfg.get("hidden_size"), int) and isinstance(heads, int) and cfg["hidden_size"] % heads:
        raise ValueError(f"{path}: key 'hidden_size' ({cfg['hidden_size']}) must be a multiple of "
                         f"'num_attention_heads' ({heads})")
    for key in ACTIVATION_KEYS:
        if key in cfg and not _known_activation(cfg[key]):
            raise ValueError(f"{path}: key {key!r}: {cfg[key]!r} is not an activation transformers knows "
                             f"(e.g. \"gelu\", \"relu\", \"silu\")")
    _check_against_weights(path, cfg)


def _known_activation(name) -> bool:
    from .native import ACTIVATIONS

    if not isinstance(name, str):
        return False
    if name in ACTIVATIONS:  # the common names, without importing transformers
        return True
    from transformers.activations import ACT2FN

    return name in ACT2FN


# weights whose shapes give a wav2vec2-family config's sizes: (key suffix, dimension, config key)
_SHAPES = (("feature_projection.projection.weight", 0, "hidden_size"),
           ("feed_forward.intermediate_dense.weight", 0, "intermediate_size"))


def _check_against_weights(path: Path, cfg: dict) -> None:
    """Sizes of a wav2vec2-family config against the shapes in ``model.safetensors``' header
    (read without loading a weight)."""
    weights = path.parent / "model.safetensors"
    if not weights.is_file() or "conv_dim" not in cfg:
        return
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception:  # a damaged file is named when it is read
        return
    for suffix, dim, key in _SHAPES:
        found = next((s for k, s in shapes.items() if k.endswith(suffix)), None)
        if found is not None and key in cfg and len(found) > dim and found[dim] != cfg[key]:
            raise ValueError(f"{path}: key {key!r} is {cfg[key]}, but {weights.name} holds {suffix} of shape "
                             f"{list(found)} ({key} {found[dim]}); the config does not belong to these weights")
    layers = {int(m.group(1)) for k in shapes for m in [re.search(r"encoder\.layers\.(\d+)\.", k)] if m}
    if layers and "num_hidden_layers" in cfg and cfg["num_hidden_layers"] != len(layers):
        raise ValueError(f"{path}: key 'num_hidden_layers' is {cfg['num_hidden_layers']}, but {weights.name} holds "
                         f"{len(layers)} transformer layers; the config does not belong to these weights")
