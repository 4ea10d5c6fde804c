"""The model folder: writing, reading and switching languages.

A model directory holds ``speechtl.json`` (mode, head, output units, encoder record),
``encoder/`` (a standard HF model directory), ``head.safetensors``, ``vocab.json``
and ``normalizer.json``; a subword model (:mod:`speechtl.data.units`) also ``tokenizer.json``.
An adapter model holds, instead of the head, vocabulary and normaliser, for each
language ``adapter.<lang>.safetensors`` (adapter weights and head), ``vocab.<lang>.json``
and ``normalizer.<lang>.json``; ``encoder/`` is the base encoder, unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.constants import __version__
from ..core.io import atomic_dir, load_safetensors, write_json
from ..data.text import Normalizer, Vocabulary, load_normalizer, save_normalizer
from ..data.units import load_vocabulary, save_vocabulary, units_of
from ..encoders.native import is_native
from ..encoders.registry import load_encoder, save_encoder
from . import adapters as adapter_lib
from .adapters import AdapterConfig
from .ctc import CTCModel, HeadConfig
from .heads import build_head
from .modes import mode_policy

MODEL_FILE = "speechtl.json"


def language_files(lang: str) -> tuple[str, str, str]:
    """An adapter model's files for one language: adapter and head, vocabulary, normaliser."""
    return f"adapter.{lang}.safetensors", f"vocab.{lang}.json", f"normalizer.{lang}.json"


