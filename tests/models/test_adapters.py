"""mode=adapter: LoRA and MMS-style adapters in a fixed encoder, one per language beside one base."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import speechtl
from conftest import make_wav, tiny_encoder_dir
from speechtl.cli.app import main
from speechtl.data.manifest import Utterance, read_manifest, write_manifest
from speechtl.data.text import Normalizer, Vocabulary
from speechtl.models.adapters import AdapterConfig
from speechtl.models.ctc import build_model
from speechtl.models.model_dir import save_model_dir
from speechtl.training.config import load_train_config
from speechtl.training.train import train


def _corpus(root: Path, words: list[str], freq: float, seed: int, n: int = 8) -> Path:
    """Short tones with long transcripts: about one token per two frames, so that CTC leaves
    its all-blank start within a few updates and the languages' transcripts can be compared."""
    rng = np.random.default_rng(seed)
    utts = []
    for i in range(n):
        seconds = float(rng.uniform(0.7, 0.9))
        path = make_wav(root / "wavs" / f"{seed}-{i}.wav", seconds, freq=freq + 60 * i, seed=seed + i)
        utts.append(Utterance(f"{seed}-{i}", str(path), " ".join(rng.choice(words, size=7)), seconds))
    return write_manifest(root / "manifest.jsonl", utts)


def _cfg(out, corpus, encoder, **kw):
    base = dict(encoder=str(encoder), train=str(corpus), out=str(out), max_steps=10, eval_every=10, num_workers=0,
                max_batch_seconds=4.0, lr=3e-2, seed=0, mode="adapter", mask_time_prob=0.0, layerdrop=0.0)
    base.update(kw)
    return load_train_config(None, base)


@pytest.fixture(scope="module")
def stable_encoder(tmp_path_factory):
    """A tiny stable-layer-norm wav2vec2 (the MMS/XLS-R layout, where transformers runs adapters itself)."""
    return tiny_encoder_dir(tmp_path_factory.mktemp("enc"), do_stable_layer_norm=True)


@pytest.fixture(scope="module")
def cs(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("cs"), ["ab", "ba"], 200, 1)


@pytest.fixture(scope="module")
def it(tmp_path_factory):
    """A second language: other tones, other characters."""
    return _corpus(tmp_path_factory.mktemp("it"), ["xy", "yx"], 900, 2)


