"""Encoder loading, batch/single consistency, heads, model directories."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_encoder_dir
from speechtl.data.loader import pad_waveforms
from speechtl.data.text import Normalizer, Vocabulary
from speechtl.encoders.registry import load_encoder, resolve_encoder
from speechtl.models.ctc import HeadConfig, build_model, ctc_loss
from speechtl.models.heads import BiLSTMHead, WeightedLayerSum
from speechtl.models.model_dir import load_model_dir, save_model_dir

FAMILIES = ["wav2vec2", "hubert", "wavlm", "data2vec-audio", "wav2vec2-conformer"]


def _waves(seed=0, lengths=(16000, 9100, 4003)):
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(n, generator=g) for n in lengths]


@pytest.mark.parametrize("family,norm", [(f, "layer") for f in FAMILIES] + [("wav2vec2", "group"), ("hubert", "group")])
def test_batch_matches_single_clips(tmp_path, family, norm):
    kw = {} if family == "data2vec-audio" else {"feat_extract_norm": norm}
    enc = load_encoder(str(tiny_encoder_dir(tmp_path, family, **kw))).eval()
    waves = _waves()
    x, lengths = pad_waveforms(waves)
    with torch.no_grad():
        batched = enc(x, lengths)
        assert len(batched.hidden_states) == enc.num_layers
        for i, w in enumerate(waves):
            single = enc(w[None], torch.tensor([w.numel()]))
            n = int(single.lengths[0])
            assert int(batched.lengths[i]) == n == single.hidden_states[-1].shape[1]
            for a, b in zip(batched.hidden_states, single.hidden_states):
                torch.testing.assert_close(a[i, :n], b[0], atol=1e-4, rtol=1e-4)


def test_group_norm_padding_would_change_features_without_per_clip_cnn(tmp_path):
    """The guard above is needed: naive zero padding changes group-norm features."""
    enc = load_encoder(str(tiny_encoder_dir(tmp_path, "wav2vec2", feat_extract_norm="group"))).eval()
    waves = _waves()
    x, lengths = pad_waveforms(waves)
    fe = enc.model.feature_extractor
    naive = type(fe).forward  # transformers' own, without speechtl's per-clip patch
    with torch.no_grad():
        padded = naive(fe, x)
        short = naive(fe, waves[2][None])
    n = short.shape[-1]
    assert not torch.allclose(padded[2, :, :n], short[0], atol=1e-3)


def test_frame_lengths_formula(tiny_encoder):
    enc = load_encoder(str(tiny_encoder))
    for n in (400, 401, 16000, 12345):
        with torch.no_grad():
            out = enc(torch.zeros(1, n), torch.tensor([n]))
        assert out.hidden_states[-1].shape[1] == enc.frame_lengths(n) == int(out.lengths[0])
    assert enc.frame_rate == pytest.approx(50.0)


def test_very_short_clip_gives_one_frame(tiny_encoder):
    enc = load_encoder(str(tiny_encoder)).eval()
    with torch.no_grad():
        out = enc(torch.zeros(2, 200), torch.tensor([200, 100]))
    assert out.lengths.tolist() == [1, 1]


def test_default_encoder_name_resolves_or_explains(tmp_path, monkeypatch):
    import speechtl.encoders.registry as encoder_mod

    path = resolve_encoder("default")  # shipped with the package
    assert json.load(open(path + "/config.json"))["model_type"] in ("wav2vec2", "whisper")
    monkeypatch.setattr(encoder_mod, "BUNDLED_DIR", tmp_path)  # an install without it
    with pytest.raises(FileNotFoundError, match="bundled encoder 'default' is not installed"):
        resolve_encoder("default")


def test_weighted_layer_sum_is_softmax_weighted():
    ws = WeightedLayerSum(3, layer_norm=False)
    with torch.no_grad():
        ws.weights.copy_(torch.tensor([0.0, 1.0, 2.0]))
    layers = [torch.full((1, 2, 4), float(v)) for v in (1, 2, 3)]
    w = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    assert torch.allclose(ws(layers), torch.full((1, 2, 4), float((w * torch.tensor([1.0, 2, 3])).sum())))


def test_bilstm_head_ignores_padding():
    torch.manual_seed(0)
    head = BiLSTMHead(8, 5, hidden_size=6).eval()
    x = torch.randn(2, 10, 8)
    full = head(x, torch.tensor([10, 6]))
    alone = head(x[1:2, :6], torch.tensor([6]))
    torch.testing.assert_close(full[1, :6], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_bilstm_head_on_cpu_equals_a_packed_run_with_its_gradients(layers):
    """The CPU path runs each direction over a padded batch; a packed run is the reference."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    head = BiLSTMHead(8, 5, hidden_size=6, num_layers=layers, dropout=0.0)
    x = torch.randn(3, 12, 8, requires_grad=True)
    lengths = torch.tensor([12, 7, 1])
    ours = head(x, lengths)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    ref = head.proj(pad_packed_sequence(head.lstm(packed)[0], batch_first=True, total_length=12)[0])
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    weights = torch.randn_like(ref)
    params = [x, *head.parameters()]
    for g_ours, g_ref in zip(torch.autograd.grad((ours * weights).sum(), params),
                             torch.autograd.grad((ref * weights).sum(), params)):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES[:4])
