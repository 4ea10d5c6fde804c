"""speechtl's own encoder modules for inference (speechtl.encoders.native) against transformers'."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from speechtl.encoders.native import Wav2Vec2Native, WhisperEncoderNative, load_native
from speechtl.encoders.registry import load_encoder, save_encoder
from speechtl.encoders.testing import encoder_from_config, tiny_config
from speechtl.encoders.whisper import tiny_whisper_config


def _shake(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every parameter: fresh norms are 1 and 0 and biases 0, which would
    let a misplaced norm or bias go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _wav2vec2_dir(root: Path, family: str = "wav2vec2", **kw) -> Path:
    enc = encoder_from_config(tiny_config(family, **kw))
    _shake(enc.model)
    out = root / f"{family}-{'-'.join(f'{k}{v}' for k, v in sorted(kw.items()))}"
    save_encoder(enc, out)
    return out


def _whisper_dir(root: Path) -> Path:
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(tiny_whisper_config()).eval()
    _shake(model)
    out = root / "whisper"
    model.save_pretrained(str(out))
    return out


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([16_000, 9_000, 4_100])
    w = torch.randn(3, 16_000, generator=g) * 0.3
    return w * (torch.arange(16_000)[None] < lengths[:, None]), lengths


def _same_outputs(path: Path, native_type: type) -> None:
    ref = load_encoder(str(path)).eval()
    nat = load_encoder(str(path), inference=True)
    assert isinstance(nat.model, native_type)  # not the transformers fallback
    assert not isinstance(ref.model, native_type)
    w, n = _batch()
    with torch.inference_mode():
        for all_layers in (True, False):
            a, b = ref(w, n, all_layers=all_layers), nat(w, n, all_layers=all_layers)
            assert len(a.hidden_states) == len(b.hidden_states) == (ref.num_layers if all_layers else 1)
            assert torch.equal(a.lengths, b.lengths)
            for k, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
                valid = torch.arange(x.shape[1])[None, :] < a.lengths[:, None]
                assert x.shape == y.shape
                err = (x - y)[valid].abs().max().item()
                assert err < 1e-4 * max(1.0, x[valid].abs().max().item()), (all_layers, k, err)


@pytest.mark.parametrize("family, kw", [
    ("wav2vec2", {}),
    ("wav2vec2", {"feat_extract_norm": "group"}),
    ("wav2vec2", {"do_stable_layer_norm": True, "conv_bias": True, "hidden_act": "gelu_new"}),
    ("hubert", {"feat_proj_layer_norm": False, "num_conv_pos_embeddings": 15}),
])
def test_native_wav2vec2_family_equals_transformers_layer_by_layer(tmp_path, family, kw):
    _same_outputs(_wav2vec2_dir(tmp_path, family, **kw), Wav2Vec2Native)


def test_native_whisper_encoder_equals_transformers_layer_by_layer(tmp_path):
    _same_outputs(_whisper_dir(tmp_path), WhisperEncoderNative)


@pytest.mark.parametrize("family, kw", [("wav2vec2", {"mask_time_prob": 0.05}), ("wav2vec2", {}), ("hubert", {}),
                                        ("whisper", {})])
def test_an_encoder_has_one_fingerprint_whichever_modules_load_it(tmp_path, family, kw):
    """A cache extracted with the native modules serves a frozen training run, which loads
    its encoder through transformers: the cache key's fingerprint must agree."""
    from speechtl.features.fingerprint import encoder_fingerprint

    path = _whisper_dir(tmp_path) if family == "whisper" else _wav2vec2_dir(tmp_path, family, **kw)
    ref, nat = load_encoder(str(path)), load_encoder(str(path), inference=True)
    assert type(ref.model) is not type(nat.model)
    assert sorted(ref.model.state_dict()) == sorted(nat.model.state_dict())
    assert encoder_fingerprint(ref, reuse=False) == encoder_fingerprint(nat, reuse=False)
    other = _wav2vec2_dir(tmp_path / "other", family, **{**kw, "layer_norm_eps": 1e-3}) if family != "whisper" else None
    if other is not None:  # a config key that changes the forward pass changes the fingerprint
        assert encoder_fingerprint(load_encoder(str(other)), reuse=False) != encoder_fingerprint(ref, reuse=False)


