"""Subword output units (``units=bpe:N`` / ``unigram:N``): the tokenizer, training, decoding
(greedy, word times, beam search with a word LM, alignment), export, init_from, resume,
and old character model folders."""

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
import torch

from speechtl.data.manifest import read_manifest, write_manifest
from speechtl.data.units import WORD_START, SubwordVocabulary
from speechtl.decoding.options import DecodeOptions
from speechtl.training.config import config_help, load_train_config
from speechtl.training.train import train

TRAIN_WORDS = {"ab", "ba", "cab", "abc", "cc", "bad"}  # conftest.tone_corpus's words
UNITS = "bpe:20"


def _cfg(out, corpus, encoder, **kw):
    base = dict(encoder=str(encoder), mode="finetune", train=str(corpus), out=str(out), max_steps=30, eval_every=30,
                num_workers=0, max_batch_seconds=4.0, lr=2e-2, encoder_lr=1e-3, mask_time_prob=0.0, seed=0, units=UNITS)
    base.update(kw)
    return load_train_config(None, base)


def _with_texts(path, utts, texts):
    return write_manifest(path, [dataclasses.replace(u, text=t) for u, t in zip(utts, texts)])


@pytest.fixture(scope="module")
def dev_with_z(tmp_path_factory, tones):
    """The tone clips with transcripts that use "z", a character the training text lacks."""
    utts = read_manifest(tones)
    return _with_texts(tmp_path_factory.mktemp("devz") / "dev.jsonl", utts, [f"z{u.text}" for u in utts])


@pytest.fixture(scope="module")
def subword_model(tmp_path_factory, tones, tiny_encoder, dev_with_z):
    out = tmp_path_factory.mktemp("bpe") / "run"
    train(_cfg(out, tones, tiny_encoder, dev=str(dev_with_z)), progress=False)
    return out / "model"


@pytest.fixture(scope="module")
def char_model(tmp_path_factory, tones, tiny_encoder):
    out = tmp_path_factory.mktemp("char") / "run"
    train(_cfg(out, tones, tiny_encoder, units="char", max_steps=1), progress=False)
    return out / "model"


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("value, message", [
    ("bpe:0", "N must be at least 3"), ("unigram:2", "N must be at least 3"), ("foo", "is not char, bpe:N or unigram:N"),
    ("bpe", "is not char"), ("bpe:x", "is not char"), ("bpe:-4", "is not char"), (500, "is not char"),
])
def test_bad_units_values_are_errors_naming_the_key(value, message):
    with pytest.raises(ValueError, match=f"config key 'units'.*{message}"):
        load_train_config(None, {"train": "x", "units": value})


def test_units_key_is_documented_and_its_neighbours_checked(tmp_path):
    help_text = config_help()
    assert "units" in help_text and "bpe:N" in help_text and "unigram:N" in help_text and "(default: char)" in help_text
    assert load_train_config(None, ["train=x", "units=unigram:300"]).units == "unigram:300"
    assert load_train_config(None, {"train": "x"}).units == "char"
    with pytest.raises(ValueError, match="config key 'vocab'.*units=bpe:30"):
        load_train_config(None, {"train": "x", "units": "bpe:30", "vocab": "v.json"})
    with pytest.raises(ValueError, match="config key 'units'.*mode=adapter"):
        load_train_config(None, {"train": "x", "units": "bpe:30", "mode": "adapter"})


# ----------------------------------------------------------------------------- the tokenizer


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_covers_the_training_characters_and_decodes_as_its_file(tmp_path, kind):
    from tokenizers import Tokenizer

    texts = ["ab ba", "cab abc", "cc bad", "abc cab", "bad ba"] * 3
    vocab = SubwordVocabulary.train(texts, f"{kind}:14")
    assert vocab.kind == kind and vocab.units == f"{kind}:14" and vocab.tokens[:2] == ["<pad>", "\u2047"]
    assert vocab.alphabet == set("abcd") and WORD_START in vocab.tokens
    assert len(vocab) <= 15 and any(len(t) > 2 for t in vocab.tokens)  # some pieces longer than a character
    ids = vocab.encode("cab bad zab")
    assert vocab.oov == {"z": 1} and vocab.unk_id in ids
    vocab.save_tokenizer(tmp_path / "tokenizer.json")
    saved = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert saved.encode("cab bad zab").ids == ids
    assert vocab.decode(ids) == saved.decode(ids) == "cab bad \u2047ab"
    assert vocab.oov_report(["zz ab", "y"]) == {"z": 2, "y": 1}
    with pytest.raises(ValueError, match=f"config key 'units'.*{kind}:6 is too few.*4 distinct characters.*{kind}:7"):
        SubwordVocabulary.train(texts, f"{kind}:6")


