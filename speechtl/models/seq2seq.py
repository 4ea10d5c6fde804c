"""Whisper's own encoder-decoder as a speechtl model (``mode=seq2seq``): the folder format,
loading and decoding (the recogniser is :mod:`speechtl.inference.seq2seq`).

A seq2seq model folder holds ``speechtl.json`` (``"mode": "seq2seq"``, the language, what
was trained) and ``whisper/``, a complete transformers Whisper folder (weights, tokenizer,
feature extractor, generation config) that ``WhisperForConditionalGeneration`` loads as
it is. A LoRA model keeps its base in ``whisper/`` and its updates in ``lora/`` (a peft
adapter folder, a few MB per language). A model trained with ``seq2seq_ctc`` also has
``ctc/``, the CTC head of hybrid decoding (:mod:`speechtl.models.seq2seq_ctc`).

Decoding pads each clip to Whisper's 30 s window, as it was trained, and keeps the
encoder frames of the clip itself plus ``CONTEXT_MARGIN_S`` of the padding after it:
the decoder then attends to a few hundred frames instead of 1,500 (training does the
same, so the two match). Recordings longer than 30 s are decoded in consecutive 30 s
windows, each a segment with its window's times. Unlike CTC, the decoder has no frame
alignment: segments carry times, words do not.

A model trained with ``seq2seq_window=clip`` (modes that train the encoder) instead runs
the encoder on each batch's longest clip plus the margin, not the whole 30 s window, as
ESPnet's Whisper encoder does without its pad-or-trim: the attention then covers a few
hundred frames instead of 1,500, several times cheaper for short clips. Its folder says so
(``"window": "clip"`` in ``speechtl.json``) and decodes the same way.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..core.io import atomic_dir, write_json
from ..data.audio import SAMPLE_RATE
from ..data.text import Normalizer, load_normalizer, save_normalizer

logger = logging.getLogger(__name__)

WINDOW_S = 30.0
CONTEXT_MARGIN_S = 1.0  # padding frames kept after the clip: the decoder sees where speech ends
ENCODER_FRAME_S = 0.02
MAX_NEW_TOKENS = 224  # per 30 s window, as OpenAI's decoding options have it
WINDOWS = ("30", "clip")  # seq2seq_window: Whisper's 30 s window, or each batch's longest clip plus the margin
TOKENS_PER_S = 15  # fast speech is about 5 words a second, a word at most 2-3 of Whisper's tokens


def whisper_source(encoder: str) -> str:
    """The transformers Whisper folder (or hub id) ``encoder`` names, checked to hold a
    decoder: ``mode=seq2seq`` fine-tunes Whisper's own decoder, which other encoder
    families and the bundled encoder (an encoder alone) do not have."""
    from ..encoders.registry import resolve_encoder

    source = resolve_encoder(encoder)
    path = Path(source)
    if path.is_dir():
        import json

        cfg_file = path / "config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        if cfg.get("model_type") != "whisper":
            raise ValueError(f"config key 'encoder': mode=seq2seq fine-tunes a Whisper encoder-decoder; {encoder!r} "
                             f"({source}) is a {cfg.get('model_type') or 'non-transformers'} model. Use whisper-base or "
                             "whisper-tiny.en (tools/fetch_encoder.sh) or a transformers Whisper folder")
        if not cfg.get("decoder_layers") or not _has_decoder_weights(path):
            raise ValueError(f"config key 'encoder': {encoder!r} ({source}) is a Whisper encoder without its decoder; "
                             "mode=seq2seq needs the whole model (e.g. whisper-base from tools/fetch_encoder.sh)")
    elif "whisper" not in source.lower():
        raise ValueError(f"config key 'encoder': mode=seq2seq fine-tunes a Whisper encoder-decoder; {encoder!r} is not one")
    return source


def _has_decoder_weights(path: Path) -> bool:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as st:
            if any(".decoder." in k or k.startswith("decoder.") for k in st.keys()):
                return True
    return not files  # other formats: transformers will say what is missing


def language_token(tokenizer, lang: str | None) -> str | None:
    """Whisper's name for ``lang`` (``cs`` or ``czech``), or an error listing the codes it has;
    None for English-only models."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    if not _multilingual(tokenizer):
        if lang not in (None, "en", "english"):
            raise ValueError(f"config key 'lang': {lang!r}, but this Whisper model is English-only; use a multilingual "
                             "one (whisper-base)")
        return None
    if lang is None:
        raise ValueError("config key 'lang': mode=seq2seq needs the language Whisper should write (e.g. lang=ro); "
                         "the training manifest names none")
    code = lang.lower().split("-")[0].split("_")[0]
    code = TO_LANGUAGE_CODE.get(code, code)
    if code not in LANGUAGES:
        raise ValueError(f"config key 'lang': Whisper has no language {lang!r}; it has {', '.join(sorted(LANGUAGES))}")
    return code


