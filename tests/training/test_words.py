"""Words by default: the dev set carved from the labelled clips, and the LM and tuned
weights a CTC model folder carries, which evaluate and transcribe use unless told otherwise."""

import json
import subprocess
import sys

import pytest

from conftest import tone_corpus
from speechtl.decoding.options import DECODING_FILE, LM_FILE, DecodeOptions
from speechtl.training.config import load_train_config
from speechtl.training.data import carve_dev
from speechtl.training.train import train


def _cfg(tmp_path, corpus, encoder, **kw):
    base = dict(encoder=str(encoder), train=str(corpus), out=str(tmp_path / "out"), max_steps=2, eval_every=2,
                num_workers=0, max_batch_seconds=4.0, lr=3e-3, seed=0, mode="frozen", head="linear")
    return load_train_config(None, {**base, **kw})


@pytest.fixture(scope="module")
def tones40(tmp_path_factory):
    return tone_corpus(tmp_path_factory.mktemp("tones40"), n=40, seed=1)


def test_a_run_without_dev_carves_one_and_tunes_its_lm_there(tmp_path, tones40, tiny_encoder):
    from speechtl.data.manifest import read_manifest

    s = train(_cfg(tmp_path, tones40, tiny_encoder), progress=False)
    utts = read_manifest(tones40, check_files=False)
    train_ids, dev = carve_dev(utts, 0.1, 0)
    assert s["train_utterances"] == len(train_ids) == 40 - len(dev) and len(dev) >= 4
    assert s["best_dev_cer"] is not None  # the carved set was scored
    assert {u.text for u in train_ids}.isdisjoint({u.text for u in dev})  # no sentence on both sides
    model = tmp_path / "out" / "model"
    record = json.loads((model / DECODING_FILE).read_text())
    assert record == s["decoding"]
    assert (model / LM_FILE).is_file() and record["lm_sources"]["training_transcripts"] == len(train_ids)
    assert record["tuned_on"]["utterances"] == len(dev)
    tuned = record["tuned_on"]
    # the folder decodes with the LM only where it did no worse than greedy on dev
    beam_better = (tuned["beam"]["wer"], tuned["beam"]["cer"]) <= (tuned["greedy"]["wer"], tuned["greedy"]["cer"])
    assert record["decoder"] == ("beam" if beam_better else "greedy")


def test_dev_fraction_zero_and_small_sets_train_on_every_clip(tmp_path, tones40, tones, tiny_encoder):
    s = train(_cfg(tmp_path / "a", tones40, tiny_encoder, dev_fraction=0), progress=False)
    assert s["train_utterances"] == 40 and s["best_dev_cer"] is None
    s = train(_cfg(tmp_path / "b", tones, tiny_encoder), progress=False)  # 8 clips: too few to hold any out
    assert s["train_utterances"] == 8 and s["best_dev_cer"] is None
    # no dev set: the LM is kept with untuned weights
    assert s["decoding"]["decoder"] == "beam" and "tuned_on" not in s["decoding"]
    assert (s["decoding"]["alpha"], s["decoding"]["beta"]) == (0.5, 1.0)


def test_the_folder_decoding_is_the_default_and_can_be_overridden(tmp_path, tones, tiny_encoder):
    from speechtl.data.manifest import read_manifest
    from speechtl.inference.recognizer import Recognizer

    train(_cfg(tmp_path, tones, tiny_encoder, lm_beam_width=7), progress=False)
    model = tmp_path / "out" / "model"
    rec = Recognizer.load(model)
    assert rec.default_options == DecodeOptions(str(model / LM_FILE), 7, 0.5, 1.0)
    utts = read_manifest(tones, check_files=False)
    summary = rec.evaluate(utts)
    assert summary["decoder"] == "beam" and summary["lm"] == str(model / LM_FILE) and summary["beam_width"] == 7
    assert rec.evaluate(utts, options=DecodeOptions())["decoder"] == "greedy"
    assert rec.decode_options(alpha=2.0) == DecodeOptions(str(model / LM_FILE), 7, 2.0, 1.0)
    other = tmp_path / "other.arpa"
    other.write_text((model / LM_FILE).read_text())
    assert rec.decode_options(lm=other) == DecodeOptions(str(other), 7, 0.5, 1.0)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "speechtl", *args], capture_output=True, text=True)

    r = cli("evaluate", str(model), str(tones), "--greedy", "--json", str(tmp_path / "g.json"), "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "g.json").read_text())["decoder"] == "greedy"
    r = cli("evaluate", str(model), str(tones), "--json", str(tmp_path / "b.json"), "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "b.json").read_text())["beam_width"] == 7
    r = cli("transcribe", str(model), utts[0].audio, "--greedy", "--lm", str(other))
    assert r.returncode != 0 and "--greedy decodes without beam search" in r.stderr

    (model / LM_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="lm.arpa: the language model .*decoding.json names is missing"):
        Recognizer.load(model)
    (model / DECODING_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="decoding.json: not a decoding record"):
        Recognizer.load(model)


def test_lm_none_and_a_given_lm(tmp_path, tones, tiny_encoder):
    s = train(_cfg(tmp_path / "none", tones, tiny_encoder, lm="none"), progress=False)
    assert s["decoding"] == {"decoder": "greedy", "reason": "lm=none"}
    assert not (tmp_path / "none" / "out" / "model" / DECODING_FILE).exists()
    arpa = tmp_path / "mine.arpa"
    arpa.write_text(_tiny_arpa())
    s = train(_cfg(tmp_path / "given", tones, tiny_encoder, lm=str(arpa)), progress=False)
    assert (tmp_path / "given" / "out" / "model" / LM_FILE).read_text() == arpa.read_text()
    assert s["decoding"]["lm_sources"] == {"file": str(arpa.resolve())}


@pytest.mark.parametrize("kw, message", [
    (dict(lm="words.txt"), "config key 'lm': auto, none or an .arpa file"),
    (dict(lm_order=0), "config key 'lm_order'/'lm_beam_width': must be at least 1"),
    (dict(dev_fraction=0.7), "config key 'dev_fraction': must be in \\[0, 0.5\\)"),
    (dict(lm_wordlist="r o"), "config key 'lm_wordlist': 'r o' is not a language code"),
    (dict(mode="seq2seq", encoder="whisper-base", lm_wordlist="ro"), "word LMs are for CTC modes"),
])
def test_bad_decoding_keys_stop_before_any_work(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(None, {"train": "x.jsonl", **kw})


def test_a_missing_lm_file_or_word_list_stops_before_any_work(tmp_path, tones, tiny_encoder):
    with pytest.raises(FileNotFoundError, match="config key 'lm': .*nothere.arpa: no such file"):
        train(_cfg(tmp_path, tones, tiny_encoder, lm=str(tmp_path / "nothere.arpa")), progress=False)
    with pytest.raises(ValueError, match="config key 'lm_wordlist': wordfreq has no word list for 'xx'"):
        train(_cfg(tmp_path, tones, tiny_encoder, lm_wordlist="xx"), progress=False)
    assert not (tmp_path / "out" / "model").exists()


def _tiny_arpa() -> str:
    from speechtl.decoding.lm import build_arpa

    return build_arpa(["ab ba", "cab abc", "cc bad"], order=2)
