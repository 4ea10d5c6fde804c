#!/usr/bin/env python
"""A wav2vec2-architecture encoder whose transformer starts as a Whisper encoder's.

Whisper's encoder layers and wav2vec2's "stable layer norm" layers compute the same
function: pre-norm self-attention (Whisper's key projection has no bias; it is set to
zero here) and a pre-norm GELU feed-forward, each with a residual, and a final layer
norm after the last layer. This script builds a ``Wav2Vec2Model`` with Whisper's width,
depth and heads, copies every transformer weight across, and leaves the wav2vec2 front
end (the CNN on raw samples, the feature projection and the convolutional position
embedding) at random initialisation: pretraining then teaches that front end to feed the
copied layers, with the Whisper encoder as the teacher.

    python recipes/pretrain/init_from_whisper.py whisper-tiny.en --out exp/pretrain/init
"""

import argparse

import torch

from speechtl.encoder import encoder_from_config, load_encoder, save_encoder, tiny_config

# the CNN of the `small2` geometry (tools/make_random_encoder.py): 5 layers, 320-sample hop
CNN = dict(conv_dim=(128, 128, 192, 256, 256), conv_kernel=(10, 8, 4, 4, 2), conv_stride=(5, 4, 4, 2, 2))


def convert(whisper_name: str, seed: int = 0):
    teacher = load_encoder(whisper_name)
    w = teacher.model
    cfg = teacher.config
    student_cfg = tiny_config("wav2vec2", hidden_size=cfg.d_model, num_hidden_layers=cfg.encoder_layers,
                              num_attention_heads=cfg.encoder_attention_heads, intermediate_size=cfg.encoder_ffn_dim,
                              hidden_act=cfg.activation_function, do_stable_layer_norm=True, feat_extract_norm="layer",
                              num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, layer_norm_eps=1e-5,
                              mask_time_prob=0.05, layerdrop=0.0, **CNN)
    student = encoder_from_config(student_cfg, seed=seed)
    s = student.model
    with torch.no_grad():
        for src, dst in zip(w.layers, s.encoder.layers):
            for name in ("q_proj", "v_proj", "out_proj"):
                getattr(dst.attention, name).weight.copy_(getattr(src.self_attn, name).weight)
                getattr(dst.attention, name).bias.copy_(getattr(src.self_attn, name).bias)
            dst.attention.k_proj.weight.copy_(src.self_attn.k_proj.weight)
            dst.attention.k_proj.bias.zero_()  # Whisper's key projection has no bias
            dst.layer_norm.load_state_dict(src.self_attn_layer_norm.state_dict())
            dst.feed_forward.intermediate_dense.load_state_dict(src.fc1.state_dict())
            dst.feed_forward.output_dense.load_state_dict(src.fc2.state_dict())
            dst.final_layer_norm.load_state_dict(src.final_layer_norm.state_dict())
        s.encoder.layer_norm.load_state_dict(w.layer_norm.state_dict())
    return student, teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("whisper", help="a Whisper encoder speechtl loads (whisper-tiny.en once fetched, or a folder)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    student, _ = convert(args.whisper, args.seed)
    save_encoder(student, args.out)
    n = sum(p.numel() for p in student.parameters())
    print(f"wrote a wav2vec2 encoder with {args.whisper}'s transformer layers ({n / 1e6:.2f}M parameters) to {args.out}")


if __name__ == "__main__":
    main()