@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_each_family_trains_one_step(tmp_path, family, mode):
    enc_dir = tiny_encoder_dir(tmp_path, family)
    model = build_model(str(enc_dir), mode, vocab_size=6)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, lengths = pad_waveforms(_waves(lengths=(8000, 6000)))
    targets = torch.tensor([[3, 4, 5], [4, 5, 0]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits, frames = model(x, lengths)
    loss = ctc_loss(logits, frames, targets, torch.tensor([3, 2]))
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("head.") for k in changed)
    enc_changed = {k for k in changed if k.startswith("encoder.")}
    if mode == "frozen":
        assert not enc_changed
    else:
        assert enc_changed and not any("feature_extractor" in k for k in enc_changed)


@pytest.mark.parametrize("mode,head", [("frozen", "bilstm"), ("finetune", "linear")])
def test_model_dir_round_trip(tmp_path, tiny_encoder, mode, head):
    vocab = Vocabulary.build(["abc cab"])
    model = build_model(str(tiny_encoder), mode, len(vocab), HeadConfig(kind=head, hidden_size=8)).eval()
    save_model_dir(model, vocab, Normalizer(), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "speechtl.json").read_text())
    assert meta["mode"] == mode and meta["encoder"]["source"] == str(tiny_encoder)
    assert (tmp_path / "m" / "encoder" / "model.safetensors").is_file()
    loaded, vocab2, _, _ = load_model_dir(tmp_path / "m")
    assert vocab2.tokens == vocab.tokens
    x, lengths = pad_waveforms(_waves(lengths=(8000, 5000)))
    with torch.no_grad():
        a, _ = model(x, lengths)
        b, _ = loaded(x, lengths)
    torch.testing.assert_close(a, b)


def test_bilstm_head_refused_outside_frozen_mode(tiny_encoder):
    with pytest.raises(ValueError, match="linear head"):
        build_model(str(tiny_encoder), "finetune", 5, HeadConfig(kind="bilstm"))


def test_scratch_mode_has_random_weights(tiny_encoder):
    pre = build_model(str(tiny_encoder), "finetune", 5, seed=1)
    scratch = build_model(str(tiny_encoder), "scratch", 5, seed=1)
    k = "encoder.model.encoder.layers.0.attention.q_proj.weight"
    assert not torch.equal(pre.state_dict()[k], scratch.state_dict()[k])
    assert np.isclose(float(scratch.state_dict()[k].std()), float(pre.state_dict()[k].std()), rtol=0.5)


@pytest.mark.parametrize("mode,cnn_grad", [("finetune", False), ("scratch", True)])
def test_frozen_cnn_builds_no_graph(tiny_encoder, mode, cnn_grad):
    # a frozen CNN must not run its backward pass (it would only produce input gradients)
    model = build_model(str(tiny_encoder), mode, vocab_size=5).train()
    x, _ = pad_waveforms(_waves(lengths=(8000, 8000)))
    cnn_out = model.encoder.model.feature_extractor(x)
    assert cnn_out.requires_grad is cnn_grad


def test_frozen_feature_masking_only_in_training():
    from speechtl.encoders.base import mask_spans

    torch.manual_seed(0)
    x = torch.ones(4, 500, 32)
    lengths = torch.tensor([500, 400, 300, 50])
    y = mask_spans(x, lengths, 0.2, 5, 0.25, 4)
    time_masked = (y[:, :, :].abs().sum(-1) == 0).float()
    for i, n in enumerate(lengths.tolist()):
        assert time_masked[i, n:].sum() == 0  # padding is never chosen
        if n >= 300:
            assert 0.08 < time_masked[i, :n].mean() < 0.25  # about 20 % (overlapping spans merge)
    assert ((y == 0).all(dim=1)).any(dim=-1).all()  # each clip lost some channels
    assert mask_spans(x, lengths, 0.0, 5) is x