@pytest.fixture(scope="module", params=["mms", "lora"])
def two_languages(request, tmp_path_factory, cs, it, stable_encoder, tiny_encoder):
    """An adapter model trained for cs, then it (other sounds, other characters) added beside it.
    MMS on the stable-layer-norm encoder; LoRA on the post-layer-norm one."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    encoder = stable_encoder if kind == "mms" else tiny_encoder
    first = train(_cfg(root / "cs", cs, encoder, adapter=kind, lang="cs", dev=str(cs)), progress=False)
    second = train(_cfg(root / "both", it, encoder, init_from=str(root / "cs"), lang="it"), progress=False)
    return {"kind": kind, "encoder": encoder, "cs": root / "cs" / "model", "both": root / "both" / "model",
            "summary": first, "summary_it": second}


def _head_size(hidden, vocab):
    return hidden * vocab + vocab


def test_trainable_parameters_are_the_adapters_and_the_head(two_languages):
    summary, kind = two_languages["summary"], two_languages["kind"]
    base = sum(v.numel() for v in load_file(str(two_languages["encoder"] / "model.safetensors")).values())
    hidden, ffn, layers = 32, 64, 2  # conftest's tiny encoder
    if kind == "lora":  # rank 8 on q, k, v, out (32 -> 32) and the feed-forward pair (32 -> 64 -> 32)
        adapters = layers * 8 * (4 * (hidden + hidden) + 2 * (hidden + ffn))
    else:  # norm (2 x 32), down 32 -> 16, up 16 -> 32, with biases
        adapters = layers * (2 * hidden + hidden * 16 + 16 + 16 * hidden + hidden)
    vocab = len(Vocabulary.load(two_languages["cs"] / "vocab.cs.json"))
    assert summary["adapter_parameters"] == adapters
    assert summary["trainable_parameters"] == adapters + _head_size(hidden, vocab)
    assert summary["total_parameters"] == base + adapters + _head_size(hidden, vocab)
    assert summary["language"] == "cs" and two_languages["summary_it"]["languages"] == ["cs", "it"]


def test_the_base_encoder_stays_bit_identical_and_the_adapters_train(two_languages):
    src = load_file(str(two_languages["encoder"] / "model.safetensors"))
    for folder in ("cs", "both"):
        saved = load_file(str(two_languages[folder] / "encoder" / "model.safetensors"))
        assert saved.keys() == src.keys()
        assert all(torch.equal(src[k], saved[k]) for k in src), "a base encoder weight changed"
    names = sorted(p.name for p in two_languages["both"].iterdir())
    assert names == ["adapter.cs.safetensors", "adapter.it.safetensors", "encoder", "normalizer.cs.json",
                     "normalizer.it.json", "speechtl.json", "vocab.cs.json", "vocab.it.json"]
    # adding a language leaves the others' files as they were
    for name in ("adapter.cs.safetensors", "vocab.cs.json", "normalizer.cs.json"):
        assert (two_languages["both"] / name).read_bytes() == (two_languages["cs"] / name).read_bytes()
    state = load_file(str(two_languages["cs"] / "adapter.cs.safetensors"))
    fresh = build_model(str(two_languages["encoder"]), "adapter", 8, seed=0, adapter=_adapter(two_languages["kind"]),
                        language="cs")
    from speechtl.models.adapters import adapter_state

    init = adapter_state(fresh.encoder)
    assert set(init) == {k[len("adapter."):] for k in state if k.startswith("adapter.")}
    assert any(not torch.equal(init[k], state[f"adapter.{k}"]) for k in init), "the adapters never trained"


def _adapter(kind):
    return AdapterConfig("lora", 8, 16.0) if kind == "lora" else AdapterConfig("mms", dim=16)


def test_switching_languages_gives_each_its_own_transcripts(two_languages, cs, it, monkeypatch):
    both = two_languages["both"]
    audio = [u.audio for u in read_manifest(cs)[:3] + read_manifest(it)[:3]]
    direct = {lang: speechtl.load(both, lang=lang).transcribe(audio) for lang in ("cs", "it")}
    assert direct["cs"] != direct["it"]
    assert any(t.strip() for t in direct["cs"]) and any(t.strip() for t in direct["it"])
    rec = speechtl.load(both)
    assert rec.language == "it" and rec.languages == ["cs", "it"]  # the language trained last by default
    assert rec.transcribe(audio) == direct["it"]
    encoder = rec.model.encoder
    import speechtl.models.model_dir as model_mod

    monkeypatch.setattr(model_mod, "load_encoder", lambda *a, **k: pytest.fail("switching reloaded the encoder"))
    assert rec.set_language("cs").transcribe(audio) == direct["cs"]
    assert rec.set_language("it").transcribe(audio) == direct["it"]
    assert rec.model.encoder is encoder and rec.language == "it"
    # the cs model before it was added transcribes as the cs adapter of the two-language model
    monkeypatch.undo()
    assert speechtl.load(two_languages["cs"]).transcribe(audio) == direct["cs"]


@pytest.mark.parametrize("native", [True, False], ids=["speechtl-modules", "transformers-peft"])
def test_a_recogniser_folds_lora_into_the_base_and_keeps_its_outputs(two_languages, cs, it, native, monkeypatch):
    """A recogniser folds each LoRA update into its projection's weight: with peft's merge on
    transformers' modules, or by speechtl on its own (speechtl.encoders.native, the default), and
    either gives the outputs of the updates computed beside the base, as trained."""
    from speechtl.data.audio import load_audio
    from speechtl.data.loader import pad_waveforms
    from speechtl.encoders.native import is_native
    from speechtl.models import adapters as adapter_lib
    from speechtl.models.model_dir import load_model_dir

    if two_languages["kind"] != "lora":
        pytest.skip("LoRA only: MMS adapters are layers of their own")
    monkeypatch.setenv("SPEECHTL_NATIVE", "1" if native else "0")
    both = two_languages["both"]
    wavs, lengths = pad_waveforms([torch.from_numpy(load_audio(u.audio)) for u in read_manifest(it)[:3]])
    rec = speechtl.load(both, lang="it")
    assert is_native(rec.model.encoder) == native
    plain, *_ = load_model_dir(both, lang="it")  # as trained: the updates computed beside the base
    assert not is_native(plain.encoder) and not adapter_lib.lora_is_merged(plain.encoder.model)
    with torch.inference_mode():
        merged_out, plain_out = rec.model(wavs, lengths)[0], plain.eval()(wavs, lengths)[0]
    torch.testing.assert_close(merged_out, plain_out, atol=1e-4, rtol=1e-4)
    plain_base = adapter_lib.base_state_dict(plain.encoder.model, plain.encoder.adapter_keys)
    if native:
        base = rec.model.encoder.lora_base  # the adapted projections' weights as loaded
        assert base and set(base) < set(plain_base)
    else:
        assert adapter_lib.lora_is_merged(rec.model.encoder.model)
        base = adapter_lib.base_state_dict(rec.model.encoder.model, rec.model.encoder.adapter_keys)
    for k, v in base.items():
        torch.testing.assert_close(v, plain_base[k], atol=1e-6, rtol=1e-5)  # the base weights, not the merged ones
    # switching languages takes one language's updates out and folds the other's in, both ways
    plain_cs, *_ = load_model_dir(both, lang="cs")
    for lang, ref in (("cs", plain_cs), ("it", plain), ("cs", plain_cs)):
        rec.set_language(lang)
        with torch.inference_mode():
            torch.testing.assert_close(rec.model(wavs, lengths)[0], ref.eval()(wavs, lengths)[0], atol=1e-4, rtol=1e-4)


def test_a_model_loaded_for_inference_is_not_saved(two_languages, tmp_path):
    from speechtl.models.model_dir import save_model_dir

    rec = speechtl.load(two_languages["both"])
    if two_languages["kind"] == "lora":  # speechtl's own modules, the updates folded in: no adapters to save
        with pytest.raises(ValueError, match="inference only"):
            save_model_dir(rec.model, rec.vocab, rec.normalizer, tmp_path / "copy")
        assert not (tmp_path / "copy").exists()
    else:  # MMS layers load through transformers, and such a model saves as trained
        save_model_dir(rec.model, rec.vocab, rec.normalizer, tmp_path / "copy")
        assert (tmp_path / "copy" / "adapter.it.safetensors").is_file()


def test_cli_lang_switches_and_names_the_languages_a_model_has(two_languages, cs, tmp_path, capsys):
    both = two_languages["both"]
    wav = read_manifest(cs)[1].audio
    for lang in ("cs", "it"):
        assert main(["transcribe", str(both), wav, "--lang", lang, "-q"]) == 0
        assert capsys.readouterr().out.strip() == speechtl.load(both, lang=lang).transcribe(wav)
    assert main(["evaluate", str(both), str(cs), "--lang", "cs", "--json", str(tmp_path / "e.json"), "-q"]) == 0
    summary = json.loads((tmp_path / "e.json").read_text())
    assert summary["utterances"] == len(read_manifest(cs))
    # the dev score written while training the cs adapter is what evaluate gives it now
    assert summary["cer"] == pytest.approx(two_languages["summary"]["best_dev_cer"])
    assert main(["transcribe", str(both), wav, "--lang", "pl", "-q"]) == 1
    assert "no adapter for language 'pl'; this model has cs, it" in capsys.readouterr().err


def test_a_language_the_model_lacks_is_named(two_languages, cs, tmp_path):
    both = two_languages["both"]
    with pytest.raises(ValueError, match="no adapter for language 'pl'; this model has cs, it"):
        speechtl.load(both, lang="pl")
    rec = speechtl.load(both, lang="cs")
    with pytest.raises(ValueError, match="this model has cs, it"):
        rec.set_language("pl")
    assert rec.language == "cs"  # unchanged after the refusal
    # a model without adapters has no languages to choose
    plain = tmp_path / "plain"
    train(_cfg(plain, cs, two_languages["encoder"], mode="finetune", max_steps=1, lr=1e-3), progress=False)
    with pytest.raises(ValueError, match="no per-language adapters"):
        speechtl.load(plain, lang="cs")
    with pytest.raises(ValueError, match="no per-language adapters"):
        speechtl.load(plain).set_language("cs")


def test_a_fine_tuned_model_becomes_the_base_of_an_adapter(tmp_path, cs, tiny_encoder):
    train(_cfg(tmp_path / "ft", cs, tiny_encoder, mode="finetune", max_steps=2, lr=1e-2, encoder_lr=1e-2), progress=False)
    # lr 0: what init_from carried is what is saved
    train(_cfg(tmp_path / "ad", cs, tiny_encoder, init_from=str(tmp_path / "ft"), lang="cs", max_steps=1, lr=0.0),
          progress=False)
    ft, ad = tmp_path / "ft" / "model", tmp_path / "ad" / "model"
    a, b = load_file(str(ft / "encoder" / "model.safetensors")), load_file(str(ad / "encoder" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    head, language = load_file(str(ft / "head.safetensors")), load_file(str(ad / "adapter.cs.safetensors"))
    assert all(torch.equal(head[k], language[k]) for k in head)


def test_continuing_a_language_the_model_has(two_languages, cs, tmp_path):
    both = two_languages["both"]
    summary = train(_cfg(tmp_path / "again", cs, two_languages["encoder"], init_from=str(both), lang="cs", max_steps=1,
                         lr=0.0), progress=False)
    again = tmp_path / "again" / "model"
    assert summary["languages"] == ["cs", "it"]
    before, after = load_file(str(both / "adapter.cs.safetensors")), load_file(str(again / "adapter.cs.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (again / "adapter.it.safetensors").read_bytes() == (both / "adapter.it.safetensors").read_bytes()


def test_resume_and_averaging_in_adapter_mode(tmp_path, cs, tiny_encoder):
    from speechtl.training.train import TrainingInterrupted

    # threads=1: a run and its resumed copy repeat exactly only on a fixed thread count
    kw = dict(adapter="lora", lang="cs", max_steps=4, eval_every=1, average_last=2, lora_rank=2, threads=1)
    train(_cfg(tmp_path / "straight", cs, tiny_encoder, **kw), progress=False)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tmp_path / "broken", cs, tiny_encoder, **kw), progress=False, should_stop=lambda step: step == 2)
    train(_cfg(tmp_path / "broken", cs, tiny_encoder, resume=True, **kw), progress=False)
    for folder in ("model", "model_avg"):
        a = load_file(str(tmp_path / "straight" / folder / "adapter.cs.safetensors"))
        b = load_file(str(tmp_path / "broken" / folder / "adapter.cs.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    snaps = [load_file(str(f)) for f in sorted((tmp_path / "straight" / "checkpoints").glob("eval-*.safetensors"))]
    assert all(k.startswith("head.") or "lora_" in k for k in snaps[0]), "a snapshot holds base encoder weights"
    avg = load_file(str(tmp_path / "straight" / "model_avg" / "adapter.cs.safetensors"))
    key = next(k for k in avg if "lora_B" in k)
    peft_key = "encoder.model." + key[len("adapter."):].replace(".lora_B.", ".lora_B.default.")
    torch.testing.assert_close(avg[key], (snaps[0][peft_key] + snaps[1][peft_key]) / 2)
    assert speechtl.load(tmp_path / "straight" / "model_avg").language == "cs"


def test_adding_a_language_needs_the_same_adapters(two_languages, it, tmp_path):
    kind, both = two_languages["kind"], two_languages["both"]
    wrong = {"adapter": "lora"} if kind == "mms" else {"lora_rank": 4}
    key = "adapter" if kind == "mms" else "lora_rank"
    with pytest.raises(ValueError, match=f"config key '{key}'.*every language of one model shares"):
        train(_cfg(tmp_path / "a", it, two_languages["encoder"], init_from=str(both), lang="pl", **wrong), progress=False)
    with pytest.raises(ValueError, match="config key 'init_from'.*is an adapter model"):
        train(_cfg(tmp_path / "b", it, two_languages["encoder"], init_from=str(both), mode="finetune"), progress=False)


def test_export_mms_loads_every_language_with_load_adapter(two_languages, cs, it, tmp_path):
    from transformers import AutoProcessor, Wav2Vec2ForCTC

    from speechtl.data.audio import load_audio

    both = two_languages["both"]
    utts = read_manifest(cs)[:3] + read_manifest(it)[:3]
    if two_languages["kind"] == "lora":
        # LoRA exports one language at a time, its updates folded into the weights: the same
        # function, computed in another order, so the logits agree to rounding
        for lang in ("cs", "it"):
            assert main(["export", str(both), "--out", str(tmp_path / lang), "--lang", lang, "-q"]) == 0
            model = Wav2Vec2ForCTC.from_pretrained(str(tmp_path / lang)).eval()
            processor = AutoProcessor.from_pretrained(str(tmp_path / lang))
            rec = speechtl.load(both, lang=lang)
            for u in utts:
                audio = load_audio(u.audio)
                with torch.no_grad():
                    theirs = model(**processor(audio, sampling_rate=16000, return_tensors="pt")).logits
                    ours, _ = rec.model(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
                torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
                # transformers' tokenizer keeps the double space of "x | | x"; speechtl writes one
                assert " ".join(processor.decode(theirs.argmax(-1)[0]).split()) == rec.transcribe(u.audio)
        return
    assert main(["export", str(both), "--out", str(tmp_path / "hf"), "-q"]) == 0
    assert {p.name for p in (tmp_path / "hf").glob("adapter.*")} == {"adapter.cs.safetensors", "adapter.it.safetensors"}
    model = Wav2Vec2ForCTC.from_pretrained(str(tmp_path / "hf")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"))
    assert model.config.adapter_attn_dim == 16
    for lang in ("cs", "it", "cs"):
        model.load_adapter(lang)
        processor.tokenizer.set_target_lang(lang)
        theirs = []
        for u in utts:
            inputs = processor(load_audio(u.audio), sampling_rate=16000, return_tensors="pt")
            with torch.no_grad():
                ids = model(**inputs).logits.argmax(-1)[0]
            theirs.append(processor.decode(ids))
        ours = speechtl.load(both, lang=lang).transcribe([u.audio for u in utts])
        assert any(t.strip() for t in ours)
        assert theirs == ours, lang


def test_mms_adapters_need_a_wav2vec2_encoder_and_a_stable_layer_norm_to_export(tmp_path, tones, tiny_encoder, capsys):
    hubert = tiny_encoder_dir(tmp_path, "hubert")
    with pytest.raises(ValueError, match="config key 'adapter': adapter=mms .* this encoder is 'hubert'"):
        train(_cfg(tmp_path / "h", tones, hubert, adapter="mms", lang="cs"), progress=False)
    # a post-layer-norm wav2vec2 takes them (speechtl runs them), but transformers would drop them on export
    model = build_model(str(tiny_encoder), "adapter", 5, adapter=AdapterConfig("mms", dim=4), language="cs")
    vocab = Vocabulary(["<pad>", "[UNK]", "|", "a", "b"])
    save_model_dir(model, vocab, Normalizer(), tmp_path / "post")
    assert main(["export", str(tmp_path / "post"), "--out", str(tmp_path / "hf")]) == 1
    assert "runs adapter layers only in stable-layer-norm" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_adapter_configuration_mistakes_are_named(tmp_path, tones, tiny_encoder):
    for kw, match in (({"mode": "finetune", "lang": "cs"}, "config key 'lang': for mode=adapter"),
                      ({"adapter": "prefix"}, "config key 'adapter': 'prefix' is not one of lora, mms"),
                      ({"lang": "../cs"}, "config key 'lang': '../cs' is not a language code"),
                      ({"adapter": "mms", "lora_rank": 4}, "for adapter=lora"),
                      ({"adapter": "lora", "adapter_dim": 4}, "for adapter=mms"),
                      ({"head": "bilstm"}, "adapter mode uses a linear head"),
                      ({"freeze_layers": 1}, "freeze_layers")):
        with pytest.raises(ValueError, match=match):
            load_train_config(None, {"train": "x", "mode": "adapter", **kw})
    with pytest.raises(ValueError, match="config key 'lang': mode=adapter needs the language"):
        train(_cfg(tmp_path / "a", tones, tiny_encoder), progress=False)


def test_the_manifest_language_names_the_adapter(tmp_path, tones, tiny_encoder):
    utts = [Utterance(u.id, u.audio, u.text, u.duration, lang="sw") for u in read_manifest(tones)]
    manifest = write_manifest(tmp_path / "sw.jsonl", utts)
    summary = train(_cfg(tmp_path / "out", manifest, tiny_encoder, max_steps=1, adapter="mms", adapter_dim=4),
                    progress=False)
    assert summary["language"] == "sw" and (tmp_path / "out" / "model" / "adapter.sw.safetensors").is_file()
    assert summary["adapter"] == {"kind": "mms", "dim": 4}


def test_lora_on_whisper_adapts_attention_and_feed_forward(tmp_path):
    from transformers import WhisperModel

    from speechtl.encoders.whisper import tiny_whisper_config

    torch.manual_seed(0)
    WhisperModel(tiny_whisper_config()).save_pretrained(str(tmp_path / "w"))
    model = build_model(str(tmp_path / "w"), "adapter", 6, adapter=AdapterConfig("lora", 2, 4.0), language="cs")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    d, ffn = 32, 64
    assert sum(p.numel() for p in model.adapter_parameters()) == 2 * 2 * (4 * (d + d) + 2 * (d + ffn))
    with pytest.raises(ValueError, match="config key 'adapter': adapter=mms .* 'whisper'"):
        build_model(str(tmp_path / "w"), "adapter", 6, adapter=AdapterConfig("mms", dim=4), language="cs")


@pytest.mark.parametrize("kind", ["lora", "mms"])
def test_a_second_language_adds_under_5_percent_of_the_base_on_disk(tmp_path, kind):
    """On a random encoder of the bundled wav2vec2's shape (6 layers of 256, feed-forward 1024,
    a 256-channel CNN), with a Czech-sized character set: the tiny test encoder is so small
    that any adapter and head look big beside it (21 % for LoRA, 10 % for MMS), which would
    not say how a real encoder fares."""
    enc = tiny_encoder_dir(tmp_path, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024,
                           conv_dim=(256,) * 7, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16)
    vocab = Vocabulary(["<pad>", "[UNK]", "|", *"abcdefghijklmnopqrstuvwxyzáčďéěíňóřšťúůýž'"])
    model = build_model(str(enc), "adapter", len(vocab), adapter=_adapter(kind), language="cs")
    save_model_dir(model, vocab, Normalizer(), tmp_path / "m")
    base = (tmp_path / "m" / "encoder" / "model.safetensors").stat().st_size
    language = sum((tmp_path / "m" / name).stat().st_size
                   for name in ("adapter.cs.safetensors", "vocab.cs.json", "normalizer.cs.json"))
    assert language < 0.05 * base, (language, base)