def _multilingual(tokenizer) -> bool:
    return "<|ro|>" in tokenizer.get_vocab()


def prefix_ids(tokenizer, lang: str | None) -> list[int]:
    """The forced start of every target: start of transcript, language, task, no timestamps."""
    ids = [tokenizer.convert_tokens_to_ids("<|startoftranscript|>")]
    if lang is not None:
        ids += [tokenizer.convert_tokens_to_ids(f"<|{lang}|>"), tokenizer.convert_tokens_to_ids("<|transcribe|>")]
    return ids + [tokenizer.convert_tokens_to_ids("<|notimestamps|>")]


def kept_frames(samples: int, total: int) -> int:
    """Encoder frames of a clip of ``samples`` kept for the decoder (its own and the margin),
    at most ``total``."""
    return int(min(total, np.ceil((samples / SAMPLE_RATE + CONTEXT_MARGIN_S) / ENCODER_FRAME_S)))


def encode(model, processor, waveforms: Sequence[np.ndarray], device, grad: bool = False,
           window: str = "30") -> list[torch.Tensor]:
    """Encoder outputs of clips of at most 30 s, float32. ``window="30"``: each clip padded
    to the 30 s window as Whisper was trained, (1500, D) per clip; ``"clip"``: the batch's
    longest clip plus the margin (see :func:`kept_frames`), (T, D) per clip. ``grad``: keep
    the graph (training the encoder)."""
    if window not in WINDOWS:
        raise ValueError(f"seq2seq window {window!r} is not one of {', '.join(WINDOWS)}")
    feats = processor.feature_extractor(list(waveforms), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    encoder = model.get_encoder()
    with torch.set_grad_enabled(grad):
        if window == "clip":
            # the log-mel frames of the 30 s window, cut: the same as those of the clip padded less
            t = max(kept_frames(len(w), encoder.config.max_source_positions) for w in waveforms)
            hidden = encode_frames(encoder, feats[..., : 2 * t].to(device, model.dtype))
        else:
            hidden = encoder(feats.to(device, model.dtype)).last_hidden_state
    return list(hidden)


def encode_frames(encoder, feats: torch.Tensor) -> torch.Tensor:
    """Whisper's encoder on (B, mels, 2T) log-mel frames, T at most its 1,500 positions:
    its own layers, the position table cut to T. transformers' forward takes the 30 s window
    only."""
    h = torch.nn.functional.gelu(encoder.conv1(feats))
    h = torch.nn.functional.gelu(encoder.conv2(h)).permute(0, 2, 1)
    if h.shape[1] > encoder.embed_positions.weight.shape[0]:
        raise ValueError(f"{h.shape[1]} encoder frames: more than Whisper's {encoder.embed_positions.weight.shape[0]}")
    h = h + encoder.embed_positions.weight[: h.shape[1]]
    h = torch.nn.functional.dropout(h, p=encoder.dropout, training=encoder.training)
    for layer in encoder.layers:
        if encoder.training and encoder.layerdrop > 0 and torch.rand([]) < encoder.layerdrop:
            continue
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
    return encoder.layer_norm(h)


def stack_hidden(hidden: Sequence[torch.Tensor], samples: Sequence[int]) -> torch.Tensor:
    """(B, T, D) encoder outputs for the decoder: every clip keeps the frames of the longest
    clip in the batch plus the margin (see :func:`kept_frames`), its own window's frames."""
    t = max(kept_frames(n, hidden[0].shape[0]) for n in samples)
    return torch.stack([h[:t] for h in hidden])


@torch.inference_mode()
def generate(model, tokenizer, hidden: Sequence[torch.Tensor], samples: Sequence[int], lang: str | None,
             num_beams: int = 1, with_confidence: bool = False, nbest: bool = False):
    """Greedy (or beam) decoding from encoder outputs (see :func:`encode`), the prefix
    forced. Texts; with ``with_confidence``, (text, confidence) pairs, the confidence being
    the geometric mean of the chosen tokens' probabilities (end of text included; with
    beams, the beam's length-normalised probability). ``nbest``: each clip's beams, best
    first, as lists of (text, confidence)."""
    from transformers.generation.utils import GenerationMixin
    from transformers.modeling_outputs import BaseModelOutput

    states = stack_hidden(hidden, samples).to(model.dtype)
    start = torch.tensor([prefix_ids(tokenizer, lang)] * len(hidden), device=states.device)
    room = model.config.max_target_positions - start.shape[1]
    # a looping decoder stops where no speech could: at most TOKENS_PER_S per second of the longest clip
    cap = int(np.ceil(TOKENS_PER_S * max(samples) / SAMPLE_RATE)) + 10
    kw = dict(encoder_outputs=BaseModelOutput(last_hidden_state=states), decoder_input_ids=start,
              max_new_tokens=min(MAX_NEW_TOKENS, room, cap), max_length=None, num_beams=num_beams, do_sample=False,
              return_dict_in_generate=True)
    if nbest and num_beams > 1:
        # Whisper's own generate expands only input features for several returned sequences;
        # the generic one expands the encoder outputs given here
        # (a peft model's LoRA layers live in its base model, which generates with them)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        out = GenerationMixin.generate(base, **kw, num_return_sequences=num_beams, output_scores=True)
        texts = [t.strip() for t in tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
        conf = out.sequences_scores.exp().tolist()
        return [list(zip(texts[b * num_beams:(b + 1) * num_beams], conf[b * num_beams:(b + 1) * num_beams]))
                for b in range(len(hidden))]
    out = model.generate(**kw, output_scores=with_confidence or nbest)
    texts = [t.strip() for t in tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
    if not (with_confidence or nbest):
        return texts
    if num_beams > 1:
        conf = out.sequences_scores.exp().tolist()
    else:
        steps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)  # (B, new tokens)
        new = out.sequences[:, -steps.shape[1]:]
        eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        # tokens after the first end of text are padding
        keep = torch.cumsum((new == eot).long(), 1) - (new == eot).long() == 0
        conf = ((steps * keep).sum(1) / keep.sum(1).clamp(min=1)).exp().tolist()
    return [[p] for p in zip(texts, conf)] if nbest else list(zip(texts, conf))


def looping(text: str, n: int = 3, times: int = 4) -> bool:
    """A hypothesis that repeats one word ``n``-gram at least ``times`` times running: the
    decoder looping, which CTC cannot do."""
    words = text.split()
    for size in range(1, n + 1):
        for i in range(len(words) - size * times + 1):
            gram = words[i:i + size]
            if all(words[i + k * size:i + (k + 1) * size] == gram for k in range(1, times)):
                return True
    return False


def hallucinated(ref: str, hyp: str) -> bool:
    """A hypothesis more than twice the reference's length plus ten characters."""
    return len(hyp) > 2 * len(ref) + 10


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------- the model folder

MODEL_FILE = "speechtl.json"


def save_seq2seq(model, processor, normalizer: Normalizer, out_dir: str | os.PathLike, meta: dict, ctc=None,
                 decoding: dict | None = None) -> Path:
    """Write a seq2seq model folder atomically. A peft model (LoRA) writes its base to
    ``whisper/`` and its adapter to ``lora/``; others write the whole model to ``whisper/``.
    ``ctc``: a :class:`speechtl.models.seq2seq_ctc.Companion`, written to ``ctc/``;
    ``decoding``: the folder's own decoding record (``decoding.json``, e.g. its beam width)."""
    from ..core.constants import __version__

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if hasattr(model, "peft_config"):
            model.save_pretrained(str(tmp / "lora"))
            base = meta.get("base_source")
            if base and Path(base).is_dir():
                shutil.copytree(base, tmp / "whisper", ignore=shutil.ignore_patterns("*.bin", ".*"))
            else:
                model.get_base_model().save_pretrained(str(tmp / "whisper"), safe_serialization=True)
        else:
            model.save_pretrained(str(tmp / "whisper"), safe_serialization=True)
        processor.save_pretrained(str(tmp / "whisper"))
        save_normalizer(tmp / "normalizer.json", normalizer)
        if ctc is not None:
            from .seq2seq_ctc import CTC_DIR

            ctc.save(tmp / CTC_DIR)
        if decoding is not None:
            from ..core.constants import DECODING_FILE

            write_json(tmp / DECODING_FILE, decoding)
        write_json(tmp / MODEL_FILE, {"speechtl_version": __version__, "mode": "seq2seq", "sample_rate": SAMPLE_RATE,
                                      **meta})
    return out_dir


def load_seq2seq(model_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, processor, normalizer, meta) of a seq2seq folder, in eval mode; LoRA updates
    are merged into the base weights for decoding."""
    import json

    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / MODEL_FILE).read_text(encoding="utf-8"))
    model = WhisperForConditionalGeneration.from_pretrained(str(model_dir / "whisper"), use_safetensors=True)
    if (model_dir / "lora").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(model_dir / "lora")).merge_and_unload()
    processor = WhisperProcessor.from_pretrained(str(model_dir / "whisper"))
    normalizer = load_normalizer(model_dir / "normalizer.json")
    return model.to(device).eval(), processor, normalizer, meta
