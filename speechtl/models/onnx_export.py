"""Export a CTC model folder to ONNX, for ONNX Runtime and sherpa-onnx (no torch needed to run it).

The graph takes ``waveforms (B, S)`` float32 at 16 kHz, zero-padded, and ``lengths (B,)``
int64 samples, and gives ``log_probs (B, T, V)`` and ``frame_lengths (B,)``: the whole
model, front end included, so that a padded batch gives each clip what it gives alone
(to float rounding; the export checks this on a padded batch before writing).

- Whisper-shaped encoders (the bundled default, whisper-base): the log-mel front end is
  in the graph. The STFT is a strided convolution with the windowed DFT basis as its
  kernel, each clip reflect-padded at its own ends by a gather, so that the graph uses
  only ops every ONNX Runtime build has (sherpa-onnx ships its own) and the padded
  batch matches speechtl's per-clip front end.
- wav2vec2 / HuBERT: the waveform normalisation and the CNN are in the graph. Encoders
  with a group-norm CNN (wav2vec2-base style) normalise over the padded batch, so the
  folder records that clips run one at a time.
- frozen models keep the weighted sum of all layers and their linear or BiLSTM head;
  adapter models export one language (LoRA folded into the weights); seq2seq models
  (Whisper's own decoder) are refused before any work.

``lengths`` has a default (one clip, as long as the input), so that sherpa-onnx, which
feeds a single waveform input, can run the same file. sherpa-onnx scales each waveform to
zero mean and unit variance first; without ``lengths`` the graph therefore brings the
clip to an RMS of ``SHERPA_LEVEL`` (0.1), which a Whisper front end needs (it reads the
signal's level) and a normalising wav2vec2 ignores. ``--quantize int8`` adds
``model.int8.onnx``: ONNX Runtime's dynamic int8 quantisation of the matrix products
with constant weights; the front end's DFT and mel filters stay in float. A
wav2vec2-family CNN is written as matrix products and quantised too, all but its first
layer, unless ``--float-cnn`` keeps it as float convolutions.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.io import atomic_dir, write_json, write_text
from ..data.text import PAD, UNK_TEXT, Vocabulary
from ..data.units import WORD_START, units_of
from .model_dir import MODEL_FILE, load_model_dir, pick_language, read_meta, resolve_model_dir

logger = logging.getLogger(__name__)

ONNX_META_FILE = "speechtl-onnx.json"  # the name inference.onnx reads it by
OPSET = 17
HOP, N_FFT = 160, 400
LENGTH_DEFAULT = 2**40  # "as long as the input": the graph clamps lengths to the input's samples
# RMS a clip gets when it comes without lengths: sherpa-onnx's omnilingual CTC type scales every
# waveform to unit variance, and a Whisper-shaped front end reads level (speech at -20 dBFS RMS;
# the test clips of the transfer demo lie at 0.07-0.10)
SHERPA_LEVEL = 0.1


class ExportError(ValueError):
    pass


# ----------------------------------------------------------------------------- the graph


class _WhisperFrontEnd(nn.Module):
    """Whisper's log-mel spectrogram of a padded batch, each clip over its own samples."""

    def __init__(self, filters: torch.Tensor):
        super().__init__()
        n = torch.arange(N_FFT, dtype=torch.float64)
        k = torch.arange(N_FFT // 2 + 1, dtype=torch.float64)
        angle = 2 * math.pi * k[:, None] * n[None, :] / N_FFT
        window = torch.hann_window(N_FFT, dtype=torch.float64)
        basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])  # (2 x 201, 400)
        self.register_buffer("dft", basis.float()[:, None, :])
        self.register_buffer("mel_filters", filters.float())  # (n_mels, 201)

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = N_FFT // 2
        s = wav.shape[1]
        pos = torch.arange(s + 2 * half, device=wav.device)[None, :] - half
        n = lengths[:, None]
        idx = pos.abs()  # reflect at the start
        idx = torch.where(idx >= n, 2 * (n - 1) - idx, idx)  # and at the clip's own end
        idx = idx.clamp(min=0).clamp(max=s - 1)
        x = torch.gather(wav, 1, idx.expand(wav.shape[0], -1))
        spec = F.conv1d(x[:, None, :], self.dft, stride=HOP)  # (B, 402, s // 160 + 1)
        bins = self.dft.shape[0] // 2
        power = spec[:, :bins] ** 2 + spec[:, bins:] ** 2
        frames = torch.div(lengths, HOP, rounding_mode="floor")
        t = torch.div(torch.ones_like(wav[0], dtype=torch.long).sum(), HOP, rounding_mode="floor")
        power = power[..., :t]
        mel = torch.matmul(self.mel_filters, power).clamp(min=1e-10).log10()
        valid = torch.arange(power.shape[-1], device=wav.device)[None, :] < frames[:, None]
        peak = mel.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)
        mel = torch.maximum(mel, peak - 8.0)
        return (mel + 4.0) / 4.0 * valid[:, None, :], frames


