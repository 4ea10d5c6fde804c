"""The CTC recogniser: an encoder and a head joined by a thin wrapper, and its model directory.

The training modes differ only in what is trainable:

- ``frozen``: encoder fixed and in eval mode; a weighted sum of all its layers feeds
  a ``linear`` or ``bilstm`` head.
- ``finetune``: pretrained encoder + linear head on the last layer (the
  ``Wav2Vec2ForCTC`` shape); the CNN feature encoder stays frozen.
- ``scratch``: ``finetune``'s architecture with random encoder weights.
- ``adapter``: the pretrained encoder fixed, small adapters in it (LoRA or MMS-style,
  :mod:`speechtl.models.adapters`) and a linear head on the last layer train; one set of
  adapters and head per language beside one base encoder.

A model directory holds ``speechtl.json`` (mode, head, output units, encoder record),
``encoder/`` (a standard HF model directory), ``head.safetensors``, ``vocab.json``
and ``normalizer.json``; a subword model (:mod:`speechtl.data.units`) also ``tokenizer.json``.
An adapter model holds, instead of the head, vocabulary and normaliser, for each
language ``adapter.<lang>.safetensors`` (adapter weights and head), ``vocab.<lang>.json``
and ``normalizer.<lang>.json``; ``encoder/`` is the base encoder, unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.constants import __version__
from ..core.io import atomic_dir, write_json
from ..data.text import Normalizer, Vocabulary, load_normalizer, save_normalizer
from ..data.units import describe_units, load_vocabulary, save_vocabulary, units_of
from ..encoders.base import mask_spans, transformer_layers
from ..encoders.native import is_native
from ..encoders.registry import load_encoder, save_encoder
from ..encoders.wav2vec2 import SpeechEncoder, parameter_groups
from . import adapters as adapter_lib
from .adapters import AdapterConfig
from .heads import WeightedLayerSum, build_head

MODES = ("frozen", "finetune", "scratch", "adapter")
MODEL_FILE = "speechtl.json"


@dataclass(frozen=True)
class HeadConfig:
    kind: str = "linear"  # linear | bilstm (bilstm: frozen mode only)
    dropout: float = 0.1  # dropout before (and inside) the head
    hidden_size: int = 256  # BiLSTM hidden units per direction
    num_layers: int = 2  # BiLSTM layers


class CTCModel(nn.Module):
    """Encoder + head. ``forward(waveforms (B,S), lengths (B,))`` gives
    ``(logits (B,T,V), frame_lengths (B,))``."""

    def __init__(self, encoder: SpeechEncoder | None, vocab_size: int, mode: str, head: HeadConfig, num_layers: int, hidden_size: int,
                 freeze_feature_encoder: bool | None = None, freeze_layers: int = 0, adapter: AdapterConfig | None = None,
                 language: str | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode != "frozen" and head.kind != "linear":
            raise ValueError(f"{mode} mode uses a linear head (got {head.kind!r}); bilstm is for frozen mode")
        self.mode = mode
        self.head_config = head
        self.encoder = encoder
        self.encoder_dir: Path | None = None  # set by drop_encoder: a saved copy used by save_model_dir
        self.encoder_info = {} if encoder is None else {
            "source": encoder.source, "model_type": encoder.config.model_type,
            "num_layers": encoder.num_layers, "hidden_size": encoder.hidden_size,
            "parameters": sum(p.numel() for p in encoder.parameters()),  # the base, before any adapters
        }
        # adapter mode: the adapters' kind and size, the language they are for, and the files of
        # other languages of the same base (from init_from) that its model directory keeps
        if (mode == "adapter") != (adapter is not None):
            raise ValueError("adapters (an AdapterConfig) go with mode='adapter', and that mode needs them")
        self.adapter_config = adapter
        self.language = language
        self.other_languages: dict[str, dict] = {}
        if adapter is not None and encoder is not None:
            adapter_lib.attach(encoder, adapter)
        self.layer_sum = WeightedLayerSum(num_layers) if mode == "frozen" else None
        self.head = build_head(head.kind, hidden_size, vocab_size, head.dropout, head.hidden_size, head.num_layers)
        # frozen mode: SpecAugment-style masking of the summed features while training,
        # (time_prob, time_length, feature_prob, feature_length); set by build_model
        self.feature_masking: tuple[float, int, float, int] = (0.0, 10, 0.0, 10)
        self.encoder_trainable = mode != "frozen"  # finetune's freeze period switches this off
        # a pretrained CNN is kept as it is (as Wav2Vec2ForCTC does); a random one must learn
        self.freeze_feature_encoder = mode in ("finetune", "adapter") if freeze_feature_encoder is None else freeze_feature_encoder
        # finetune: the CNN, what feeds the first layer, and the first ``freeze_layers`` layers stay fixed
        self.freeze_layers = freeze_layers
        if freeze_layers and mode != "finetune":
            trains = {"frozen": "nothing", "scratch": "everything", "adapter": "only adapters"}[mode]
            raise ValueError(f"config key 'freeze_layers': {mode} mode trains {trains} in the encoder; freeze_layers is "
                             "for mode=finetune")
        if encoder is not None and not 0 <= freeze_layers <= num_layers - 1:
            raise ValueError(f"config key 'freeze_layers': {freeze_layers} is beyond this encoder's "
                             f"{num_layers - 1} transformer layers")
        if encoder is not None:
            self.apply_freezing()

    def apply_freezing(self) -> None:
        """The freezing policy: which encoder parameters get gradients."""
        if self.mode == "adapter":  # the base stays as it is; only the adapters train
            keys = set(self.encoder.adapter_keys)
            for name, p in self.encoder.model.named_parameters():
                p.requires_grad_(name in keys)
            if hasattr(self.encoder.feature_encoder, "_requires_grad"):
                self.encoder.feature_encoder._requires_grad = False
            return
        groups = parameter_groups(self.encoder)
        train_cnn = self.mode != "frozen" and not self.freeze_feature_encoder
        for p in groups["feature_encoder"]:
            p.requires_grad_(train_cnn)
        # transformers' feature encoders otherwise mark their input as requiring grad in
        # training mode, which runs a full backward pass through a frozen CNN
        fe = self.encoder.feature_encoder
        if hasattr(fe, "_requires_grad"):
            fe._requires_grad = train_cnn
        for p in groups["transformer"]:
            p.requires_grad_(self.mode != "frozen")
        if self.freeze_layers:
            for p in self._below_layer(self.freeze_layers):
                p.requires_grad_(False)
        for p in getattr(self.encoder, "fixed_parameters", ()):
            p.requires_grad_(False)
        if self.mode == "frozen":
            self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.mode == "frozen" and self.encoder is not None:
            self.encoder.eval()  # no dropout, masking or layerdrop in a fixed encoder
        return self

    def drop_encoder(self, saved_dir: str | os.PathLike, save: bool = True) -> None:
        """Free a frozen encoder (training from a feature cache): save it once to
        ``saved_dir``, which :func:`save_model_dir` copies into every model directory
        (``save=False``: another process of the same run saves it)."""
        if self.mode != "frozen":
            raise ValueError("only a frozen encoder can be dropped")
        if save:
            save_encoder(self.encoder, saved_dir)
        self.encoder_dir = Path(saved_dir)
        self.encoder = None

    def _below_layer(self, n: int) -> list[nn.Parameter]:
        """Encoder parameters that the output of transformer layer ``n`` does not depend on
        beyond layers 0..n-1: everything but layers n.. and a final layer norm after them."""
        layers = transformer_layers(self.encoder)
        above = {id(p) for layer in layers[n:] for p in layer.parameters()}
        cfg = self.encoder.config
        # a layer norm after the top layer (stable-layer-norm wav2vec2 variants, Whisper) acts above them
        final = getattr(getattr(self.encoder.model, "encoder", None), "layer_norm", None) if getattr(cfg, "do_stable_layer_norm", False) \
            else getattr(self.encoder.model, "layer_norm", None) if cfg.model_type == "whisper" else None
        if final is not None:
            above |= {id(p) for p in final.parameters()}
        return [p for p in self.encoder.model.parameters() if id(p) not in above]

    def encoder_groups(self, lr: float, decay: float = 1.0) -> list[dict]:
        """Optimiser groups of the trainable encoder parameters: one at ``lr``, or with
        ``decay`` < 1 one per transformer layer at ``lr * decay**k`` for the layer k below the
        top (what feeds the first layer gets the lowest rate; a final layer norm the top's)."""
        trainable = [p for p in self.encoder.parameters() if p.requires_grad] if self.encoder is not None else []
        if decay == 1.0 or not trainable:
            return [{"params": trainable, "lr": lr, "name": "encoder"}]
        layers = transformer_layers(self.encoder)
        top = len(layers) - 1
        where = {}
        for k, layer in enumerate(layers):
            for p in layer.parameters():
                where[id(p)] = k
        below = set(map(id, self._below_layer(0)))
        groups: dict[int, list] = {}
        for p in trainable:
            k = where.get(id(p), -1 if id(p) in below else top)
            groups.setdefault(k, []).append(p)
        return [{"params": ps, "lr": lr * decay ** (top - k), "name": "encoder" if k == top else f"encoder.layer{k}"}
                for k, ps in sorted(groups.items(), reverse=True)]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapters' parameters (adapter mode; otherwise none)."""
        return list(adapter_lib.adapter_parameters(self.encoder).values()) if self.encoder is not None else []

    def head_parameters(self) -> list[nn.Parameter]:
        params = list(self.head.parameters())
        if self.layer_sum is not None:
            params += list(self.layer_sum.parameters())
        return params

    def encoder_parameters(self) -> list[nn.Parameter]:
        if self.encoder is None:
            return []
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder is None:
            raise RuntimeError("this model was built without an encoder; use forward_features")
        grad = self.encoder_trainable and torch.is_grad_enabled()
        # a fixed encoder leaves the random stream alone (transformers draws layerdrop numbers even
        # in eval), so training with and without a feature cache sees the same dropout masks
        rng = contextlib.nullcontext() if self.mode != "frozen" else torch.random.fork_rng(devices=[])
        with contextlib.nullcontext() if grad else torch.no_grad(), rng:
            out = self.encoder(waveforms, lengths, all_layers=self.mode == "frozen")
        return self.forward_features(out.hidden_states, out.lengths)

    def forward_with_hidden(self, waveforms: torch.Tensor, lengths: torch.Tensor):
        """``(logits, frame_lengths, hidden_states)``: :meth:`forward` that also returns every
        encoder hidden state (for an auxiliary loss on them, such as distillation)."""
        if self.encoder is None:
            raise RuntimeError("this model was built without an encoder; use forward_features")
        grad = self.encoder_trainable and torch.is_grad_enabled()
        with contextlib.nullcontext() if grad else torch.no_grad():
            out = self.encoder(waveforms, lengths, all_layers=True)
        logits, frames = self.forward_features(out.hidden_states, out.lengths)
        return logits, frames, out.hidden_states

    def forward_features(self, hidden_states, frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head on precomputed encoder output: all layers (frozen) or the last one."""
        if self.layer_sum is not None:
            x = self.layer_sum(hidden_states)
            if self.training:
                x = mask_spans(x, frame_lengths, *self.feature_masking)
        else:
            x = hidden_states[-1]
        return self.head(x, frame_lengths), frame_lengths

    def frame_lengths(self, samples):
        return self.encoder.frame_lengths(samples)


def ctc_loss(logits: torch.Tensor, frame_lengths: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """Mean CTC loss per target token, blank id 0; infeasible clips contribute zero."""
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, V)
    return F.ctc_loss(log_probs, targets, frame_lengths, target_lengths, blank=0, reduction="mean", zero_infinity=True)


def build_model(
    encoder_name: str,
    mode: str,
    vocab_size: int,
    head: HeadConfig = HeadConfig(),
    seed: int = 0,
    config_overrides: dict | None = None,
    trust_remote_code: bool = False,
    freeze_feature_encoder: bool | None = None,
    freeze_layers: int = 0,
    adapter: AdapterConfig | None = None,
    language: str | None = None,
) -> CTCModel:
    """Load the encoder for ``mode`` and attach a fresh head (and adapters, in adapter mode), seeded."""
    overrides = dict(config_overrides or {})
    masking = (0.0, 10, 0.0, 10)
    if mode == "frozen":
        # a fixed encoder takes no training-time options; masking (if asked for) acts on the summed features
        masking = (overrides.get("frozen_mask_time_prob", 0.0), overrides.get("mask_time_length", 10),
                   overrides.get("frozen_mask_feature_prob", 0.0), overrides.get("mask_feature_length", 10))
        overrides = {}
    for k in ("frozen_mask_time_prob", "frozen_mask_feature_prob"):
        overrides.pop(k, None)
    encoder = load_encoder(
        encoder_name, random_init=mode == "scratch", seed=seed, config_overrides=overrides, trust_remote_code=trust_remote_code
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CTCModel(encoder, vocab_size, mode, head, encoder.num_layers, encoder.hidden_size, freeze_feature_encoder,
                         freeze_layers, adapter, language)
    model.feature_masking = masking
    return model


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
                         "speechtl.models.ctc.load_model_dir(dir) to save or train it")
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
        if model.mode == "adapter":
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
    if meta["mode"] != "adapter":
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
    state = load_file(str(model_dir / weights))
    adapters = {k[8:]: v for k, v in state.items() if k.startswith("adapter.")}
    head = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    return Vocabulary.load(model_dir / vocab_file), load_normalizer(model_dir / norm_file), adapters, head


def use_language(model: CTCModel, model_dir: str | os.PathLike, lang: str) -> tuple[Vocabulary, Normalizer]:
    """Put ``lang``'s adapters and head (from ``model_dir``) into an adapter model in place:
    the base encoder is not touched. Returns the language's vocabulary and normaliser."""
    model_dir = resolve_model_dir(model_dir)
    if model.mode != "adapter":
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


def init_from_model(model: CTCModel, vocab: Vocabulary, model_dir: str | os.PathLike) -> dict:
    """Start ``model`` (whose encoder was loaded from ``model_dir/encoder``) from the trained
    recogniser in ``model_dir``, whose vocabulary may differ from ``vocab``: the head and
    the layer weights are copied, and the output layer keeps the rows (and biases) of the
    tokens both vocabularies have; rows of new tokens keep their fresh initialisation.
    Subword pieces are tokens as characters are; a character model and a subword model
    have no rows in common, so starting one from the other is refused.

    An adapter model started from an adapter model keeps that model's other languages (to
    be written beside its own), and starts from its language's adapters and head when the
    model has it; a new language starts fresh.
    Returns ``{"kept": [...], "added": [...], "removed": [...]}``."""
    model_dir = resolve_model_dir(model_dir)
    meta = read_meta(model_dir)
    old_units, new_units = meta.get("units", "char"), units_of(vocab)
    if (old_units == "char") != (new_units == "char"):  # subword models of either kind share pieces ("▁ab")
        raise ValueError(f"config key 'init_from': {model_dir} predicts {describe_units(old_units)} units ({old_units}) and "
                         f"this run {describe_units(new_units)} units ({new_units}); one output layer cannot start the "
                         f"other. Train with units={old_units}, or start from its encoder alone with "
                         f"encoder={model_dir / 'encoder'}")
    if meta["mode"] == "adapter" and model.mode != "adapter":
        raise ValueError(f"config key 'init_from': {model_dir} is an adapter model (languages "
                         f"{', '.join(sorted(meta.get('languages', {})))}); add a language to it with mode=adapter "
                         f"lang=L, or fine-tune its base encoder with encoder={model_dir / 'encoder'}")
    if meta["mode"] != model.mode and "frozen" in (meta["mode"], model.mode):
        raise ValueError(f"config key 'init_from': {model_dir} is a {meta['mode']} model and this run is {model.mode}; "
                         "a frozen model's head sits on a weighted layer sum, a fine-tuned one's on the last layer")
    old_head, new_head = HeadConfig(**meta["head"]), model.head_config
    shape = ("kind",) if new_head.kind == "linear" else ("kind", "hidden_size", "num_layers")
    if any(getattr(old_head, k) != getattr(new_head, k) for k in shape):
        raise ValueError(f"config key 'init_from': {model_dir} has a {old_head.kind} head ({asdict(old_head)}), this run "
                         f"{asdict(new_head)}; use the same head type and size (head, bilstm_hidden, bilstm_layers)")
    if meta["mode"] == "adapter":
        if AdapterConfig.from_dict(meta["adapter"]) != model.adapter_config:
            raise ValueError(f"config key 'init_from': {model_dir} holds {meta['adapter']} adapters, this run "
                             f"{model.adapter_config.to_dict()}")
        for lang, record in meta["languages"].items():
            if lang != model.language:
                model.other_languages[lang] = {"meta": record, "files": {name: (model_dir / name).read_bytes()
                                                                        for name in language_files(lang)}}
        if model.language not in meta["languages"]:
            return {"kept": [], "added": list(vocab.tokens), "removed": [], "new_language": model.language}
        old_vocab, _, adapters, head_state = _read_language(model_dir, model.language)
        adapter_lib.load_adapter_state(model.encoder, adapters, where=str(model_dir / language_files(model.language)[0]))
        state = {}
    else:
        old_vocab = load_vocabulary(model_dir, meta)
        state = load_file(str(model_dir / "head.safetensors"))
        head_state = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    out_keys = [k for k in head_state if k.startswith("proj.")]
    fresh = model.head.state_dict()
    rows_new = [i for i, t in enumerate(vocab.tokens) if t in old_vocab.index]
    rows_old = [old_vocab.index[vocab.tokens[i]] for i in rows_new]
    for k in out_keys:
        carried = fresh[k].clone()
        carried[rows_new] = head_state[k][rows_old]
        head_state[k] = carried
    model.head.load_state_dict(head_state)
    if model.layer_sum is not None:
        model.layer_sum.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("layer_sum.")})
    return {"kept": [vocab.tokens[i] for i in rows_new], "added": [t for t in vocab.tokens if t not in old_vocab.index],
            "removed": [t for t in old_vocab.tokens if t not in vocab.index]}


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
    lora_or_none = meta["mode"] != "adapter" or meta.get("adapter", {}).get("kind") == "lora"
    encoder = load_encoder(str(model_dir / "encoder"), inference=inference and lora_or_none)
    encoder.source = meta["encoder"].get("source", encoder.source)
    head = HeadConfig(**meta["head"])
    if lang is not None:
        adapter = AdapterConfig.from_dict(meta["adapter"])
        model = CTCModel(encoder, meta["languages"][lang]["vocab_size"], "adapter", head, encoder.num_layers,
                         encoder.hidden_size, adapter=adapter, language=lang)
        vocab, normalizer = use_language(model, model_dir, lang)
        return model.to(device).eval(), vocab, normalizer, meta
    vocab = load_vocabulary(model_dir, meta)
    normalizer = load_normalizer(model_dir / "normalizer.json")
    model = CTCModel(encoder, len(vocab), meta["mode"], head, encoder.num_layers, encoder.hidden_size)
    state = load_file(str(model_dir / "head.safetensors"))
    model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
    if model.layer_sum is not None:
        model.layer_sum.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("layer_sum.")})
    return model.to(device).eval(), vocab, normalizer, meta