def test_frozen_masking_config_reaches_the_model(tmp_path, tones, tiny_encoder):
    from speechtl.models.ctc import build_model

    m = build_model(str(tiny_encoder), "frozen", 8, config_overrides={"frozen_mask_time_prob": 0.3, "mask_time_length": 4,
                                                                       "mask_time_prob": 0.05})
    assert m.feature_masking == (0.3, 4, 0.0, 10)
    hidden = torch.randn(m.encoder.num_layers, 2, 200, m.encoder.hidden_size)
    lengths = torch.tensor([200, 150])
    m.eval()
    a, _ = m.forward_features(hidden, lengths)
    b, _ = m.forward_features(hidden, lengths)
    assert torch.equal(a, b)  # no masking (or dropout) in eval
    ft = build_model(str(tiny_encoder), "finetune", 8, config_overrides={"frozen_mask_time_prob": 0.3})
    assert ft.feature_masking[0] == 0.0


@pytest.mark.parametrize("family,norm", [(f, "layer") for f in FAMILIES] + [("wav2vec2", "group"), ("hubert", "group")])
def test_time_major_cnn_equals_transformers(tmp_path, family, norm):
    kw = {"conv_bias": True} if family == "data2vec-audio" else {"feat_extract_norm": norm, "conv_bias": norm == "layer"}
    enc = load_encoder(str(tiny_encoder_dir(tmp_path, family, **kw))).eval()
    assert enc.fast_cnn
    values, lengths = pad_waveforms(_waves(seed=3))
    with torch.inference_mode():
        fast = enc(values, lengths)
        enc.fast_cnn = False
        slow = enc(values, lengths)
    for a, b in zip(fast.hidden_states, slow.hidden_states):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(fast.lengths, slow.lengths)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_time_major_cnn_in_blocks_and_under_cpu_bf16_autocast(tmp_path, norm):
    import speechtl.encoders.fast_cnn as enc_mod

    enc = load_encoder(str(tiny_encoder_dir(tmp_path, "wav2vec2", feat_extract_norm=norm, conv_bias=True))).eval()
    layers = enc.model.feature_extractor.conv_layers
    x = torch.randn(2, 16_000, generator=torch.Generator().manual_seed(0))
    enc.fast_cnn = False
    with torch.inference_mode():
        ref = enc.model.feature_extractor(x)  # transformers' own, float32
        whole = enc_mod.time_major_cnn(layers, x, chunk_values=1 << 40)
        blocks = enc_mod.time_major_cnn(layers, x, chunk_values=1)  # blocks of 64 frames
        assert whole.shape == blocks.shape == ref.shape
        torch.testing.assert_close(blocks, whole, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(blocks, ref, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = enc_mod.time_major_cnn(layers, x, chunk_values=1)
            theirs = enc.model.feature_extractor(x)  # transformers' CNN under the same autocast
    assert low.dtype == torch.bfloat16
    for other in (ref, theirs.float()):
        assert ((low.float() - other).norm() / other.norm()).item() < 0.03


def test_time_major_cnn_only_without_cnn_gradients(tiny_encoder):
    import speechtl.encoders.fast_cnn as enc_mod

    calls = []
    real = enc_mod.time_major_cnn
    enc_mod.time_major_cnn = lambda *a: calls.append(1) or real(*a)
    try:
        model = build_model(str(tiny_encoder), "scratch", vocab_size=5).train()  # trains its CNN
        values, lengths = pad_waveforms(_waves())
        logits, _ = model(values, lengths)
        logits.sum().backward()
        assert not calls  # transformers' own CNN, which gradients flow through
        assert model.encoder.model.feature_extractor.conv_layers[0].conv.weight.grad is not None
        with torch.no_grad():
            model(values, lengths)
        assert calls
    finally:
        enc_mod.time_major_cnn = real


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_copies_of_an_encoder_run_their_own_weights(tmp_path, norm):
    import copy

    enc = load_encoder(str(tiny_encoder_dir(tmp_path, "wav2vec2", feat_extract_norm=norm))).eval()
    waves = _waves()
    x, lengths = pad_waveforms(waves)
    with torch.no_grad():
        before = enc(x, lengths).hidden_states[-1]
        twin = copy.deepcopy(enc)
        twin.model.feature_extractor.conv_layers[0].conv.weight.mul_(-1.0)  # change the copy's CNN only
        assert not torch.allclose(twin(x, lengths).hidden_states[-1], before, atol=1e-4)
        torch.testing.assert_close(enc(x, lengths).hidden_states[-1], before)  # the original is untouched
        enc.model.feature_extractor.conv_layers[0].conv.weight.mul_(-1.0)  # and the other way round
        torch.testing.assert_close(enc(x, lengths).hidden_states[-1], twin(x, lengths).hidden_states[-1])
