"""Whisper's own decoder, unadapted, scored with speechtl's metrics: the baseline a user
would get without adapting anything.

Greedy decoding (``num_beams=1``, no sampling, no temperature fallback) with the language
and transcribe tokens forced, through ``transformers``' ``WhisperForConditionalGeneration``
and its processor (each clip padded to 30 s, as Whisper was trained). Hypotheses and
references go through the same normaliser as speechtl's models (lower case, no
punctuation), so the rates sit in the same table.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from tqdm import tqdm

from ..data.audio import load_audio
from ..data.manifest import Utterance
from ..data.text import Normalizer
from ..decoding.metrics import UtteranceResult, score, write_results

logger = logging.getLogger(__name__)


def whisper_zero_shot(model_dir: str, utterances: Sequence[Utterance], language: str | None = None, batch_size: int = 8,
                      device: str = "cpu", progress: bool = False, out_dir: str | os.PathLike | None = None,
                      normalizer: Normalizer | None = None) -> dict:
    """Transcribe ``utterances`` with Whisper (``model_dir``: a transformers Whisper
    directory, ``whisper-base`` once fetched, or a hub id) and score them; returns the
    summary (``wer``, ``cer``, ...) and, with ``out_dir``, writes hyps.jsonl, errs.txt and
    summary.json there. ``language``: a Whisper language code (``cs``); None lets the model
    detect it (English-only models need none)."""
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    from ..data.audio import check_readable
    from ..encoders.registry import resolve_encoder

    # before any work: every file readable (all bad ones named at once), none beyond Whisper's 30 s
    check_readable(utterances)
    long = [u.id for u in utterances if u.duration > 30.0]
    if long:
        raise ValueError(f"zero-shot scoring takes clips of at most 30 s; {len(long)} are longer (first: {long[0]})")
    source = resolve_encoder(model_dir)
    processor = AutoProcessor.from_pretrained(source)
    model = WhisperForConditionalGeneration.from_pretrained(source, use_safetensors=True).to(device).eval()
    multilingual = bool(getattr(model.generation_config, "is_multilingual", True))
    # at most 224 new tokens per 30 s window, as OpenAI's own decoding options (sample_len) have it
    gen = {"num_beams": 1, "do_sample": False, "max_new_tokens": 224}
    if multilingual:
        gen["task"] = "transcribe"
        if language:
            gen["language"] = language
    elif language and language != "en":
        logger.warning("%s is English-only; ignoring language=%s", model_dir, language)
    order = sorted(range(len(utterances)), key=lambda i: utterances[i].duration)
    hyps: dict[str, str] = {}
    with tqdm(total=len(order), desc="whisper", unit="utt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = [utterances[i] for i in order[start:start + batch_size]]
            audio = [load_audio(u.audio) for u in batch]
            inputs = processor(audio, sampling_rate=16_000, return_tensors="pt", return_attention_mask=True)
            with torch.inference_mode():
                ids = model.generate(inputs.input_features.to(device), attention_mask=inputs.attention_mask.to(device), **gen)
            for u, text in zip(batch, processor.batch_decode(ids, skip_special_tokens=True)):
                hyps[u.id] = text.strip()
            bar.update(len(batch))
    norm = normalizer or Normalizer()
    report = score([UtteranceResult(u.id, u.text, hyps[u.id], u.duration) for u in utterances], normalize=norm)
    extra = {"model": str(model_dir), "decoder": "whisper greedy", "language": language}
    if out_dir is not None:
        return write_results(report, out_dir, extra)
    return report.summary() | extra
