"""Export to a standard transformers model directory.

``finetune`` and ``scratch`` models have exactly the ``*ForCTC`` shape (encoder, then
dropout and a linear layer on the last hidden state), so they export losslessly as
the encoder family's ``*ForCTC`` class plus a ``Wav2Vec2Processor``; the result
loads in ``transformers.pipeline("automatic-speech-recognition", model=DIR)``.

``frozen`` models read a weighted sum of *all* encoder layers (and may use a BiLSTM
head); no standard ``*ForCTC`` class computes that, so they are refused with an
explanation rather than exported approximately.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._io import atomic_dir, write_json
from .model import load_model_dir
from .text import UNK_TEXT


class ExportError(ValueError):
    pass


def export_hf(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir`` with config, safetensors weights, vocab and processor configs."""
    from transformers import AutoModelForCTC, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    model, vocab, _normalizer, meta = load_model_dir(model_dir)
    if model.mode == "frozen":
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
    config = enc.config.__class__.from_dict(enc.config.to_dict())
    config.vocab_size = len(vocab)
    config.pad_token_id = vocab.pad_id
    config.ctc_loss_reduction = "mean"
    config.ctc_zero_infinity = True
    config.final_dropout = model.head_config.dropout
    config.architectures = None
    ctc = AutoModelForCTC.from_config(config)
    base = getattr(ctc, ctc.base_model_prefix)
    base.load_state_dict(enc.model.state_dict())
    ctc.lm_head.load_state_dict(model.head.proj.state_dict())
    ctc.eval()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        ctc.save_pretrained(str(tmp), safe_serialization=True)
        # the unknown token is written as speechtl writes it (UNK_TEXT), so transcripts agree
        write_json(tmp / "vocab.json", {(UNK_TEXT if i == vocab.unk_id else t): i for i, t in enumerate(vocab.tokens)})
        tokenizer = Wav2Vec2CTCTokenizer(
            str(tmp / "vocab.json"), unk_token=UNK_TEXT, pad_token="<pad>", word_delimiter_token="|", bos_token=None, eos_token=None
        )
        extractor = Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=enc.normalize_waveform,
            return_attention_mask=not enc.per_clip_cnn,
        )
        Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(str(tmp))
    return out_dir
