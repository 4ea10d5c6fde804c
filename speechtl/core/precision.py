"""Numeric precision policy, in one place: the ``amp`` choices and what each means on
each device, for training (autocast) and for running a frozen encoder (features).

torch is imported inside the functions: the command line reads ``AMP_CHOICES`` to build
its options, and ``speechtl --help`` should not wait for torch to load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def autocast_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The training autocast dtype for ``amp`` (auto | bf16 | fp16 | none): bf16 where the
    GPU has it, else fp16; ``None`` (float32) on a CPU or with ``none``."""
    import torch

    if device.type != "cuda" or amp == "none":
        return None
    return torch.bfloat16 if amp in ("auto", "bf16") and torch.cuda.is_bf16_supported() else torch.float16


def cpu_has_amx() -> bool:
    """True on CPUs with AMX tiles (Intel Sapphire Rapids and later), where oneDNN runs
    bf16 matrix products several times faster than float32 ones."""
    import torch

    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:  # an unusual build: take the float32 path
        return False


def encoder_autocast_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype for running a frozen encoder (features, not gradients).

    On CUDA as in training. On a CPU, ``auto`` means bf16 where the CPU has AMX and
    float32 elsewhere (bf16 without AMX is slower than float32); ``bf16`` and ``fp16``
    ask for that dtype on any CPU; ``none`` is float32.
    """
    import torch

    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, not {amp!r}")
    if device.type == "cuda":
        return autocast_dtype(device, amp)
    if device.type != "cpu" or amp == "none":
        return None
    if amp == "auto":
        return torch.bfloat16 if cpu_has_amx() else None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def compute_dtype_name(device: torch.device, amp: str = "auto") -> str:
    """What a frozen encoder computes in under ``amp`` on ``device``: "float32", "bfloat16" or "float16"."""
    dt = encoder_autocast_dtype(device, amp)
    return "float32" if dt is None else str(dt).removeprefix("torch.")


# the ``amp`` setting that asks for each compute_dtype_name result on any device
AMP_FOR_COMPUTE = {"float32": "none", "bfloat16": "bf16", "float16": "fp16"}