def test_tokenizer_is_trained_on_the_training_text_and_dev_characters_are_reported_as_before(tmp_path, tones,
                                                                                              dev_with_z, caplog):
    from speechtl.data.text import Normalizer
    from speechtl.training.data import TrainData, choose_vocab

    data = TrainData(Normalizer(), None, read_manifest(tones), read_manifest(dev_with_z), [], [])
    warnings = {}
    for units in ("char", UNITS):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="speechtl.training.data"):
            vocab = choose_vocab(load_train_config(None, {"train": str(tones), "units": units}), data, None)
        warnings[units] = [r.getMessage() for r in caplog.records]
    assert isinstance(vocab, SubwordVocabulary)
    assert not any("z" in t for t in vocab.tokens), "a dev character reached the tokenizer"
    assert {ch for t in vocab.tokens[2:] for ch in t} == set("abcd") | {WORD_START}
    assert warnings[UNITS] == warnings["char"] == ["dev set: 8 out-of-vocabulary character(s): 'z'×8 (mapped to [UNK])"]


# ----------------------------------------------------------------------------- decoding


def test_words_and_times_are_pieces_joined_at_the_word_marker():
    from speechtl.decoding.decoders import words_from_runs

    vocab = SubwordVocabulary.train(["ab ba", "cab abc", "cc bad", "abc cab", "bad ba"] * 3, "bpe:14")
    ix = vocab.index
    runs = [(ix["▁c"], 0, 1), (ix["ab"], 3, 4), (ix["▁"], 6, 6), (ix["ab"], 7, 8), (vocab.unk_id, 9, 9),
            (ix["▁ba"], 12, 13)]
    probs = np.linspace(0.5, 0.9, 14)
    words = words_from_runs(runs, probs, vocab, 0.02)
    assert [(w.word, w.start, w.end) for w in words] == [("cab", 0.0, 0.1), ("ab\u2047", 0.14, 0.2), ("ba", 0.24, 0.28)]
    assert words[0].confidence == pytest.approx(np.mean(probs[[0, 1, 3, 4]]), abs=1e-4)
    assert " ".join(w.word for w in words) == vocab.decode([t for t, _, _ in runs])


def test_beam_search_keeps_a_lone_word_marker_inside_its_word():
    """pyctcdecode would split the piece after a lone "▁" off as a word of its own."""
    pytest.importorskip("pyctcdecode")
    from speechtl.decoding.decoders import BeamDecoder, GreedyDecoder

    vocab = SubwordVocabulary.train(["ab ba", "cab abc", "cc bad", "abc cab", "bad ba"] * 3, "bpe:14")
    path = [vocab.index[p] for p in ("▁c", "ab", "▁", "ab", "c", "▁ba")]
    frames = [i for p in path for i in (p, 0)]
    lp = np.full((len(frames), len(vocab)), -9.0)
    lp[np.arange(len(frames)), frames] = np.log(0.8)
    lone = vocab.index[WORD_START]
    lp[[t for t, i in enumerate(frames) if i != lone], lone] = np.log(0.15)  # the marker: always a close runner-up
    lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
    greedy = [w.word for w in GreedyDecoder(vocab)(lp, 0.02)]
    assert greedy == ["cab", "abc", "ba"]
    for width in (1, 8):
        assert [w.word for w in BeamDecoder(vocab, beam_width=width)(lp, 0.02)] == greedy