def test_the_defaults_for_missing_config_keys_are_transformers_own():
    import transformers

    from speechtl.encoders.native import DEFAULTS

    classes = {"wav2vec2": transformers.Wav2Vec2Config, "hubert": transformers.HubertConfig,
               "whisper": transformers.WhisperConfig}
    for kind, defaults in DEFAULTS.items():
        made = classes[kind]()
        for k, v in defaults.items():
            have = getattr(made, k, None)  # a key the class lacks reads as None (adapter_attn_dim on HuBERT)
            assert (list(have) if isinstance(have, tuple) else have) == v, (kind, k)


@pytest.mark.parametrize("family, drop", [("wav2vec2", ["add_adapter", "mask_time_prob", "feat_extract_activation"]),
                                          ("hubert", ["feat_proj_layer_norm", "conv_pos_batch_norm", "mask_time_prob"])])
def test_a_config_without_some_keys_loads_as_transformers_loads_it(tmp_path, family, drop):
    """transformers fills a key config.json leaves out with its class default (a mask
    embedding for the default mask_time_prob, say); so do the native modules, and the
    fingerprint stays one."""
    from speechtl.features.fingerprint import encoder_fingerprint

    path = _wav2vec2_dir(tmp_path, family, mask_time_prob=0.05)
    cfg = json.loads((path / "config.json").read_text())
    for k in drop:
        cfg.pop(k)
    (path / "config.json").write_text(json.dumps(cfg))
    ref, nat = load_encoder(str(path)), load_encoder(str(path), inference=True)
    assert isinstance(nat.model, Wav2Vec2Native)
    assert sorted(ref.model.state_dict()) == sorted(nat.model.state_dict())
    assert encoder_fingerprint(ref, reuse=False) == encoder_fingerprint(nat, reuse=False)