class _MatmulCNN(nn.Module):
    """A wav2vec2-family CNN feature encoder written as matrix products with constant
    weights, which dynamic int8 quantisation then covers (ONNX's ``Conv`` it leaves in
    float, and its ``ConvInteger`` ran slower than float here: benchmarks/README.md).
    Results equal transformers' CNN to float rounding (a test), in (batch, channel, time).

    A layer of kernel ``k`` and stride ``s`` reads its input as rows of ``s`` frames side by
    side (a reshape, once the time axis is padded to a multiple of ``s``) and is
    ``ceil(k / s)`` products of those rows with the kernel's blocks of ``s`` taps (taps past
    ``k`` zero), each shifted by its block number and added. The products of a layer share
    one quantised input, and no window is copied. The first layer writes its output
    straight in the second's rows: each row is ``s1`` frames computed from one window of
    ``s0 * (s1 - 1) + k0`` samples with a banded weight. Padding only reaches frames past
    the input's last whole one, which are cut at the end, and a GroupNorm (over time)
    counts only the whole ones. On the demo's test clips this ran the int8 CNN of a
    256-channel wav2vec2 1.3x as fast as strided slices side by side did
    (benchmarks/README.md).

    The first layer's weight is ``w0``, so that the quantiser can leave it in float (ten
    raw samples a window: little to gain, much to lose)."""

    def __init__(self, conv_layers: nn.ModuleList):
        super().__init__()
        from ..encoders.fast_cnn import time_major_weight

        self.layers = conv_layers
        self.shape = [(layer.conv.kernel_size[0], layer.conv.stride[0], layer.conv.in_channels,
                       layer.conv.out_channels) for layer in conv_layers]
        weights = [time_major_weight(layer.conv).detach() for layer in conv_layers]
        k0, s0, c0, o0 = self.shape[0]
        self.s1 = s1 = self.shape[1][1] if len(self.shape) > 1 else 1  # frames in a row of the first layer's output
        band = torch.zeros((s0 * (s1 - 1) + k0) * c0, s1 * o0)
        for f in range(s1):  # frame f of a row starts f * s0 samples into its window
            band[f * s0 * c0: (f * s0 + k0) * c0, f * o0: (f + 1) * o0] = weights[0]
        self.register_buffer("w0", band)
        for i, (k, s, c, o) in enumerate(self.shape[1:], start=1):
            m = -(-k // s)
            padded = torch.zeros(m * s * c, o)
            padded[: k * c] = weights[i]
            for q in range(m):
                self.register_buffer(f"w{i}_{q}", padded[q * s * c: (q + 1) * s * c].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, C, T), as transformers' gives
        b, whole = x.shape[0], [x.shape[1]]
        for k, s, _, _ in self.shape:  # each layer's whole output frames
            whole.append((whole[-1] - k) // s + 1)
        k0, s0, _, o0 = self.shape[0]
        s1 = self.s1
        step, width = s0 * s1, s0 * (s1 - 1) + k0
        # whole rows of `step` samples, and enough after them that the row of the last whole
        # frame (it starts at most k0 samples before the end) has its whole window
        spill = width - k0
        x = F.pad(x, (0, spill + (step - (x.shape[1] + spill) % step) % step))
        rows = x.reshape(b, -1, step)
        reach = -(-width // step)  # rows one window spans
        count = rows.shape[1] - reach + 1
        parts = [rows[:, q : q + count] for q in range(reach - 1)]
        parts.append(rows[:, reach - 1 : reach - 1 + count, : width - (reach - 1) * step])
        windows = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        h = self._finish(0, (windows @ self.w0).reshape(b, count, s1, o0), whole[1]).reshape(b, count, s1 * o0)
        for i, (k, s, c, _) in enumerate(self.shape[1:], start=1):
            if i > 1:  # rows of s frames
                h = F.pad(h, (0, 0, 0, (s - h.shape[1] % s) % s)).reshape(b, -1, s * c)
            m = -(-k // s)  # blocks of s taps
            n = h.shape[1] - m + 1
            y = None
            for q in range(m):
                part = (h @ getattr(self, f"w{i}_{q}"))[:, q : q + n]
                y = part if y is None else y + part
            h = self._finish(i, y, whole[i + 1])
        return h[:, : whole[-1]].transpose(1, 2)

    def _finish(self, i: int, h: torch.Tensor, whole) -> torch.Tensor:
        """Bias, norm and activation of layer ``i`` on ``h`` (batch, time..., channel), whose
        first ``whole`` frames in time order are the input's whole ones."""
        layer = self.layers[i]
        if layer.conv.bias is not None:
            h = h + layer.conv.bias
        norm = getattr(layer, "layer_norm", None)
        if isinstance(norm, nn.GroupNorm):  # one group per channel: each channel over the whole frames
            axes = tuple(range(1, h.dim() - 1))
            order = torch.arange(h.shape[1] * (h.shape[2] if h.dim() == 4 else 1), device=h.device)
            keep = (order < whole).to(h.dtype).reshape(1, *h.shape[1:-1], 1)
            total = torch.as_tensor(whole, dtype=h.dtype)
            mean = (h * keep).sum(axes, keepdim=True) / total
            var = (((h - mean) * keep) ** 2).sum(axes, keepdim=True) / total
            h = (h - mean) * torch.rsqrt(var + norm.eps)
            if norm.affine:
                h = h * norm.weight + norm.bias
        elif norm is not None:
            h = norm(h)
        return layer.activation(h)


class _Graph(nn.Module):
    """A loaded CTC model as one traceable function of ``(waveforms, lengths)``."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.whisper = model.encoder.config.model_type == "whisper"
        if self.whisper:
            self.front_end = _WhisperFrontEnd(model.encoder.front_end.filters)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        samples = torch.ones_like(waveforms, dtype=torch.long).sum(1)
        # without lengths (sherpa-onnx, which scales each clip to unit variance first) the clip
        # is brought back to a speech level; lengths given (speechtl) leave the signal as it is
        gain = torch.where(lengths >= LENGTH_DEFAULT, SHERPA_LEVEL, 1.0).to(waveforms.dtype)
        waveforms = waveforms * gain[:, None]
        lengths = torch.minimum(lengths, samples)
        hidden, frames = self._whisper(waveforms, lengths) if self.whisper else self._wav2vec2(waveforms, lengths)
        logits = self.model.head(self._layer_sum(hidden), frames)
        return torch.log_softmax(logits.float(), dim=-1), frames

    def _layer_sum(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        # WeightedLayerSum's arithmetic, with the width a constant (the tracer cannot take it from a shape)
        ls = self.model.layer_sum
        if ls is None:
            return hidden[-1]
        x = torch.stack(hidden).float()
        if ls.layer_norm:
            x = F.layer_norm(x, (self.model.encoder.hidden_size,))
        w = torch.softmax(ls.weights, dim=0)
        return (x * w[:, None, None, None]).sum(0)

    def _whisper(self, wav: torch.Tensor, lengths: torch.Tensor):
        enc = self.model.encoder.model
        lengths = lengths.clamp(min=HOP)
        mel, mel_frames = self.front_end(wav, lengths)
        mel_valid = (torch.arange(mel.shape[-1], device=mel.device)[None, :] < mel_frames[:, None])[:, None, :]
        h = F.gelu(enc.conv1(mel)) * mel_valid
        h = F.gelu(enc.conv2(h)).transpose(1, 2)
        frames = torch.where(mel_frames > 0, torch.div(mel_frames - 1, 2, rounding_mode="floor") + 1,
                             torch.zeros_like(mel_frames))
        t = h.shape[1]
        h = h + enc.embed_positions.weight[:t]
        keep = torch.arange(t, device=h.device)[None, :] < frames[:, None]
        mask = torch.zeros_like(keep, dtype=h.dtype).masked_fill(~keep, torch.finfo(h.dtype).min)[:, None, None, :]
        states = [h]
        for layer in enc.layers:
            h = layer(h, mask)
            states.append(h)
        states[-1] = enc.layer_norm(h)
        return (states if self.model.layer_sum is not None else [states[-1]]), frames

    def _wav2vec2(self, wav: torch.Tensor, lengths: torch.Tensor):
        enc = self.model.encoder
        x, lengths = enc._prepare(wav, lengths)
        mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).long()
        all_layers = self.model.layer_sum is not None
        out = enc.model(x, attention_mask=mask, output_hidden_states=all_layers, return_dict=True)
        hs = list(out.hidden_states) if all_layers else [out.last_hidden_state]
        return hs, enc.frame_lengths(lengths)


# ----------------------------------------------------------------------------- checks


def check_exportable(model_dir: str | os.PathLike, lang: str | None = None) -> tuple[Path, dict]:
    """The model folder and its record, or :class:`ExportError` saying why it cannot go to ONNX."""
    model_dir = resolve_model_dir(model_dir)
    meta = read_meta(model_dir)
    if meta.get("mode") == "seq2seq":
        raise ExportError(
            f"{model_dir}: a seq2seq model (Whisper's own encoder-decoder) generates text token by token with an "
            "autoregressive decoder; speechtl's ONNX export covers CTC models (frozen, finetune, scratch, adapter), "
            "whose whole output comes from one pass. Transcribe it with speechtl.load() / speechtl transcribe.")
    if meta.get("adapter", {}).get("kind") == "mms":
        raise ExportError(
            f"{model_dir}: adapter=mms layers run in transformers' Wav2Vec2 modules, which speechtl does not trace to "
            "ONNX; train the language with adapter=lora (exported with its updates folded in), or export with "
            "--format hf for transformers.")
    pick_language(model_dir, meta, lang)
    return model_dir, meta


def tokens_txt(vocab: Vocabulary) -> str:
    """sherpa-onnx's ``tokens.txt``: ``symbol id`` per line; the CTC blank is ``<blk>``, the word
    delimiter ``▁`` (sherpa-onnx joins symbols and speechtl reads ``▁`` as a space)."""
    lines = []
    for i, t in enumerate(vocab.tokens):
        sym = "<blk>" if i == 0 else UNK_TEXT if i == vocab.unk_id else WORD_START if i == vocab.delimiter_id else t
        if not sym or any(c.isspace() for c in sym):
            raise ExportError(f"token {i} ({t!r}) has white space; tokens.txt cannot hold it")
        lines.append(f"{sym} {i}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- export


def export_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike, quantize: str | None = None,
                lang: str | None = None, lm: str | os.PathLike | None = None, alpha: float = 0.5, beta: float = 1.0,
                beam_width: int | None = None, float_layers: tuple[int, ...] | None = None,
                int8_cnn: bool | None = None) -> Path:
    """Write ``out_dir`` with ``model.onnx`` (or ``model.int8.onnx`` with ``quantize="int8"``),
    ``tokens.txt``, ``speechtl-onnx.json`` and the vocabulary and normaliser files; ``lm``
    (an ARPA or kenlm file) is copied in and becomes the folder's default decoder;
    ``float_layers``: transformer layers (0 = the first) that int8 leaves in float; None
    chooses by measurement (:func:`default_float_layers`). ``int8_cnn``: a wav2vec2-family
    CNN goes into the graph as matrix products (:class:`_MatmulCNN`), which int8 then
    covers, all but its first layer (on the raw waveform); None (the default) does so
    with ``quantize="int8"`` wherever the CNN allows it, False keeps the CNN in float
    (ONNX ``Conv``), True insists and is an error where it cannot be done. On the one
    trained wav2vec2 measured it moved CER by -0.002 against float32 and ran int8 at
    3.0x the unbatched transformers pipeline, against 1.7x with the CNN in float
    (benchmarks/README.md)."""
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize {quantize!r}: only int8 is supported")
    if lm is not None and not Path(lm).is_file():
        raise FileNotFoundError(f"{lm}: language model not found")
    model_dir, meta = check_exportable(model_dir, lang)
    if float_layers and quantize is None:
        raise ExportError("float_layers (--float-layers) is for --quantize int8")
    if int8_cnn and quantize is None:
        raise ExportError("int8_cnn (--int8-cnn) is for --quantize int8")
    model, vocab, normalizer, meta = load_model_dir(model_dir, lang=lang, inference=True)
    if quantize is None or int8_cnn is False:
        int8_cnn = False
    else:
        why = _matmul_cnn_problem(model)
        if why is not None and int8_cnn:
            raise ExportError(f"--int8-cnn: {why}")
        int8_cnn = why is None
        if int8_cnn:
            _use_matmul_cnn(model)
            logger.info("int8: the CNN feature encoder is written as matrix products and quantised, all but its "
                        "first layer (--float-cnn keeps it in float)")
    if float_layers is None:
        float_layers = default_float_layers(model.encoder.config) if quantize else ()
        if float_layers:
            logger.info("int8: transformer layer(s) %s stay in float (--float-layers '' quantises all)",
                        ",".join(map(str, float_layers)))
    if model.policy.adapters:
        from . import adapters as adapter_lib

        adapter_lib.set_lora_merged(model.encoder.model, True)
    enc = model.encoder
    per_clip = bool(getattr(enc, "per_clip_cnn", False))
    if hasattr(enc, "fast_cnn"):
        enc.fast_cnn = False  # the time-major CNN is a CPU speed-up of torch's; the graph takes the plain one
    graph = _Graph(model).eval()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        fp32 = tmp / "model.onnx"
        _trace(graph, fp32, per_clip)
        _add_length_default(fp32, vocab, meta, model)
        name = "model.onnx"
        if quantize == "int8":
            name = "model.int8.onnx"
            _quantize(fp32, tmp / name, tuple(float_layers))
            fp32.unlink()
        _check(graph, tmp / name, per_clip, quantize)
        write_text(tmp / "tokens.txt", tokens_txt(vocab))
        _write_side_files(tmp, model_dir, vocab, normalizer, model, meta, name, per_clip, lm, alpha, beta, beam_width,
                          int8_cnn)
    return out_dir


def _matmul_cnn_problem(model) -> str | None:
    """Why the model's CNN cannot be written as :class:`_MatmulCNN`, or None."""
    from ..encoders.fast_cnn import time_major_supported

    fe = getattr(getattr(model.encoder, "model", None), "feature_extractor", None)
    if model.encoder.config.model_type == "whisper" or fe is None:
        return (f"for wav2vec2-family encoders (their CNN feature encoder); this one is "
                f"{model.encoder.config.model_type}, whose convolutions are two small layers on log-mels")
    if not time_major_supported(fe):
        return ("this encoder's CNN has padded, dilated or grouped convolutions or another norm, which the "
                "matrix-product form does not cover")
    return None


def _use_matmul_cnn(model) -> None:
    """Trace the model's CNN as :class:`_MatmulCNN` (:func:`_matmul_cnn_problem` says None),
    once it has matched the convolutions on two clips of odd lengths."""
    fe = model.encoder.model.feature_extractor
    cnn = _MatmulCNN(fe.conv_layers)
    x = torch.randn(2, 16_001, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        ref, got = type(fe).forward(fe, x), cnn(x)
    if got.shape != ref.shape or not torch.allclose(got, ref, atol=1e-3, rtol=1e-3):
        raise ExportError("the CNN as matrix products does not match its convolutions on this encoder; "
                          "export with --float-cnn")
    fe.matmul_cnn = cnn
    fe.forward = fe.matmul_cnn.__call__  # the instance's forward (speechtl already replaces it per instance)


def default_float_layers(config) -> tuple[int, ...]:
    """Transformer layers int8 leaves in float unless told: the first layer of a Whisper-shaped
    encoder. Measured (benchmarks/README.md): on whisper-base every layer in int8 cost 0.0104
    CER against float32, over the 0.01 allowed, and 0.0069 with the first layer in float. On
    the 384-wide bundled encoder the first layer in float gives float32's transcripts on the
    demo's test set (21/21, against 17/21), brings sherpa-onnx's transcripts of real Spanish
    recordings within CER 0.0078 of speechtl's (0.0123 with every layer in int8), at the
    same speed and 5.3 MB more on disk. Other encoders were not measured and are quantised whole."""
    if getattr(config, "model_type", None) == "whisper":
        return (0,)
    return ()


def _example(batch: int, seconds: float = 1.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    s = int(seconds * 16_000)
    wav = torch.randn(batch, s, generator=g) * 0.1
    lengths = torch.tensor([s - 2_357 * k for k in range(batch)], dtype=torch.long)
    wav = wav * (torch.arange(s)[None, :] < lengths[:, None])
    return wav, lengths


def _trace(graph: _Graph, path: Path, per_clip: bool) -> None:
    wav, lengths = _example(1 if per_clip else 2)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(graph, (wav, lengths), str(path), input_names=["waveforms", "lengths"],
                          output_names=["log_probs", "frame_lengths"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"waveforms": {0: "batch", 1: "samples"}, "lengths": {0: "batch"},
                                        "log_probs": {0: "batch", 1: "frames"}, "frame_lengths": {0: "batch"}})


def _add_length_default(path: Path, vocab: Vocabulary, meta: dict, model) -> None:
    """Give ``lengths`` a default (one clip, the whole input) and write the model's metadata."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    m.graph.initializer.append(numpy_helper.from_array(np.array([LENGTH_DEFAULT], np.int64), "lengths"))
    props = {"model_type": "speechtl_ctc", "mode": meta["mode"], "vocab_size": str(len(vocab)),
             "units": units_of(vocab), "frame_rate": str(model.encoder.frame_rate), "sample_rate": "16000",
             "encoder": str(model.encoder.config.model_type), "comment": "speechtl export --format onnx"}
    helper.set_model_props(m, props)
    onnx.save(m, str(path))


FIRST_CNN_WEIGHT = "feature_extractor.matmul_cnn.w0"


def _float_matmuls(graph) -> list[str]:
    """MatMul nodes of ``graph`` (an ONNX GraphProto) that stay in float: the mel filter bank
    (the log after it would magnify int8 rounding of small energies; it is one small
    product) and the first layer of a matrix-product CNN (raw samples in, ten numbers a
    window: little to gain, much to lose)."""
    return [n.name for n in graph.node if n.op_type == "MatMul"
            and any(i.endswith("front_end.mel_filters") or i.endswith(FIRST_CNN_WEIGHT) for i in n.input)]


def _quantize(fp32: Path, int8: Path, float_layers: tuple[int, ...] = ()) -> None:
    """Dynamic int8 for the products with constant weights, but the mel filter bank and the
    transformer layers ``float_layers`` (whisper-base's first layer in int8 cost 0.0035 CER
    of the 0.0104 that all of them cost: benchmarks/README.md). A matrix-product CNN is
    quantised but its first layer; a CNN of ONNX ``Conv`` stays in float."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32)).graph
    names = [n.name for n in graph.node if n.op_type == "MatMul"]
    keep = _float_matmuls(graph) + [n for n in names if any(f"layers.{i}/" in n for i in float_layers)]
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs every tensor on the root logger
    try:
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         nodes_to_exclude=keep, extra_options={"MatMulConstBOnly": True})
    finally:
        logging.getLogger().setLevel(quiet)


def _check(graph: _Graph, path: Path, per_clip: bool, quantize: str | None) -> None:
    """Run the written file on a padded batch beside torch; a float graph that disagrees is an error."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the default-lengths input draws a warning
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    wav, lengths = _example(1 if per_clip else 3, seconds=2.1)
    lp, frames = sess.run(None, {"waveforms": wav.numpy(), "lengths": lengths.numpy()})
    with torch.inference_mode():
        ref, ref_frames = graph(wav, lengths)
    if not np.array_equal(frames, ref_frames.numpy()):
        raise ExportError(f"the exported graph gives {frames.tolist()} frames where torch gives {ref_frames.tolist()}")
    worst = max(float(np.abs(lp[i, :n] - ref[i, :n].numpy()).max()) for i, n in enumerate(frames))
    logger.info("%s: largest log-probability difference from torch on a padded batch: %.2g", path.name, worst)
    if quantize is None and worst > 1e-2:
        raise ExportError(f"the exported graph's log-probabilities differ from torch's by {worst:.3g}")


def _write_side_files(folder: Path, model_dir: Path, vocab, normalizer, model, meta: dict, name: str, per_clip: bool,
                      lm, alpha: float, beta: float, beam_width: int | None, int8_cnn: bool = False) -> None:
    from ..data.text import save_normalizer
    from ..data.units import save_vocabulary

    save_vocabulary(folder, vocab)
    save_normalizer(folder / "normalizer.json", normalizer)
    decoding = None
    if lm is not None:
        lm_name = "lm" + "".join(Path(lm).suffixes[-1:])
        shutil.copyfile(lm, folder / lm_name)
        decoding = {"lm": lm_name, "alpha": alpha, "beta": beta, "beam_width": beam_width}
    write_json(folder / ONNX_META_FILE, {
        "format": "speechtl-onnx", "version": 1, "model": name, "tokens": "tokens.txt",
        "mode": meta["mode"], "units": units_of(vocab), "vocab_size": len(vocab),
        "vocab": list(vocab.tokens), "blank": vocab.tokens.index(PAD), "unknown": UNK_TEXT,
        "language": model.language, "sample_rate": 16_000, "frame_rate": model.encoder.frame_rate,
        "max_seconds": min(model.encoder.max_seconds, 3600.0),
        "frames": _frame_rule(model.encoder), "one_clip_per_batch": per_clip,
        "quantized": "int8" if name.endswith(".int8.onnx") else None, "int8_cnn": int8_cnn, "decoding": decoding,
        "source": {"model_dir": str(model_dir), MODEL_FILE: {k: meta[k] for k in ("mode", "head", "encoder") if k in meta}},
    })


def _frame_rule(encoder) -> dict:
    """How many frames a clip of n samples gives, for a runtime without the encoder's code."""
    if encoder.config.model_type == "whisper":
        return {"kind": "whisper"}
    return {"kind": "conv", "kernels": list(encoder.kernels), "strides": list(encoder.strides)}
