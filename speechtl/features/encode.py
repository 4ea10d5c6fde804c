"""Running a frozen encoder over batches of audio: every layer's output per clip, in order,
on a few CPU threads at once where that is faster."""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from ..core.precision import encoder_autocast_dtype
from ..core.threads import cpu_streams, in_order
from ..encoders.base import Encoder


def encode_batches(
    encoder: Encoder,
    batches: Iterable,
    device: torch.device,
    layer_ids: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float16,
    streams: int | None = None,
    amp: str = "auto",
) -> Iterator[tuple[object, list[torch.Tensor]]]:
    """Run a frozen encoder over ``batches`` (:class:`~speechtl.data.loader.Batch`) and yield each
    batch with its clips' features, ``(layers, frames, dim)`` in ``dtype`` on the CPU, in
    the order the batches came.

    Under ``inference_mode``, with the autocast of :func:`encoder_autocast_dtype` (bf16 or
    fp16 on CUDA, bf16 on a CPU with AMX, unless ``amp="none"``). With ``streams > 1``
    (CPUs only; default :func:`cpu_streams`), that many batches run at once on threads
    with one intra-op thread each; the encoder keeps its per-call state per thread. Each
    thread also draws its next batch from ``batches`` itself (one at a time, under a
    lock), so that reading and padding audio happens on the threads that compute rather
    than on a third thread competing with them for the cores; a thread that finishes
    takes the next batch at once, and results still come in order. The caller's random
    stream is left as it was (transformers draws layerdrop numbers even in eval mode);
    iterate under ``contextlib.closing`` so that an error in the caller's loop restores it
    (and the thread count) at once.
    """
    amp_dtype = encoder_autocast_dtype(device, amp)
    streams = cpu_streams(device) if streams is None else streams
    if device.type != "cpu":  # a GPU runs one big batch at a time
        streams = 1

    def run(batch):
        with torch.inference_mode():
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                b = batch.to(device, non_blocking=True)
                enc = encoder(b.waveforms, b.lengths, all_layers=True)
            # outside autocast: layers may come in mixed dtypes (float32 norms, bf16 products)
            hidden = enc.hidden_states if layer_ids is None else [enc.hidden_states[i] for i in layer_ids]
            frames = enc.lengths.tolist()
            if device.type == "cpu":  # one copy per clip: its valid frames, converted in place
                feats = []
                for k, n in enumerate(frames):
                    f = torch.empty(len(hidden), n, hidden[0].shape[-1], dtype=dtype)
                    for i, h in enumerate(hidden):
                        f[i].copy_(h[k, :n])
                    feats.append(f)
                return batch, feats
            # one device-to-host transfer per batch, then the clips are cut on the host
            stacked = torch.stack([h.to(dtype) for h in hidden]).cpu()  # (L, B, T, D)
            return batch, [stacked[:, k, :n].contiguous() for k, n in enumerate(frames)]

    with torch.random.fork_rng(devices=[]):
        yield from in_order(run, batches, streams)
