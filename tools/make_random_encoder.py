#!/usr/bin/env python
"""Write a random-initialised encoder as a HF model directory.

Used by tests, the smoke recipe and benchmarks, where no pretrained checkpoint can
be downloaded. ``--size base`` is the wav2vec2-base geometry (95M parameters).
"""

import argparse

from speechtl.encoders.registry import save_encoder
from speechtl.encoders.testing import encoder_from_config, tiny_config

SIZES = {
    "tiny": {},
    "mini": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, conv_dim=(64,) * 7),
    "small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024,
                  conv_dim=(256,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                  num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16),
    # the second-generation default: a narrower 5-layer CNN (same 320-sample hop; the CNN
    # dominates a CPU step) under 8 transformer layers
    "small2": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, intermediate_size=1024,
                   conv_dim=(128, 128, 192, 256, 256), conv_kernel=(10, 8, 4, 4, 2), conv_stride=(5, 4, 4, 2, 2),
                   num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                 num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--family", default="wav2vec2", choices=["wav2vec2", "hubert", "wavlm", "data2vec-audio", "wav2vec2-conformer"])
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--feat-extract-norm", default="layer", choices=["layer", "group"],
                   help="group = wav2vec2-base style (normalised over time, no attention mask)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = tiny_config(args.family, feat_extract_norm=args.feat_extract_norm, mask_time_prob=0.05, **SIZES[args.size])
    enc = encoder_from_config(cfg, seed=args.seed)
    save_encoder(enc, args.out)
    n = sum(p.numel() for p in enc.parameters())
    print(f"wrote a random {args.size} {args.family} encoder ({n / 1e6:.2f}M parameters) to {args.out}")


if __name__ == "__main__":
    main()
