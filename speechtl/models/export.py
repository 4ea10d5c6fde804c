"""Export to a standard transformers model directory.

``finetune`` and ``scratch`` models have exactly the ``*ForCTC`` shape (encoder, then
dropout and a linear layer on the last hidden state), so they export losslessly as
the encoder family's ``*ForCTC`` class plus a ``Wav2Vec2Processor``; the result
loads in ``transformers.pipeline("automatic-speech-recognition", model=DIR)``.

``adapter`` models export as well:

- ``adapter=mms`` (stable-layer-norm wav2vec2 encoders) as MMS checkpoints are laid out:
  a ``Wav2Vec2ForCTC`` with ``adapter_attn_dim``, one ``adapter.<lang>.safetensors`` per
  language (its adapter layers and ``lm_head``) and a tokenizer whose ``vocab.json``
  holds every language's vocabulary. ``model.load_adapter(lang)`` with
  ``processor.tokenizer.set_target_lang(lang)`` switches language. A post-layer-norm
  wav2vec2 encoder (wav2vec2-base style) is refused: transformers runs adapter layers
  only in stable-layer-norm layers.
- ``adapter=lora``: one language per export, its LoRA updates folded into the weights
  (``W + B A * alpha / rank``), as a plain ``*ForCTC``. Folding changes the order of the
  float operations, so logits agree to rounding, not bit for bit.

Subword models (``units=bpe:N`` / ``unigram:N``) export with a ``Wav2Vec2CTCTokenizer``
whose ``vocab.json`` spells each piece as it decodes: the word-start marker "▁" as a
space (``▁ab`` is `` ab``). That tokenizer groups repeats, drops blanks and joins the
tokens, so the pipeline's text is speechtl's. What it cannot do is split pieces: it
encodes text into characters and the pipeline's ``return_timestamps="word"`` finds words
at lone spaces only; the model folder's ``tokenizer.json`` encodes text into the pieces.

``frozen`` models read a weighted sum of *all* encoder layers (and may use a BiLSTM
head); no standard ``*ForCTC`` class computes that, so they are refused with an
explanation rather than exported approximately.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from ..core.io import atomic_dir, load_safetensors, write_json
from ..data.text import UNK_TEXT, Vocabulary
from ..data.units import WORD_START
from . import adapters as adapter_lib
from .model_dir import language_files, load_model_dir, pick_language, read_meta, resolve_model_dir


class ExportError(ValueError):
    pass


def _vocab_dict(vocab: Vocabulary) -> dict[str, int]:
    # the unknown token is written as speechtl writes it (UNK_TEXT), so transcripts agree; a
    # subword piece as it decodes ("▁ab" -> " ab"): the tokenizer then joins pieces into speechtl's text
    subword = vocab.delimiter_id is None
    return {(UNK_TEXT if i == vocab.unk_id else t.replace(WORD_START, " ") if subword and i != vocab.pad_id else t): i
            for i, t in enumerate(vocab.tokens)}


def export_hf(model_dir: str | os.PathLike, out_dir: str | os.PathLike, lang: str | None = None) -> Path:
    """Write ``out_dir`` with config, safetensors weights, vocab and processor configs.
    ``lang``: for adapter models, the language loaded by default (mms) or exported (lora)."""
    from transformers import AutoModelForCTC, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    model_dir = resolve_model_dir(model_dir)
    pick_language(model_dir, read_meta(model_dir), lang)  # a language the model lacks is named before any loading
    model, vocab, _normalizer, meta = load_model_dir(model_dir, lang=lang)
    if model.policy.layer_sum:
        raise ExportError(
            f"{model_dir}: frozen-mode models combine all {model.encoder.num_layers} encoder layers with learned weights"
            f" and a {model.head_config.kind} head, which no transformers *ForCTC class represents. Load them with"
            " speechtl.load(), or train with mode=finetune to get an exportable model."
        )
    if getattr(model.encoder.config, "model_type", "") == "whisper":
        raise ExportError(
            f"{model_dir}: a CTC head on Whisper's encoder has no transformers *ForCTC class (transformers' Whisper"
            " classes are sequence-to-sequence, and WhisperForAudioClassification classifies whole clips)."
            " Load it with speechtl.load(); its encoder/ folder is a standard transformers Whisper directory."
        )
    enc = model.encoder
    adapter = model.adapter_config
    mms = adapter is not None and adapter.kind == "mms"
    if mms and not getattr(enc.config, "do_stable_layer_norm", False):
        raise ExportError(
            f"{model_dir}: its MMS-style adapters sit in a post-layer-norm wav2vec2 encoder (do_stable_layer_norm="
            "false, wav2vec2-base style); transformers' Wav2Vec2ForCTC runs adapter layers only in stable-layer-norm"
            " layers (MMS, XLS-R), so the export would silently drop them. Load it with speechtl.load(dir, lang=...),"
            " or train the adapters on a stable-layer-norm encoder (or with adapter=lora, which exports per language)."
        )
    state = adapter_lib.base_state_dict(enc.model, getattr(enc, "adapter_keys", ()))
    if adapter is not None and adapter.kind == "lora":
        state = adapter_lib.lora_merged(state, adapter_lib.adapter_state(enc), adapter)
    config = enc.config.__class__.from_dict(enc.config.to_dict())
    config.vocab_size = len(vocab)
    config.pad_token_id = vocab.pad_id
    config.ctc_loss_reduction = "mean"
    config.ctc_zero_infinity = True
    config.final_dropout = model.head_config.dropout
    config.architectures = None
    if mms:
        config.adapter_attn_dim = adapter.dim
    ctc = AutoModelForCTC.from_config(config)
    base = getattr(ctc, ctc.base_model_prefix)
    if mms:
        state.update(adapter_lib.adapter_state(enc))  # the default language's adapters, as MMS checkpoints hold
    base.load_state_dict(state)
    ctc.lm_head.load_state_dict(model.head.proj.state_dict())
    ctc.eval()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        ctc.save_pretrained(str(tmp), safe_serialization=True)
        if mms:
            vocabs = _write_mms_adapters(tmp, model_dir, meta, ctc.base_model_prefix)
            write_json(tmp / "vocab.json", vocabs)
            tokenizer = Wav2Vec2CTCTokenizer(str(tmp / "vocab.json"), unk_token=UNK_TEXT, pad_token="<pad>",
                                             word_delimiter_token="|", bos_token=None, eos_token=None,
                                             target_lang=model.language)
        else:
            write_json(tmp / "vocab.json", _vocab_dict(vocab))
            tokenizer = Wav2Vec2CTCTokenizer(
                str(tmp / "vocab.json"), unk_token=UNK_TEXT, pad_token="<pad>", word_delimiter_token="|", bos_token=None, eos_token=None
            )
        extractor = Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=enc.normalize_waveform,
            return_attention_mask=not enc.per_clip_cnn,
        )
        Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(str(tmp))
    return out_dir


def _write_mms_adapters(folder: Path, model_dir: Path, meta: dict, prefix: str) -> dict[str, dict[str, int]]:
    """Every language's ``adapter.<lang>.safetensors`` under the names ``Wav2Vec2ForCTC.load_adapter``
    reads; returns the vocabularies by language (the tokenizer's nested ``vocab.json``)."""

    vocabs = {}
    for lang in sorted(meta["languages"]):
        weights, vocab_file, _ = language_files(lang)
        state = load_safetensors(model_dir / weights)
        out = {f"{prefix}.{k[len('adapter.'):]}": v for k, v in state.items() if k.startswith("adapter.")}
        out.update({f"lm_head.{k[len('head.proj.'):]}": v for k, v in state.items() if k.startswith("head.proj.")})
        save_file(out, str(folder / weights), metadata={"format": "pt"})
        vocabs[lang] = _vocab_dict(Vocabulary.load(model_dir / vocab_file))
    return vocabs
