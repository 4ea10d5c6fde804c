"""The training modes, one policy object each: what trains, where the head attaches, the
CNN's default, and whether the encoder's features can be computed once.

A mode is named by a string in configs and model folders (``mode: frozen``); code asks its
:class:`ModePolicy` (:func:`mode_policy`) rather than comparing names. A new mode is one more
entry in :data:`MODES`. This module imports nothing heavy: the configuration reads it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModePolicy:
    """How one mode builds and trains a :class:`~speechtl.models.ctc.CTCModel`."""

    name: str
    encoder_grad: bool  # gradients flow through the encoder (its weights, or adapters inside it)
    encoder_trains: bool  # the encoder's own weights train
    adapters: bool  # new per-language adapters train on a fixed base encoder
    layer_sum: bool  # the head reads a learned sum of every layer (else the last layer)
    random_init: bool  # the encoder starts from random weights
    freeze_cnn: bool  # the CNN feature encoder's default: kept fixed (a pretrained one) or trained
    heads: tuple[str, ...]  # head kinds the mode takes
    freezes_layers: bool  # freeze_layers applies
    trains: str  # what it trains in the encoder, for messages
    seq2seq: bool = False  # Whisper's own encoder-decoder, no CTC head (speechtl.training.seq2seq)

    @property
    def cacheable(self) -> bool:
        """The encoder is a fixed function, so its features can be computed once and cached."""
        return not self.encoder_grad

    @property
    def distills(self) -> bool:
        """A teacher can be distilled into the encoder (it trains)."""
        return self.encoder_trains

    @property
    def subword_units(self) -> bool:
        """Subword output units (``units=bpe:N``); adapter models keep one character vocabulary per language."""
        return not self.adapters

    def may_start_from(self, other: ModePolicy) -> bool:
        """Whether a model of mode ``other`` can start this one (``init_from``): their heads sit
        on the same place (a layer sum, or the last layer)."""
        return self.layer_sum == other.layer_sum or self.name == other.name


MODES: dict[str, ModePolicy] = {
    p.name: p
    for p in (
        ModePolicy("frozen", encoder_grad=False, encoder_trains=False, adapters=False, layer_sum=True, random_init=False,
                   freeze_cnn=False, heads=("linear", "bilstm"), freezes_layers=False, trains="nothing"),
        ModePolicy("finetune", encoder_grad=True, encoder_trains=True, adapters=False, layer_sum=False, random_init=False,
                   freeze_cnn=True, heads=("linear",), freezes_layers=True, trains="the transformer"),
        ModePolicy("scratch", encoder_grad=True, encoder_trains=True, adapters=False, layer_sum=False, random_init=True,
                   freeze_cnn=False, heads=("linear",), freezes_layers=False, trains="everything"),
        ModePolicy("adapter", encoder_grad=True, encoder_trains=False, adapters=True, layer_sum=False, random_init=False,
                   freeze_cnn=True, heads=("linear",), freezes_layers=False, trains="only adapters"),
        ModePolicy("seq2seq", encoder_grad=False, encoder_trains=False, adapters=False, layer_sum=False,
                   random_init=False, freeze_cnn=True, heads=("linear",), freezes_layers=False,
                   trains="Whisper's decoder (seq2seq_train)", seq2seq=True),
    )
}


def mode_policy(mode: str) -> ModePolicy:
    """The policy of ``mode`` (a ValueError naming the modes for an unknown one)."""
    policy = MODES.get(mode)
    if policy is None:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return policy
