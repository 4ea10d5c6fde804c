"""Ways to transfer between frozen and full fine-tuning: partial freezing, layer-wise
learning rates, parameter counts."""

import pytest
import torch
from safetensors.torch import load_file

from speechtl.config import load_train_config
from speechtl.encoder import transformer_layers
from speechtl.model import build_model
from speechtl.train import train


def _cfg(tmp_path, corpus, encoder, **kw):
    base = dict(encoder=str(encoder), train=str(corpus), out=str(tmp_path / "out"), max_steps=3, eval_every=3,
                num_workers=0, max_batch_seconds=4.0, lr=3e-3, encoder_lr=3e-3, seed=0, mode="finetune",
                mask_time_prob=0.0, layerdrop=0.0)
    base.update(kw)
    return load_train_config(None, base)


def test_freeze_layers_keeps_the_lower_layers_bit_identical(tmp_path, tones, tiny_encoder):
    src = load_file(str(tiny_encoder / "model.safetensors"))
    summary = train(_cfg(tmp_path, tones, tiny_encoder, freeze_layers=1), progress=False)
    out = load_file(str(tmp_path / "out" / "model" / "encoder" / "model.safetensors"))
    top = [k for k in src if k.startswith("encoder.layers.1.")]
    fixed = [k for k in src if k not in top]
    assert top and fixed
    assert all(torch.equal(src[k], out[k]) for k in fixed), "a frozen parameter changed"
    assert any(not torch.equal(src[k], out[k]) for k in top), "the top layer never trained"
    head = sum(v.numel() for v in load_file(str(tmp_path / "out" / "model" / "head.safetensors")).values())
    assert summary["trainable_parameters"] == sum(src[k].numel() for k in top) + head
    assert summary["total_parameters"] == sum(v.numel() for v in src.values()) + head


def test_freeze_layers_beyond_the_encoder_or_outside_finetune_is_refused(tmp_path, tones, tiny_encoder):
    with pytest.raises(ValueError, match="freeze_layers.*beyond this encoder's 2"):
        train(_cfg(tmp_path, tones, tiny_encoder, freeze_layers=3), progress=False)
    with pytest.raises(ValueError, match="freeze_layers"):
        load_train_config(None, {"train": "x", "mode": "scratch", "freeze_layers": 1})
    with pytest.raises(ValueError, match="freeze_layers"):
        load_train_config(None, {"train": "x", "mode": "finetune", "freeze_layers": -1})


def test_layer_lr_decay_gives_each_layer_its_rate(tiny_encoder):
    model = build_model(str(tiny_encoder), "finetune", vocab_size=5)
    groups = model.encoder_groups(1.0, decay=0.5)
    layers = transformer_layers(model.encoder)
    by_name = {g["name"]: g for g in groups}
    assert by_name["encoder"]["lr"] == 1.0 and by_name["encoder.layer0"]["lr"] == 0.5
    assert by_name["encoder.layer-1"]["lr"] == 0.25  # what feeds the first layer
    assert {id(p) for p in by_name["encoder.layer0"]["params"]} == {id(p) for p in layers[0].parameters()}
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.encoder.parameters() if p.requires_grad)
    assert model.encoder_groups(1.0) == [{"params": [p for p in model.encoder.parameters() if p.requires_grad],
                                          "lr": 1.0, "name": "encoder"}]
    with pytest.raises(ValueError, match="layer_lr_decay"):
        load_train_config(None, {"train": "x", "layer_lr_decay": 0})


def test_layer_lr_decay_trains_with_the_decayed_rates(tmp_path, tones, tiny_encoder):
    summary = train(_cfg(tmp_path, tones, tiny_encoder, layer_lr_decay=0.5, schedule="constant", warmup=0), progress=False)
    assert summary["steps"] == 3
    ck = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)
    lrs = sorted(g["lr"] for g in ck["optimizer"]["param_groups"])
    assert lrs == [0.00075, 0.0015, 0.003, 0.003]  # below the first layer, layer 0, layer 1, the head