def test_a_checkpoint_transformers_runs_in_half_precision_loads_through_transformers(tmp_path):
    """transformers loads a wav2vec2 checkpoint in its config's dtype, else in its weights'.
    The native modules run float32: float16 weights under ``dtype: float32`` load natively
    (as transformers loads them, upcast, with one fingerprint); a float16 dtype, or float16
    weights and no dtype, are left to transformers."""
    from speechtl.features.fingerprint import encoder_fingerprint

    path = _wav2vec2_dir(tmp_path)
    state = {k: v.half() for k, v in load_file(str(path / "model.safetensors")).items()}
    save_file(state, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    for dtype, native in (("float32", True), ("float16", False), (None, False)):
        cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
        if dtype:
            cfg["dtype"] = dtype
        (path / "config.json").write_text(json.dumps(cfg))
        ref, nat = load_encoder(str(path)), load_encoder(str(path), inference=True)
        assert isinstance(nat.model, Wav2Vec2Native) == native, dtype
        assert next(ref.model.parameters()).dtype == (torch.float32 if dtype == "float32" else torch.float16)
        assert encoder_fingerprint(ref, reuse=False) == encoder_fingerprint(nat, reuse=False)


def test_older_checkpoint_layouts_load_natively(tmp_path):
    """A *ForCTC checkpoint (``wav2vec2.`` prefix, head weights beside) whose positional
    convolution is saved as ``weight_g``/``weight_v``."""
    src = _wav2vec2_dir(tmp_path)
    state = load_file(str(src / "model.safetensors"))
    old = {}
    for k, v in state.items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v")
        old[f"wav2vec2.{k}"] = v
    old["lm_head.weight"] = torch.zeros(8, 32)
    dst = tmp_path / "ctc"
    dst.mkdir()
    save_file(old, str(dst / "model.safetensors"))
    for name in ("config.json", "preprocessor_config.json"):
        (dst / name).write_text((src / name).read_text())
    a, b = load_native(src), load_native(dst)
    assert a is not None and b is not None
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_other_families_adapters_and_the_switch_load_through_transformers(tmp_path, monkeypatch):
    for family in ("wavlm", "data2vec-audio"):
        enc = load_encoder(str(_wav2vec2_dir(tmp_path, family)), inference=True)
        assert not isinstance(enc.model, Wav2Vec2Native), family
    mms = _wav2vec2_dir(tmp_path, do_stable_layer_norm=True, adapter_attn_dim=8)
    assert load_native(mms) is None
    plain = _wav2vec2_dir(tmp_path)
    monkeypatch.setenv("SPEECHTL_NATIVE", "0")
    assert not isinstance(load_encoder(str(plain), inference=True).model, Wav2Vec2Native)
    monkeypatch.setenv("SPEECHTL_NATIVE", "1")
    assert isinstance(load_encoder(str(plain), inference=True).model, Wav2Vec2Native)


def test_missing_weights_fall_back_to_transformers(tmp_path):
    src = _wav2vec2_dir(tmp_path)
    state = load_file(str(src / "model.safetensors"))
    state.pop("encoder.layers.0.attention.q_proj.weight")
    save_file(state, str(src / "model.safetensors"))
    assert load_native(src) is None


def test_native_encoders_refuse_to_train(tmp_path):
    enc = load_encoder(str(_wav2vec2_dir(tmp_path)), inference=True)
    enc.train()
    w, n = _batch()
    with pytest.raises(RuntimeError, match="inference only"):
        enc(w, n)


def test_a_recogniser_decodes_without_importing_transformers_model_code(tmp_path):
    """The point of the native modules: loading a model and transcribing a file imports no
    transformers (its modelling code costs seconds), and gives transformers' logits."""
    from conftest import make_wav
    from speechtl.data.text import Normalizer, Vocabulary
    from speechtl.models.ctc import CTCModel, HeadConfig
    from speechtl.models.model_dir import load_model_dir, save_model_dir

    enc_dir = _wav2vec2_dir(tmp_path)
    vocab = Vocabulary.build(["ab ba cab"])
    torch.manual_seed(0)
    enc = load_encoder(str(enc_dir))
    model = CTCModel(enc, len(vocab), "frozen", HeadConfig(kind="bilstm", hidden_size=16), enc.num_layers, enc.hidden_size)
    _shake(model.head)
    out = save_model_dir(model, vocab, Normalizer(), tmp_path / "model")
    wav = make_wav(tmp_path / "a.wav", 1.3)
    script = (
        "import sys, json, torch; import speechtl\n"
        f"rec = speechtl.load({str(out)!r})\n"
        "from speechtl.data.audio import load_audio\n"
        f"w = torch.from_numpy(load_audio({str(wav)!r}))[None]\n"
        "with torch.inference_mode(): logits, _ = rec.model(w, torch.tensor([w.shape[1]]))\n"
        f"torch.save(logits, {str(tmp_path / 'native.pt')!r})\n"
        "print(json.dumps({'transformers': sorted(m for m in sys.modules if m.startswith('transformers')), "
        "'encoder': type(rec.model.encoder.model).__name__}))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == {"transformers": [], "encoder": "Wav2Vec2Native"}
    ref, _, _, _ = load_model_dir(out)
    from speechtl.data.audio import load_audio

    w = torch.from_numpy(load_audio(str(wav)))[None]
    with torch.inference_mode():
        expected, _ = ref(w, torch.tensor([w.shape[1]]))
    got = torch.load(tmp_path / "native.pt", weights_only=True)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.99


def test_an_unreadable_checkpoint_is_an_error_naming_the_file(tmp_path):
    path = _wav2vec2_dir(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # a copy cut short
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read these weights"):
        load_encoder(str(path), inference=True)
    weights.unlink()
    (path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: not a safetensors index"):
        load_encoder(str(path), inference=True)