def test_subword_model_loads_and_decodes_into_words(subword_model, tones, capsys):
    from tokenizers import Tokenizer

    import speechtl
    from speechtl.data.audio import load_audio
    from speechtl.decoding.decoders import align_words, greedy_ids
    from speechtl.inference.recognizer import decode_hyps

    meta = json.loads((subword_model / "speechtl.json").read_text())
    assert meta["units"] == UNITS and meta["vocab_size"] == len(json.loads((subword_model / "vocab.json").read_text()))
    saved = Tokenizer.from_file(str(subword_model / "tokenizer.json"))
    rec = speechtl.load(subword_model)
    assert isinstance(rec.vocab, SubwordVocabulary)
    assert rec.vocab.tokens == [saved.id_to_token(i) for i in range(len(rec.vocab))]
    utts = read_manifest(tones)
    texts = rec.transcribe([u.audio for u in utts], options=DecodeOptions())  # greedy, as decode_hyps below
    assert any(texts), "the model transcribes nothing: the checks below would be empty"
    hyps = decode_hyps(rec.model, rec.vocab, rec.normalizer, utts)
    for u, text in zip(utts, texts):
        assert set(text.split()) <= TRAIN_WORDS, text
        wav = torch.from_numpy(load_audio(u.audio))[None]
        with torch.inference_mode():
            logits, frames = rec.model(wav, torch.tensor([wav.shape[1]]))
        ids = greedy_ids(logits, frames)[0]
        assert hyps[u.id] == saved.decode(ids).strip()
        assert text == " ".join(saved.decode(ids).split())
    # the command line gives the same text
    from speechtl.cli.app import main

    first = next(u for u, t in zip(utts, texts) if t)
    capsys.readouterr()
    assert main(["transcribe", str(subword_model), first.audio, "-q"]) == 0
    assert capsys.readouterr().out.strip() == texts[utts.index(first)]
    # word times: the words of the text, in order, inside the clip
    t = rec.transcribe(first.audio, return_timestamps=True)
    words = [w for s in t.segments for w in s.words]
    assert [w.word for w in words] == t.text.split()
    assert all(0 <= w.start < w.end <= first.duration + 0.05 for w in words)
    assert all(a.end <= b.start for a, b in zip(words, words[1:]))
    # forced alignment of the true transcript groups its pieces into its words
    tr = rec.transcriber()
    from speechtl.inference.transcribe import Item

    lp = tr.file_log_probs(Item(first.id, first.audio))
    aligned = align_words(lp, first.text, rec.vocab, tr.frame_s)
    assert [w.word for w in aligned] == first.text.split()
    with pytest.raises(ValueError, match="characters outside the model's vocabulary: 'z'"):
        align_words(lp, "zab", rec.vocab, tr.frame_s)


def test_subword_beam_search_with_a_word_lm(tmp_path, subword_model, tones):
    pytest.importorskip("pyctcdecode")
    from speechtl.cli.app import main
    from speechtl.decoding.lm import build_arpa
    from speechtl.inference.recognizer import Recognizer

    utts = read_manifest(tones)
    lm = tmp_path / "lm.arpa"
    lm.write_text(build_arpa([u.text for u in utts], 2))
    rec = Recognizer.load(subword_model)
    beamed = rec.transcribe([u.audio for u in utts], lm=str(lm), alpha=0.8)
    assert any(beamed), "the beam decoder gave nothing: the comparisons below would be empty"
    assert all(set(t.split()) <= TRAIN_WORDS for t in beamed), beamed
    assert main(["evaluate", str(subword_model), str(tones), "--lm", str(lm), "--alpha", "0.8", "--out-dir",
                 str(tmp_path / "e"), "-q"]) == 0
    hyps = {json.loads(line)["id"]: json.loads(line)["hyp"] for line in open(tmp_path / "e" / "hyps.jsonl")}
    assert [hyps[u.id] for u in utts] == [rec.normalizer(t) for t in beamed]


