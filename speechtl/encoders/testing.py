"""Tiny random-weight encoders, for tests, smoke runs and benchmarks."""

from __future__ import annotations

import torch

from .wav2vec2 import SpeechEncoder


def encoder_from_config(config, normalize_waveform: bool = True, seed: int = 0) -> SpeechEncoder:
    """A random-weight encoder from a ``transformers`` config object (tests, pretraining)."""
    from transformers import AutoModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModel.from_config(config)
    return SpeechEncoder(model, normalize_waveform=normalize_waveform, source="config")


def tiny_config(family: str = "wav2vec2", **kw):
    """A tiny random-init config of a supported family, for tests and smoke runs."""
    import transformers

    classes = {
        "wav2vec2": transformers.Wav2Vec2Config,
        "hubert": transformers.HubertConfig,
        "wavlm": transformers.WavLMConfig,
        "data2vec-audio": transformers.Data2VecAudioConfig,
        "wav2vec2-conformer": transformers.Wav2Vec2ConformerConfig,
    }
    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),  # the standard 20 ms frame stack
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        do_stable_layer_norm=False,
        mask_time_prob=0.0,
        vocab_size=8,
    )
    if family == "data2vec-audio":
        base["num_conv_pos_embeddings"] = 5  # data2vec uses a stack of small pos convs
    base.update(kw)
    return classes[family](**base)