def save_model_dir(
    model: CTCModel,
    vocab: Vocabulary,
    normalizer: Normalizer,
    out_dir: str | os.PathLike,
    encoder_record: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a complete, reloadable model directory atomically. An adapter model's holds the
    base encoder, this language's files and those of the other languages it carries."""
    out_dir = Path(out_dir)
    if model.encoder is not None and is_native(model.encoder):
        raise ValueError("this model was loaded for inference only (speechtl's own encoder modules); load it with "
                         "speechtl.models.model_dir.load_model_dir(dir) to save or train it")
    with atomic_dir(out_dir) as tmp:
        if model.encoder is not None:
            save_encoder(model.encoder, tmp / "encoder")
        elif model.encoder_dir is not None:
            shutil.copytree(model.encoder_dir, tmp / "encoder")
        else:
            raise ValueError("the model has no encoder to save")
        head_state = {f"head.{k}": v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        if model.layer_sum is not None:
            head_state.update({f"layer_sum.{k}": v.detach().cpu().contiguous() for k, v in model.layer_sum.state_dict().items()})
        meta = {
            "speechtl_version": __version__,
            "mode": model.mode,
            "head": asdict(model.head_config),
            "vocab_size": len(vocab),
            "units": units_of(vocab),
            "sample_rate": 16_000,
            "encoder": {**model.encoder_info, **(encoder_record or {})},
        }
        if model.policy.adapters:
            meta.update(adapter=model.adapter_config.to_dict(), language=model.language,
                        languages=_write_languages(tmp, model, vocab, normalizer, head_state))
        else:
            save_file(head_state, str(tmp / "head.safetensors"))
            save_vocabulary(tmp, vocab)
            save_normalizer(tmp / "normalizer.json", normalizer)
        if model.layer_sum is not None:
            meta["layer_weights"] = [round(float(w), 4) for w in torch.softmax(model.layer_sum.weights.detach(), 0)]
        if extra:
            meta.update(extra)
        write_json(tmp / MODEL_FILE, meta)
    return out_dir


def _write_languages(folder: Path, model: CTCModel, vocab: Vocabulary, normalizer: Normalizer, head_state: dict) -> dict:
    """Write the model's language and the other languages it carries; their records by code."""
    languages = {}
    for lang, carried in model.other_languages.items():
        if lang != model.language:
            for name, data in carried["files"].items():
                (folder / name).write_bytes(data)
            languages[lang] = carried["meta"]
    weights, vocab_file, norm_file = language_files(model.language)
    state = {f"adapter.{k}": v for k, v in adapter_lib.adapter_state(model.encoder).items()} | head_state
    save_file(state, str(folder / weights),
              metadata={"format": "pt", "language": model.language, "adapter": model.adapter_config.kind})
    vocab.save(folder / vocab_file)
    save_normalizer(folder / norm_file, normalizer)
    languages[model.language] = {"vocab_size": len(vocab)}
    return dict(sorted(languages.items()))


def read_meta(model_dir: str | os.PathLike) -> dict:
    return json.loads((resolve_model_dir(model_dir) / MODEL_FILE).read_text(encoding="utf-8"))


def pick_language(model_dir: str | os.PathLike, meta: dict, lang: str | None) -> str | None:
    """The language to load from a model directory: ``lang`` if it has it (an error listing
    those it has otherwise), the one trained last when ``lang`` is None; None for a model
    without per-language adapters (where asking for a language is an error)."""
    if not mode_policy(meta["mode"]).adapters:
        if lang is not None:
            raise ValueError(f"{model_dir}: a {meta['mode']}-mode model has one language and no per-language adapters; "
                             f"a language ({lang!r}) can be chosen in models trained with mode=adapter")
        return None
    have = sorted(meta.get("languages", {}))
    if lang is None:
        return meta.get("language") or have[0]
    if lang not in have:
        raise ValueError(f"{model_dir}: no adapter for language {lang!r}; this model has {', '.join(have) or 'none'}")
    return lang


def _read_language(model_dir: Path, lang: str) -> tuple[Vocabulary, Normalizer, dict, dict]:
    """One language of an adapter model: vocabulary, normaliser, adapter and head weights."""
    weights, vocab_file, norm_file = language_files(lang)
    for name in (weights, vocab_file, norm_file):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir}: {name} is missing (speechtl.json lists language {lang!r})")
    state = load_safetensors(model_dir / weights)
    adapters = {k[8:]: v for k, v in state.items() if k.startswith("adapter.")}
    head = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    return Vocabulary.load(model_dir / vocab_file), load_normalizer(model_dir / norm_file), adapters, head


def use_language(model: CTCModel, model_dir: str | os.PathLike, lang: str) -> tuple[Vocabulary, Normalizer]:
    """Put ``lang``'s adapters and head (from ``model_dir``) into an adapter model in place:
    the base encoder is not touched. Returns the language's vocabulary and normaliser."""
    model_dir = resolve_model_dir(model_dir)
    if not model.policy.adapters:
        raise ValueError(f"a {model.mode}-mode model has no per-language adapters to switch")
    lang = pick_language(model_dir, read_meta(model_dir), lang)
    vocab, normalizer, adapters, head = _read_language(model_dir, lang)
    adapter_lib.load_adapter_state(model.encoder, adapters, where=str(model_dir / language_files(lang)[0]))
    if head["proj.weight"].shape[0] != model.head.proj.out_features:  # another character set: another output layer
        old = next(model.head.parameters())
        model.head = build_head("linear", model.head.proj.in_features, head["proj.weight"].shape[0],
                                model.head_config.dropout).to(device=old.device, dtype=old.dtype).train(model.training)
    model.head.load_state_dict(head)
    model.language = lang
    return vocab, normalizer


def load_model_normalizer(model_dir: str | os.PathLike, lang: str | None = None) -> Normalizer:
    """The normaliser of a model directory (of ``lang``, or the default language, in an adapter model)."""
    model_dir = resolve_model_dir(model_dir)
    lang = pick_language(model_dir, read_meta(model_dir), lang)
    return load_normalizer(model_dir / ("normalizer.json" if lang is None else language_files(lang)[2]))


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model directory, or a training run's folder (its ``model/``)."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    if (path / "model" / MODEL_FILE).is_file():
        return path / "model"
    raise FileNotFoundError(f"{path}: not a speechtl model directory or training run (no {MODEL_FILE} in it or in "
                            f"its model/)")


def load_model_dir(model_dir: str | os.PathLike, device: str | torch.device = "cpu",
                   lang: str | None = None, inference: bool = False) -> tuple[CTCModel, Vocabulary, Normalizer, dict]:
    """Load what :func:`save_model_dir` wrote; the model comes back in eval mode. ``lang``
    chooses the language of an adapter model (default: the one trained last).
    ``inference``: the model will only decode, so its encoder may be speechtl's own
    modules (see :func:`speechtl.encoders.registry.load_encoder`), LoRA updates folded into its
    weights; models with MMS adapter layers load through transformers."""
    model_dir = resolve_model_dir(model_dir)
    meta = read_meta(model_dir)
    lang = pick_language(model_dir, meta, lang)
    lora_or_none = not mode_policy(meta["mode"]).adapters or meta.get("adapter", {}).get("kind") == "lora"
    encoder = load_encoder(str(model_dir / "encoder"), inference=inference and lora_or_none)
    encoder.source = meta["encoder"].get("source", encoder.source)
    head = HeadConfig(**meta["head"])
    if lang is not None:
        adapter = AdapterConfig.from_dict(meta["adapter"])
        model = CTCModel(encoder, meta["languages"][lang]["vocab_size"], meta["mode"], head, encoder.num_layers,
                         encoder.hidden_size, adapter=adapter, language=lang)
        vocab, normalizer = use_language(model, model_dir, lang)
        return model.to(device).eval(), vocab, normalizer, meta
    vocab = load_vocabulary(model_dir, meta)
    normalizer = load_normalizer(model_dir / "normalizer.json")
    model = CTCModel(encoder, len(vocab), meta["mode"], head, encoder.num_layers, encoder.hidden_size)
    state = load_safetensors(model_dir / "head.safetensors")
    model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
    if model.layer_sum is not None:
        model.layer_sum.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("layer_sum.")})
    return model.to(device).eval(), vocab, normalizer, meta
