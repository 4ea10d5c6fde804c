"""The wav2vec2-family CNN feature encoder computed time-major, for CPUs.

transformers runs ``Conv1d`` on (batch, channel, time) and transposes around every
LayerNorm; :func:`time_major_cnn` computes the same layers on (batch, time, channel), one
matrix product per block of windows, which runs about twice as fast on a CPU. The
encoder wrapper uses it when no gradient flows through the CNN
(:class:`speechtl.encoders.wav2vec2.SpeechEncoder`, ``fast_cnn``).
"""

from __future__ import annotations

import torch
from torch import nn


def time_major_supported(fe: nn.Module) -> bool:
    """True for the wav2vec2-family feature encoders :func:`time_major_cnn` computes:
    unpadded, undilated, ungrouped convolutions, each followed by nothing, a LayerNorm over
    channels, or a GroupNorm with one group per channel, then an activation."""
    layers = getattr(fe, "conv_layers", None)
    if not layers:
        return False
    for layer in layers:
        conv = getattr(layer, "conv", None)
        if not isinstance(conv, nn.Conv1d) or conv.padding != (0,) or conv.dilation != (1,) or conv.groups != 1:
            return False
        if not callable(getattr(layer, "activation", None)):
            return False
        norm = getattr(layer, "layer_norm", None)
        if norm is None:
            continue
        if isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (conv.out_channels,):
            continue
        if isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels == conv.out_channels:
            continue
        return False
    return True


def time_major_weight(conv: nn.Conv1d) -> torch.Tensor:
    """A convolution's weight as the (kernel × in-channels, out-channels) matrix that
    multiplies time-major windows (window ``t`` is ``kernel`` frames of ``in-channels``)."""
    return conv.weight.permute(2, 1, 0).reshape(conv.kernel_size[0] * conv.in_channels, conv.out_channels)


def time_major_cnn(conv_layers: nn.ModuleList, input_values: torch.Tensor, chunk_values: int = 1 << 20) -> torch.Tensor:
    """The wav2vec2 feature encoder computed in (batch, time, channel) layout.

    transformers runs ``Conv1d`` on (batch, channel, time) and transposes around every
    LayerNorm. Here each convolution is one matrix product over overlapping windows of
    the time-major input (``as_strided``: window ``t`` is ``kernel × channels`` contiguous
    numbers), and the LayerNorms act on the contiguous last dimension.

    Each layer is computed in blocks of about ``chunk_values`` outputs (product, norm,
    activation, one block at a time), so a block stays in the CPU's cache through all
    three instead of every step streaming the whole layer through memory; the first
    layers of a 16 kHz clip are tens of megabytes. Under a CPU autocast (bf16 on CPUs
    with AMX) the products after the first run in that dtype and the norms and
    activations in float32 on the block, as autocast would run them, and each layer is
    stored in the low dtype. On a CPU this runs the CNN about twice as fast as
    transformers' own; results equal it to float rounding (a test).
    Returns (batch, channel, time), as transformers' feature encoder does.
    """
    low = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    store = low or input_values.dtype
    exact = torch.float32 if low is not None else input_values.dtype  # norms and activations
    with torch.autocast("cpu", enabled=False):
        h = input_values[:, :, None]  # (B, S, 1)
        for layer in conv_layers:
            conv = layer.conv
            k, s, n_out = conv.kernel_size[0], conv.stride[0], conv.out_channels
            h = h.contiguous()
            b, t, c = h.shape
            frames = (t - k) // s + 1
            windows = h.as_strided((b, frames, k * c), (h.stride(0), s * c, 1))
            # the first layer (one input channel, raw samples) keeps the input's precision
            weight = time_major_weight(conv).to(h.dtype)
            out = torch.empty(b, frames, n_out, dtype=store, device=h.device)
            if isinstance(getattr(layer, "layer_norm", None), nn.GroupNorm):
                step = max(frames, 1)  # statistics over the whole clip: one block
            else:
                step = max(64, chunk_values // (n_out * b))
            for t0 in range(0, frames, step):
                out[:, t0 : t0 + step] = _block(windows[:, t0 : t0 + step], weight, layer, exact)
            h = out
    return h.transpose(1, 2)


def _block(windows: torch.Tensor, weight: torch.Tensor, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """One block of a feature-encoder layer: product, bias, norm, activation (in ``dtype``)."""
    conv = layer.conv
    h = (windows @ weight).to(dtype)
    if conv.bias is not None:
        h = h + conv.bias
    norm = getattr(layer, "layer_norm", None)
    if isinstance(norm, nn.LayerNorm):
        h = norm(h)
    elif isinstance(norm, nn.GroupNorm):  # one group per channel: normalise each channel over time
        mean = h.mean(1, keepdim=True)
        var = h.var(1, unbiased=False, keepdim=True)
        h = (h - mean) * torch.rsqrt(var + norm.eps)
        if norm.affine:
            h = h * norm.weight + norm.bias
    return layer.activation(h)
