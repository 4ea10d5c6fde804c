"""Export to transformers, the CLI contract, and evaluation outputs."""

import json
import subprocess
import sys

import numpy as np
import pytest

from speechtl.cli.app import main
from speechtl.data.manifest import read_manifest
from speechtl.training.config import load_train_config
from speechtl.training.train import train

SUBCOMMANDS = ["prepare", "synth", "train", "extract", "evaluate", "transcribe", "align", "lm", "export", "average",
               "zeroshot", "fetch-encoder"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tones, tiny_encoder):
    out = tmp_path_factory.mktemp("ft")
    cfg = load_train_config(None, dict(encoder=str(tiny_encoder), mode="finetune", train=str(tones), dev=str(tones),
                                       out=str(out), max_steps=30, eval_every=30, num_workers=0, max_batch_seconds=4, lr=1e-2,
                                       encoder_lr=1e-3,
                                       mask_time_prob=0.0))  # exercises export of a model saved with masking off
    train(cfg, progress=False)
    return out / "model"


def test_help_lists_the_contract():
    r = subprocess.run([sys.executable, "-m", "speechtl", "--help"], capture_output=True, text=True, check=True)
    for name in SUBCOMMANDS:
        assert name in r.stdout
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0


def test_evaluate_with_a_word_lm_scores_what_transcribe_gives(tmp_path, finetuned, tones, capsys):
    pytest.importorskip("pyctcdecode")
    from speechtl.decoding.lm import build_arpa
    from speechtl.inference.recognizer import Recognizer

    utts = read_manifest(tones)
    lm = tmp_path / "lm.arpa"
    lm.write_text(build_arpa([u.text for u in utts], 2))
    assert main(["evaluate", str(finetuned), str(tones), "--lm", str(lm), "--alpha", "0.8", "--out-dir", str(tmp_path / "e"), "-q"]) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["decoder"] == "beam" and summary["lm"] == str(lm) and summary["alpha"] == 0.8
    hyps = {json.loads(line)["id"]: json.loads(line)["hyp"] for line in open(tmp_path / "e" / "hyps.jsonl")}
    rec = Recognizer.load(finetuned)
    direct = rec.transcribe([u.audio for u in utts], lm=str(lm), alpha=0.8)
    assert [hyps[u.id] for u in utts] == [rec.normalizer(t) for t in direct]
    assert any(hyps.values()), "the model decoded nothing: the comparison above would be empty"


def test_evaluate_writes_summary_json(tmp_path, finetuned, tones, capsys):
    assert main(["evaluate", str(finetuned), str(tones), "--json", str(tmp_path / "r.json"), "-q"]) == 0
    summary = json.loads((tmp_path / "r.json").read_text())
    assert {"wer", "cer", "utterances", "audio_seconds"} <= set(summary)
    assert summary["utterances"] == len(read_manifest(tones))
    rows = [json.loads(line) for line in open(tmp_path / "r" / "hyps.jsonl")]
    import jiwer

    assert any(r["hyp"] for r in rows)
    # the summary's rates are jiwer's over the written hypotheses (empty references left out)
    scored = [r for r in rows if r["ref"]]
    assert summary["wer"] == pytest.approx(jiwer.wer([r["ref"] for r in scored], [r["hyp"] for r in scored]), abs=1e-9)
    assert summary["cer"] == pytest.approx(jiwer.cer([r["ref"] for r in scored], [r["hyp"] for r in scored]), abs=1e-9)
    assert summary["audio_seconds"] == pytest.approx(sum(u.duration for u in read_manifest(tones)), abs=1e-3)
    for name in ("hyps.jsonl", "errs.txt"):
        assert (tmp_path / "r" / name).is_file()


