"""Ways to transfer between frozen and full fine-tuning: partial freezing, layer-wise
learning rates, parameter counts."""

import pytest
import torch
from safetensors.torch import load_file

from speechtl.encoders.base import transformer_layers
from speechtl.models.ctc import build_model
from speechtl.training.config import load_train_config
from speechtl.training.train import train


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


def test_init_from_carries_a_trained_model_into_a_new_vocabulary(tmp_path, tones, tiny_encoder):
    import json

    from speechtl.data.text import Vocabulary

    train(_cfg(tmp_path / "a", tones, tiny_encoder, max_steps=4), progress=False)
    old_dir = tmp_path / "a" / "out" / "model"
    old = Vocabulary.load(old_dir / "vocab.json")
    assert "a" in old.index and "b" in old.index
    # the new character set drops "b" and adds two characters
    new_tokens = [t for t in old.tokens if t != "b"] + ["x", "ž"]
    vocab_file = tmp_path / "vocab.json"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(new_tokens)}, ensure_ascii=False))
    # lr 0: what init_from carried is what gets saved
    summary = train(_cfg(tmp_path / "b", tones, tiny_encoder, init_from=str(tmp_path / "a" / "out"), vocab=str(vocab_file),
                         max_steps=1, lr=0.0, encoder_lr=0.0), progress=False)
    assert summary["steps"] == 1
    new_dir = tmp_path / "b" / "out" / "model"
    a_head, b_head = load_file(str(old_dir / "head.safetensors")), load_file(str(new_dir / "head.safetensors"))
    for key in ("head.proj.weight", "head.proj.bias"):
        assert b_head[key].shape[0] == len(new_tokens)
        for i, t in enumerate(new_tokens):
            if t in old.index:
                assert torch.equal(b_head[key][i], a_head[key][old.index[t]]), (key, t)
    a_enc = load_file(str(old_dir / "encoder" / "model.safetensors"))
    b_enc = load_file(str(new_dir / "encoder" / "model.safetensors"))
    assert all(torch.equal(a_enc[k], b_enc[k]) for k in a_enc)
    # and it trains on from there
    cont = train(_cfg(tmp_path / "c", tones, tiny_encoder, init_from=str(old_dir), vocab=str(vocab_file), max_steps=2),
                 progress=False)
    assert cont["steps"] == 2


def test_init_from_and_vocabulary_mistakes_are_named(tmp_path, tones, tiny_encoder):
    train(_cfg(tmp_path / "a", tones, tiny_encoder, max_steps=1), progress=False)
    frozen = dict(mode="frozen", head="bilstm", bilstm_layers=1)
    train(_cfg(tmp_path / "f", tones, tiny_encoder, max_steps=1, bilstm_hidden=8, **frozen), progress=False)
    with pytest.raises(ValueError, match="init_from.*same head type and size"):
        train(_cfg(tmp_path / "b", tones, tiny_encoder, init_from=str(tmp_path / "f" / "out"), bilstm_hidden=16, **frozen),
              progress=False)
    with pytest.raises(ValueError, match="init_from.*frozen"):
        train(_cfg(tmp_path / "c", tones, tiny_encoder, init_from=str(tmp_path / "a" / "out"), mode="frozen",
                   head="linear"), progress=False)
    with pytest.raises(ValueError, match="init_from"):
        load_train_config(None, {"train": "x", "mode": "scratch", "init_from": "m"})
    bad = tmp_path / "list.json"
    bad.write_text('["<pad>", "[UNK]", "|", "a"]')
    with pytest.raises(ValueError, match="list.json: not a vocabulary file"):
        train(_cfg(tmp_path / "d", tones, tiny_encoder, vocab=str(bad)), progress=False)
    nospecial = tmp_path / "v.json"
    nospecial.write_text('{"a": 0, "b": 1}')
    with pytest.raises(ValueError, match="v.json: vocabulary must start with"):
        train(_cfg(tmp_path / "e", tones, tiny_encoder, vocab=str(nospecial)), progress=False)


def test_init_from_a_frozen_model_keeps_its_layer_weights(tmp_path, tones, tiny_encoder):
    frozen = dict(mode="frozen", head="bilstm", bilstm_layers=1, bilstm_hidden=8)
    train(_cfg(tmp_path / "a", tones, tiny_encoder, max_steps=3, lr=3e-2, **frozen), progress=False)
    train(_cfg(tmp_path / "b", tones, tiny_encoder, init_from=str(tmp_path / "a" / "out"), max_steps=1, lr=0.0, **frozen),
          progress=False)
    a = load_file(str(tmp_path / "a" / "out" / "model" / "head.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "model" / "head.safetensors"))
    assert not torch.all(a["layer_sum.weights"] == 0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_average_last_is_the_mean_of_the_last_evaluations(tmp_path, tones, tiny_encoder):
    summary = train(_cfg(tmp_path, tones, tiny_encoder, max_steps=4, eval_every=1, average_last=3, dev=str(tones)),
                    progress=False)
    out = tmp_path / "out"
    snaps = sorted((out / "checkpoints").glob("eval-*.safetensors"))
    assert [s.name for s in snaps] == ["eval-00000002.safetensors", "eval-00000003.safetensors", "eval-00000004.safetensors"]
    states = [load_file(str(s)) for s in snaps]
    head = load_file(str(out / "model_avg" / "head.safetensors"))
    enc = load_file(str(out / "model_avg" / "encoder" / "model.safetensors"))
    for k, v in head.items():
        torch.testing.assert_close(v, sum(s[k] for s in states) / 3)
    w = "encoder.layers.1.feed_forward.output_dense.weight"
    assert not torch.equal(states[0][f"encoder.model.{w}"], states[2][f"encoder.model.{w}"])
    torch.testing.assert_close(enc[w], sum(s[f"encoder.model.{w}"] for s in states) / 3)
    assert summary["average"]["steps"] == [2, 3, 4] and 0 <= summary["average"]["dev_cer"]
    assert (out / "dev_avg" / "summary.json").is_file()


def test_average_command_and_its_refusals(tmp_path, tones, tiny_encoder, capsys):
    from speechtl.cli.app import main

    for seed in (0, 1):
        train(_cfg(tmp_path / f"s{seed}", tones, tiny_encoder, seed=seed), progress=False)
    a, b = (tmp_path / f"s{s}" / "out" / "model" for s in (0, 1))
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "avg"), "-q"]) == 0
    ha, hb = (load_file(str(d / "head.safetensors")) for d in (a, b))
    avg = load_file(str(tmp_path / "avg" / "head.safetensors"))
    for k in ha:
        torch.testing.assert_close(avg[k], (ha[k] + hb[k]) / 2)
    import speechtl

    assert isinstance(speechtl.load(tmp_path / "avg").transcribe(read_first(tones)), str)
    train(_cfg(tmp_path / "big", tones, tiny_encoder, mode="frozen", head="bilstm", bilstm_hidden=8), progress=False)
    assert main(["average", str(a), str(tmp_path / "big" / "out"), "--out", str(tmp_path / "bad")]) == 1
    assert "only models of one architecture" in capsys.readouterr().err
    from speechtl.models.average import average_state_dicts

    with pytest.raises(ValueError, match="w has shape"):
        average_state_dicts([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], ["a", "b"])


def read_first(manifest):
    from speechtl.data.manifest import read_manifest

    return read_manifest(manifest)[0].audio
