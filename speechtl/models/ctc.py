"""The CTC recogniser: an encoder and a head joined by a thin wrapper.

The training modes differ only in what is trainable (:mod:`speechtl.models.modes`):

- ``frozen``: encoder fixed and in eval mode; a weighted sum of all its layers feeds
  a ``linear`` or ``bilstm`` head.
- ``finetune``: pretrained encoder + linear head on the last layer (the
  ``Wav2Vec2ForCTC`` shape); the CNN feature encoder stays frozen.
- ``scratch``: ``finetune``'s architecture with random encoder weights.
- ``adapter``: the pretrained encoder fixed, small adapters in it (LoRA or MMS-style,
  :mod:`speechtl.models.adapters`) and a linear head on the last layer train; one set of
  adapters and head per language beside one base encoder.

Model folders are :mod:`speechtl.models.model_dir`; starting from one is
:mod:`speechtl.models.init_from`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.base import mask_spans, transformer_layers
from ..encoders.registry import load_encoder, save_encoder
from ..encoders.wav2vec2 import SpeechEncoder, parameter_groups
from . import adapters as adapter_lib
from .adapters import AdapterConfig
from .heads import WeightedLayerSum, build_head
from .modes import mode_policy


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
        policy = mode_policy(mode)
        if head.kind not in policy.heads:
            raise ValueError(f"{mode} mode uses a linear head (got {head.kind!r}); bilstm is for frozen mode")
        self.mode = mode
        self.policy = policy
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
        if policy.adapters != (adapter is not None):
            raise ValueError("adapters (an AdapterConfig) go with mode='adapter', and that mode needs them")
        self.adapter_config = adapter
        self.language = language
        self.other_languages: dict[str, dict] = {}
        if adapter is not None and encoder is not None:
            adapter_lib.attach(encoder, adapter)
        self.layer_sum = WeightedLayerSum(num_layers) if policy.layer_sum else None
        self.head = build_head(head.kind, hidden_size, vocab_size, head.dropout, head.hidden_size, head.num_layers)
        # frozen mode: SpecAugment-style masking of the summed features while training,
        # (time_prob, time_length, feature_prob, feature_length); set by build_model
        self.feature_masking: tuple[float, int, float, int] = (0.0, 10, 0.0, 10)
        self.encoder_trainable = policy.encoder_grad  # finetune's freeze period switches this off
        # a pretrained CNN is kept as it is (as Wav2Vec2ForCTC does); a random one must learn
        self.freeze_feature_encoder = policy.freeze_cnn if freeze_feature_encoder is None else freeze_feature_encoder
        # finetune: the CNN, what feeds the first layer, and the first ``freeze_layers`` layers stay fixed
        self.freeze_layers = freeze_layers
        if freeze_layers and not policy.freezes_layers:
            raise ValueError(f"config key 'freeze_layers': {mode} mode trains {policy.trains} in the encoder; freeze_layers is "
                             "for mode=finetune")
        if encoder is not None and not 0 <= freeze_layers <= num_layers - 1:
            raise ValueError(f"config key 'freeze_layers': {freeze_layers} is beyond this encoder's "
                             f"{num_layers - 1} transformer layers")
        if encoder is not None:
            self.apply_freezing()

    def apply_freezing(self) -> None:
        """The freezing policy: which encoder parameters get gradients."""
        if self.policy.adapters:  # the base stays as it is; only the adapters train
            keys = set(self.encoder.adapter_keys)
            for name, p in self.encoder.model.named_parameters():
                p.requires_grad_(name in keys)
            if hasattr(self.encoder.feature_encoder, "_requires_grad"):
                self.encoder.feature_encoder._requires_grad = False
            return
        groups = parameter_groups(self.encoder)
        train_cnn = self.policy.encoder_grad and not self.freeze_feature_encoder
        for p in groups["feature_encoder"]:
            p.requires_grad_(train_cnn)
        # transformers' feature encoders otherwise mark their input as requiring grad in
        # training mode, which runs a full backward pass through a frozen CNN
        fe = self.encoder.feature_encoder
        if hasattr(fe, "_requires_grad"):
            fe._requires_grad = train_cnn
        for p in groups["transformer"]:
            p.requires_grad_(self.policy.encoder_grad)
        if self.freeze_layers:
            for p in self._below_layer(self.freeze_layers):
                p.requires_grad_(False)
        for p in getattr(self.encoder, "fixed_parameters", ()):
            p.requires_grad_(False)
        if not self.policy.encoder_grad:
            self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.policy.encoder_grad and self.encoder is not None:
            self.encoder.eval()  # no dropout, masking or layerdrop in a fixed encoder
        return self

    def drop_encoder(self, saved_dir: str | os.PathLike, save: bool = True) -> None:
        """Free a frozen encoder (training from a feature cache): save it once to
        ``saved_dir``, which :func:`save_model_dir` copies into every model directory
        (``save=False``: another process of the same run saves it)."""
        if not self.policy.cacheable:
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
        rng = contextlib.nullcontext() if self.policy.encoder_grad else torch.random.fork_rng(devices=[])
        with contextlib.nullcontext() if grad else torch.no_grad(), rng:
            out = self.encoder(waveforms, lengths, all_layers=self.policy.layer_sum)
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
    policy = mode_policy(mode)
    overrides = dict(config_overrides or {})
    masking = (0.0, 10, 0.0, 10)
    if not policy.encoder_grad:
        # a fixed encoder takes no training-time options; masking (if asked for) acts on the summed features
        masking = (overrides.get("frozen_mask_time_prob", 0.0), overrides.get("mask_time_length", 10),
                   overrides.get("frozen_mask_feature_prob", 0.0), overrides.get("mask_feature_length", 10))
        overrides = {}
    for k in ("frozen_mask_time_prob", "frozen_mask_feature_prob"):
        overrides.pop(k, None)
    encoder = load_encoder(
        encoder_name, random_init=policy.random_init, seed=seed, config_overrides=overrides, trust_remote_code=trust_remote_code
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CTCModel(encoder, vocab_size, mode, head, encoder.num_layers, encoder.hidden_size, freeze_feature_encoder,
                         freeze_layers, adapter, language)
    model.feature_masking = masking
    return model