def test_subword_export_matches_transformers_pipeline(tmp_path, subword_model, tones):
    from transformers import pipeline

    import speechtl
    from speechtl.cli.app import main
    from speechtl.data.audio import load_audio

    assert main(["export", str(subword_model), "--out", str(tmp_path / "hf"), "-q"]) == 0
    exported = json.loads((tmp_path / "hf" / "vocab.json").read_text())
    assert " cab" in exported or " ab" in exported  # word-initial pieces, spelt as they decode
    pipe = pipeline("automatic-speech-recognition", model=str(tmp_path / "hf"), device="cpu")
    rec = speechtl.load(subword_model, device="cpu")
    utts = read_manifest(tones)
    ours = rec.transcribe([u.audio for u in utts], options=DecodeOptions())  # the HF directory has no LM
    theirs = [pipe({"raw": load_audio(u.audio), "sampling_rate": 16000})["text"] for u in utts]
    assert any(ours), "the model transcribes nothing: the comparison would be empty"
    assert ours == theirs


def test_frozen_mode_trains_unigram_pieces(tmp_path, tones, tiny_encoder):
    import speechtl
    from speechtl.models.model_dir import read_meta

    summary = train(_cfg(tmp_path, tones, tiny_encoder, mode="frozen", units="unigram:12", max_steps=2, eval_every=2),
                    progress=False)
    assert summary["steps"] == 2
    rec = speechtl.load(tmp_path / "model")
    assert rec.vocab.kind == "unigram" and read_meta(tmp_path / "model")["units"] == "unigram:12"
    assert rec.model.head.proj.out_features == len(rec.vocab)
    assert isinstance(rec.transcribe(read_manifest(tones)[0].audio), str)


# ----------------------------------------------------------------------------- init_from, resume, old folders


def test_init_from_across_unit_types_is_refused_and_pieces_carry_over(tmp_path, subword_model, char_model, tones,
                                                                      tiny_encoder):
    from safetensors.torch import load_file

    with pytest.raises(ValueError, match=r"init_from.*character units \(char\).*bpe subword units \(bpe:20\)"):
        train(_cfg(tmp_path / "a", tones, tiny_encoder, init_from=str(char_model)), progress=False)
    with pytest.raises(ValueError, match=r"init_from.*bpe subword units \(bpe:20\).*character units \(char\)"):
        train(_cfg(tmp_path / "b", tones, tiny_encoder, init_from=str(subword_model), units="char"), progress=False)
    # the same training text gives the same tokenizer, so with lr 0 every row is carried as it was
    train(_cfg(tmp_path / "c", tones, tiny_encoder, init_from=str(subword_model), max_steps=1, lr=0.0, encoder_lr=0.0),
          progress=False)
    new = tmp_path / "c" / "model"
    assert (new / "tokenizer.json").read_text() == (subword_model / "tokenizer.json").read_text()
    a, b = load_file(str(subword_model / "head.safetensors")), load_file(str(new / "head.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_keeps_the_runs_tokenizer_and_refuses_other_units(tmp_path, subword_model, tones, tiny_encoder):
    run = tmp_path / "run"
    shutil.copytree(subword_model.parent, run)
    with pytest.raises(ValueError, match=r"last.pt: written with bpe subword units \(bpe:20\).*units=char"):
        train(_cfg(run, tones, tiny_encoder, units="char", resume=True, max_steps=31), progress=False)
    summary = train(_cfg(run, tones, tiny_encoder, resume=True, max_steps=31, eval_every=31), progress=False)
    assert summary["steps"] == 31
    assert (run / "model" / "tokenizer.json").read_text() == (subword_model / "tokenizer.json").read_text()


def test_a_model_folder_without_units_loads_as_a_character_model(tmp_path, char_model, tones):
    import speechtl
    from speechtl.data.text import Vocabulary

    old = tmp_path / "old"
    shutil.copytree(char_model, old)
    meta = json.loads((old / "speechtl.json").read_text())
    assert meta.pop("units") == "char"
    (old / "speechtl.json").write_text(json.dumps(meta))
    rec = speechtl.load(old)
    assert type(rec.vocab) is Vocabulary
    audio = read_manifest(tones)[0].audio
    assert rec.transcribe(audio) == speechtl.load(char_model).transcribe(audio)
