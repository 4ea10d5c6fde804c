"""The LoRA bookkeeping an encoder needs to save itself without its adapters: peft's
weight names and merged state. Attaching and training adapters is
:mod:`speechtl.models.adapters`."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

_PEFT_NAME = re.compile(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)")


def _base_name(key: str) -> str:
    return key.replace(".base_layer.", ".")


def canonical(key: str) -> str:
    """An adapter weight's name without peft's adapter name (``lora_A.default.weight`` ->
    ``lora_A.weight``): what adapter files hold."""
    return _PEFT_NAME.sub(r".\1", key)


def _lora_layers(module: nn.Module) -> list[nn.Module]:
    """``module``'s LoRA layers (peft is imported only where the module has LoRA weights)."""
    if not any("lora_" in n for n, _ in module.named_parameters()):
        return []
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def set_lora_merged(module: nn.Module, merged: bool) -> None:
    """Fold every LoRA update of ``module`` into its base weight (``merged``: inference then
    runs one matrix product per projection instead of three), or take it out again."""
    for m in _lora_layers(module):
        if merged and not m.merged:
            m.merge()
        elif not merged and m.merged:
            m.unmerge()


def lora_is_merged(module: nn.Module) -> bool:
    return any(m.merged for m in _lora_layers(module))


@contextmanager
def lora_unmerged(module: nn.Module) -> Iterator[None]:
    """The block sees the base weights apart from the LoRA updates; merged ones are folded
    back in after it (with the adapters' values as they are then)."""
    merged = lora_is_merged(module)
    if merged:
        set_lora_merged(module, False)
    try:
        yield
    finally:
        if merged:
            set_lora_merged(module, True)


def base_state_dict(module: nn.Module, adapter_keys=()) -> dict[str, torch.Tensor]:
    """``module``'s weights without adapters, under their names from before they were attached."""
    skip = set(adapter_keys)
    merged = lora_is_merged(module)
    with lora_unmerged(module):  # copies where the weights are merged again after the block
        return {_base_name(k): v.clone() if merged else v for k, v in module.state_dict().items() if k not in skip}