def test_two_evaluations_into_one_folder_keep_their_artefacts(tmp_path, finetuned, tones):
    utts = read_manifest(tones)
    from speechtl.data.manifest import write_manifest

    half = write_manifest(tmp_path / "half.jsonl", utts[: len(utts) // 2])
    assert main(["evaluate", str(finetuned), str(tones), "--json", str(tmp_path / "all.json"), "-q"]) == 0
    assert main(["evaluate", str(finetuned), str(half), "--json", str(tmp_path / "half.json"), "-q"]) == 0
    for name, n in (("all", len(utts)), ("half", len(utts) // 2)):
        lines = (tmp_path / name / "hyps.jsonl").read_text().splitlines()
        assert len(lines) == n
        assert json.loads((tmp_path / name / "summary.json").read_text())["utterances"] == n


def test_export_matches_transformers_pipeline(tmp_path, finetuned, tones):
    from transformers import pipeline

    import speechtl
    from speechtl.data.audio import load_audio
    from speechtl.decoding.options import DecodeOptions

    assert main(["export", str(finetuned), "--out", str(tmp_path / "hf"), "-q"]) == 0
    pipe = pipeline("automatic-speech-recognition", model=str(tmp_path / "hf"), device="cpu")
    rec = speechtl.load(finetuned, device="cpu")
    utts = read_manifest(tones)
    # greedy: the transformers directory has no LM, while the model folder decodes with its own by default
    ours = rec.transcribe([u.audio for u in utts], options=DecodeOptions())
    # the pipeline decodes file names with ffmpeg; give it the same decoded samples instead
    theirs = [pipe({"raw": load_audio(u.audio), "sampling_rate": 16000})["text"] for u in utts]
    assert any(t.strip() for t in ours), "the model transcribes nothing: the comparisons below would be empty"
    assert ours == theirs
    # the dev hypotheses written while training are the saved model's
    hyps = {json.loads(line)["id"]: json.loads(line)["hyp"] for line in open(finetuned.parent / "dev" / "hyps.jsonl")}
    assert [hyps[u.id] for u in utts] == [rec.normalizer(t) for t in ours]


def test_frozen_export_is_refused_with_a_reason(tmp_path, tones, tiny_encoder, capsys):
    cfg = load_train_config(None, dict(encoder=str(tiny_encoder), mode="frozen", train=str(tones), out=str(tmp_path / "fr"),
                                       max_steps=1, num_workers=0))
    train(cfg, progress=False)
    assert main(["export", str(tmp_path / "fr" / "model"), "--out", str(tmp_path / "hf")]) == 1
    assert "frozen-mode models" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_transcribe_arrays_and_bad_file(tmp_path, finetuned, tones, capsys):
    import speechtl
    from speechtl.data.audio import load_audio

    rec = speechtl.load(finetuned)
    arrays = [load_audio(u.audio) for u in read_manifest(tones)[:3]] + [np.zeros(8000, dtype=np.float32)]
    texts = rec.transcribe(arrays)
    assert any(t.strip() for t in texts), "the model transcribes nothing: the comparison below would be empty"
    assert texts == [rec.transcribe(a) for a in arrays]  # a batch gives what each array gives alone
    assert texts[:3] == rec.transcribe([u.audio for u in read_manifest(tones)[:3]])  # arrays as the files give
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    good = tmp_path / "good.wav"
    import soundfile as sf

    sf.write(good, np.zeros(16000, dtype=np.float32), 16000)
    assert main(["transcribe", str(finetuned), str(good), str(bad), "-q"]) == 1
    err = capsys.readouterr().err
    assert "bad.wav" in err and "1 of 2" in err


def test_train_cli_rejects_unknown_key(tmp_path, capsys):
    assert main(["train", "train=x.jsonl", "bogus=1"]) == 1
    assert "unknown config key" in capsys.readouterr().err


def test_train_overrides_may_follow_options(capsys):
    assert main(["train", "train=x.jsonl", "-q", "bogus=1"]) == 1  # bogus=1 reached the config, not argparse
    assert "unknown config key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "train=x.jsonl", "--bogus-flag"])


def test_commands_accept_a_training_run_folder(tmp_path, finetuned, tones, capsys):
    run = finetuned.parent
    assert main(["evaluate", str(run), str(tones), "--out-dir", str(tmp_path / "e"), "-q"]) == 0
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["utterances"] == len(read_manifest(tones))
    wav = read_manifest(tones)[0].audio
    assert main(["transcribe", str(run), wav, "--format", "json", "--out", str(tmp_path / "t"), "-q"]) == 0
    assert main(["evaluate", str(tmp_path), str(tones), "-q"]) == 1
    assert "not a speechtl model directory or training run" in capsys.readouterr().err


def test_run_writes_a_config_that_repeats_it(tmp_path, tones, tiny_encoder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(None, dict(encoder=str(tiny_encoder), mode="frozen", train=str(tones), out="run1",
                                       max_steps=2, num_workers=0, seed=3))
    train(cfg, progress=False)
    again = load_train_config(tmp_path / "run1" / "config.yaml", {"out": "run2"})
    assert again.train == str(tones.resolve()) and again.seed == 3 and again.max_steps == 2
    train(again, progress=False)
    first = (tmp_path / "run1" / "model" / "head.safetensors").read_bytes()
    assert (tmp_path / "run2" / "model" / "head.safetensors").read_bytes() == first


def test_unexpected_errors_point_at_verbose(monkeypatch, capsys):
    import speechtl.cli.decode as commands

    def broken(args):
        raise KeyError("boom")

    monkeypatch.setattr(commands, "cmd_lm_build", broken)
    assert main(["lm", "build", "x.txt", "--out", "y.arpa"]) == 1
    err = capsys.readouterr().err
    assert "unexpected error: KeyError" in err and "rerun with -v" in err


def _count_lm_loads(monkeypatch) -> list:
    import speechtl.decoding.lm as lm_mod

    loads, real = [], lm_mod.pyctcdecode_language_model
    monkeypatch.setattr(lm_mod, "pyctcdecode_language_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    return loads


def test_recognizer_reads_a_language_model_once(tmp_path, finetuned, tones, monkeypatch):
    pytest.importorskip("pyctcdecode")
    from speechtl.decoding.lm import build_arpa
    from speechtl.inference.recognizer import Recognizer

    utts = read_manifest(tones)
    lm = tmp_path / "lm.arpa"
    lm.write_text(build_arpa([u.text for u in utts], 2))
    loads = _count_lm_loads(monkeypatch)
    rec = Recognizer.load(finetuned)
    first = rec.transcribe(utts[0].audio, lm=str(lm))
    assert rec.transcribe(utts[0].audio, lm=str(lm)) == first
    rec.transcribe(utts[1].audio, lm=str(lm), alpha=0.9)  # another setting: its own decoder
    assert loads == [str(lm), str(lm)]


def test_lm_tune_searches_the_grid_with_one_model_pass(tmp_path, finetuned, tones, monkeypatch, capsys):
    pytest.importorskip("pyctcdecode")
    from speechtl.decoding.lm import build_arpa

    utts = read_manifest(tones)
    lm = tmp_path / "lm.arpa"
    lm.write_text(build_arpa([u.text for u in utts], 2))
    loads = _count_lm_loads(monkeypatch)
    out = tmp_path / "tune.json"
    assert main(["lm", "tune", str(finetuned), str(tones), "--lm", str(lm), "--alphas", "0,2", "--betas", "0,1.5",
                 "--json", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [(g["alpha"], g["beta"]) for g in result["grid"]] == [(0, 0), (0, 1.5), (2, 0), (2, 1.5)]
    assert len(loads) == 1, "the LM must be read once for the whole grid"
    best = result["best"]
    assert best["wer"] == min(g["wer"] for g in result["grid"])
    assert f"--alpha {best['alpha']:g} --beta {best['beta']:g}" in printed
    # each pair's figure is what evaluate gives with that pair
    for g in (result["grid"][0], result["grid"][-1]):
        assert main(["evaluate", str(finetuned), str(tones), "--lm", str(lm), "--alpha", str(g["alpha"]), "--beta",
                     str(g["beta"]), "--out-dir", str(tmp_path / f"e{g['alpha']}-{g['beta']}"), "-q"]) == 0
        summary = json.loads((tmp_path / f"e{g['alpha']}-{g['beta']}" / "summary.json").read_text())
        assert summary["wer"] == pytest.approx(g["wer"]) and summary["cer"] == pytest.approx(g["cer"])
    with pytest.raises(SystemExit):
        main(["lm", "tune", str(finetuned), str(tones), "--lm", str(lm), "--alphas", "x"])


def test_evaluate_takes_window_and_batch_options(tmp_path, finetuned, tones, monkeypatch, capsys):
    import speechtl.inference.recognizer as inf
    from speechtl.inference.transcribe import Transcriber

    windows, batches = [], []
    real_windows, real_loader = Transcriber.file_log_probs, inf.sorted_loader
    monkeypatch.setattr(Transcriber, "file_log_probs", lambda self, *a, **k: windows.append(1) or real_windows(self, *a, **k))
    monkeypatch.setattr(inf, "sorted_loader", lambda ds, secs, *a, **k: batches.append(secs) or real_loader(ds, secs, *a, **k))
    # --greedy: the batched path (the folder's own LM would decode through the transcriber)
    assert main(["evaluate", str(finetuned), str(tones), "--greedy", "--out-dir", str(tmp_path / "a"), "-q"]) == 0
    assert not windows and batches == [10.0]
    long = sum(u.duration > 1.0 for u in read_manifest(tones))
    assert long > 0
    assert main(["evaluate", str(finetuned), str(tones), "--greedy", "--chunk-length-s", "1.0", "--batch-seconds", "3",
                 "--out-dir", str(tmp_path / "b"), "-q"]) == 0
    assert len(windows) == long and batches[-1] == 3.0
