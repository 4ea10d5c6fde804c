"""Faults and hostile input beyond the bad-input matrix: outputs that would collide or leave
their folder, runs that would replace or share a folder, signals, damaged files.

Each test runs ``speechtl`` in-process on a tiny random model and checks the outcome the
README documents ("Behaviour on bad input")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_wav
from speechtl.cli.app import main
from speechtl.data.manifest import Utterance, write_manifest


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from conftest import tiny_encoder_dir
    from speechtl.data.text import Normalizer, Vocabulary
    from speechtl.models.ctc import HeadConfig, build_model
    from speechtl.models.model_dir import save_model_dir

    root = tmp_path_factory.mktemp("hostile")
    enc = tiny_encoder_dir(root)
    vocab = Vocabulary.build(["ab ba cab"])
    model = build_model(str(enc), "frozen", len(vocab), HeadConfig(kind="linear")).eval()
    save_model_dir(model, vocab, Normalizer(), root / "model")
    return root / "model"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------ transcribe: names inside --out, never shared

def test_transcribe_refuses_files_whose_outputs_collide(tiny_model, tmp_path, capsys):
    a, b = make_wav(tmp_path / "in" / "x.wav", 0.5), make_wav(tmp_path / "in" / "x.flac", 0.5)
    out = tmp_path / "out"
    code, _, err = run(capsys, "transcribe", str(tiny_model), str(a), str(b), "--out", str(out), "-q")
    assert code == 1 and "x.txt" in err and str(a) in err and str(b) in err and "replace another" in err
    assert not out.exists()  # refused before any work


def test_transcribe_refuses_manifest_ids_that_collide(tiny_model, tmp_path, capsys):
    wav = make_wav(tmp_path / "a.wav", 0.5)
    m = write_manifest(tmp_path / "m.jsonl", [Utterance("same", str(wav), "ab", 0.5),
                                              Utterance("sub/../same", str(wav), "ab", 0.5)])
    code, _, err = run(capsys, "transcribe", str(tiny_model), str(m), "--out", str(tmp_path / "out"), "-q")
    assert code == 1 and "'sub/../same'" in err and "'..'" in err


def test_transcribe_refuses_ids_that_differ_only_in_case(tiny_model, tmp_path, capsys):
    wav = make_wav(tmp_path / "a.wav", 0.5)
    m = write_manifest(tmp_path / "m.jsonl", [Utterance("Utt", str(wav), "ab", 0.5), Utterance("utt", str(wav), "ab", 0.5)])
    code, _, err = run(capsys, "transcribe", str(tiny_model), str(m), "--out", str(tmp_path / "out"), "-q")
    assert code == 1 and "id 'Utt'" in err and "id 'utt'" in err


@pytest.mark.parametrize("bad_id", ["../../escaped", "{abs}/escaped", "a//b", "./x", "a\\..\\b"])
def test_transcribe_keeps_every_output_inside_out(tiny_model, tmp_path, capsys, bad_id):
    bad_id = bad_id.replace("{abs}", str(tmp_path / "elsewhere"))
    wav = make_wav(tmp_path / "a.wav", 0.5)
    m = write_manifest(tmp_path / "m.jsonl", [Utterance("ok", str(wav), "ab", 0.5), Utterance(bad_id, str(wav), "ab", 0.5)])
    out = tmp_path / "deep" / "er" / "out"
    code, _, err = run(capsys, "transcribe", str(tiny_model), str(m), "--out", str(out), "--format", "json", "-q")
    assert code == 1 and repr(bad_id) in err and "inside --out" in err
    assert not list(tmp_path.rglob("escaped*"))
    assert not out.exists()


def test_transcribe_still_writes_ids_with_subfolders_and_same_named_files_apart(tiny_model, tmp_path, capsys):
    wav = make_wav(tmp_path / "a.wav", 0.5)
    m = write_manifest(tmp_path / "m.jsonl", [Utterance("spk1/u1", str(wav), "ab", 0.5), Utterance("spk2/u1", str(wav), "ab", 0.5)])
    x1, x2 = make_wav(tmp_path / "d1" / "x.wav", 0.5), make_wav(tmp_path / "d2" / "x.wav", 0.5)
    out = tmp_path / "out"
    code, _, err = run(capsys, "transcribe", str(tiny_model), str(m), str(x1), str(x2), "--out", str(out), "--format", "json", "-q")
    assert code == 0, err
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.json")} == {"spk1/u1.json", "spk2/u1.json",
                                                                            "d1/x.json", "d2/x.json"}
    assert all("text" in json.loads(p.read_text()) for p in out.rglob("*.json"))


# ------------------------------------------------------- train: a run folder is never replaced or shared

@pytest.fixture(scope="module")
def tiny_run_args(tmp_path_factory) -> list[str]:
    from conftest import tiny_encoder_dir, tone_corpus

    root = tmp_path_factory.mktemp("hostile_train")
    corpus = tone_corpus(root / "tones", n=4)
    return ["train", f"encoder={tiny_encoder_dir(root)}", f"train={corpus}", "mode=frozen", "head=linear",
            "max_steps=2", "eval_every=2", "max_batch_seconds=4", "num_workers=0", "-q"]


def test_train_refuses_a_folder_holding_a_run_unless_told(tiny_run_args, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, *tiny_run_args, f"out={out}")
    assert code == 0, err
    before = {p: p.read_bytes() for p in (out / "model").rglob("*") if p.is_file()}
    code, _, err = run(capsys, *tiny_run_args, f"out={out}", "seed=7")
    assert code == 1 and str(out) in err and "resume=true" in err and "overwrite=true" in err
    assert {p: p.read_bytes() for p in (out / "model").rglob("*") if p.is_file()} == before
    code, _, err = run(capsys, *tiny_run_args, f"out={out}", "seed=7", "overwrite=true")
    assert code == 0, err
    assert {p: p.read_bytes() for p in (out / "model").rglob("*") if p.is_file()} != before


def test_train_refuses_an_out_folder_that_is_a_model(tiny_run_args, tiny_model, tmp_path, capsys):
    import shutil

    shutil.copytree(tiny_model, tmp_path / "m")
    code, _, err = run(capsys, *tiny_run_args, f"out={tmp_path / 'm'}")
    assert code == 1 and "speechtl.json" in err and "overwrite=true" in err


def test_resume_and_overwrite_together_are_refused(tiny_run_args, tmp_path, capsys):
    code, _, err = run(capsys, *tiny_run_args, f"out={tmp_path / 'r'}", "resume=true", "overwrite=true")
    assert code == 1 and "choose one" in err and not (tmp_path / "r").exists()


_HOLD = """
import sys, time
from speechtl.training.outdir import OutLock
with OutLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(out: Path):
    import os
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_into_a_folder_in_use_refuses_at_once(tiny_run_args, tmp_path, capsys):
    import time

    out = tmp_path / "busy"
    holder = _holder(out)
    try:
        t0 = time.monotonic()
        code, _, err = run(capsys, *tiny_run_args, f"out={out}")
        assert code == 1 and "in use by a live training run" in err and f"pid {holder.pid}" in err
        assert time.monotonic() - t0 < 20 and not (out / "metrics.csv").exists() and not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without letting go: its lock file stays, and the next run takes it over
    assert f"pid {holder.pid}" in (out / ".lock").read_text()
    code, _, err = run(capsys, *tiny_run_args, f"out={out}")
    assert code == 0, err


# ------------------------------------------------------ train: every stop signal saves the update

@pytest.mark.parametrize("signame,status", [("SIGTERM", 143), ("SIGHUP", 129)])  # SIGINT: test_train's Ctrl-C test
def test_a_stop_signal_to_the_whole_process_group_saves_a_checkpoint(tiny_run_args, tmp_path, signame, status):
    """As systemd, SLURM or Ctrl-C in a terminal deliver it: to the trainer and its DataLoader
    workers at once; a worker must not die before the checkpoint is written."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    out = tmp_path / "run"
    args = [a for a in tiny_run_args if not a.startswith(("max_steps", "eval_every", "num_workers", "mode"))]
    p = subprocess.Popen([sys.executable, "-m", "speechtl", *args, f"out={out}", "mode=finetune", "num_workers=2",
                          "max_steps=100000", "eval_every=100000", "log_every=1"],
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.csv").is_file() and p.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(p.pid, getattr(signal, signame))
    _, err = p.communicate(timeout=120)
    assert p.returncode == status, err
    assert f"{signame}: saving a checkpoint" in err and "resume=true" in err
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ck["state"]["step"] >= 1


# ------------------------------------------------- prepare: outputs never overwrite inputs or each other

@pytest.fixture
def small_manifest(tmp_path) -> Path:
    utts = [Utterance(f"u{i}", str(make_wav(tmp_path / "wav" / f"u{i}.wav", 0.5 + 0.1 * i, seed=i)), "ab ba", 0.5 + 0.1 * i)
            for i in range(6)]
    return write_manifest(tmp_path / "M.jsonl", utts)


@pytest.mark.parametrize("extra", [["--out", "{M}", "--dev-out", "{M}", "--dev-fraction", "0.3"],
                                   ["--out", "{M}"],
                                   ["--out", "{dir}/new.jsonl", "--dev-out", "{M}", "--dev-fraction", "0.3"],
                                   ["--out", "{dir}/new.jsonl", "--dev-out", "{dir}/new.jsonl", "--dev-fraction", "0.3"],
                                   ["--out", "{dir}/a.jsonl", "--skip-report", "{dir}/wav/u0.wav", "--on-bad-audio", "skip"]])
def test_prepare_refuses_outputs_that_are_inputs_or_each_other_before_writing(small_manifest, capsys, extra):
    d = small_manifest.parent
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    argv = [a.replace("{M}", str(small_manifest)).replace("{dir}", str(d)) for a in extra]
    code, _, err = run(capsys, "prepare", str(small_manifest), "--format", "jsonl", *argv, "-q")
    assert code == 1 and ("same file" in err or "is an input of this command" in err), err
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before  # nothing written, nothing lost


def test_prepare_refuses_a_hard_link_to_its_source(small_manifest, capsys):
    import os

    link = small_manifest.with_name("link.jsonl")
    os.link(small_manifest, link)
    before = small_manifest.read_bytes()
    code, _, err = run(capsys, "prepare", str(small_manifest), "--format", "jsonl", "--out", str(link), "-q")
    assert code == 1 and "is an input of this command" in err and small_manifest.read_bytes() == before


# ------------------------------- NaN samples and lying durations: skip means skip, caps hold on real lengths

def _nan_wav(path: Path) -> Path:
    import numpy as np
    import soundfile as sf

    x = (0.1 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    x[8000:8010] = np.nan
    x[9000] = np.inf
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x, 16000, subtype="FLOAT")
    return path


@pytest.fixture
def nan_corpus(tmp_path) -> Path:
    """Eight good clips and one float WAV with NaN and infinite samples."""
    good = [Utterance(f"g{i}", str(make_wav(tmp_path / "wav" / f"g{i}.wav", 1.0 + 0.1 * i, freq=200 + 40 * i, seed=i)),
                      "ab ba", round(1.0 + 0.1 * i, 4)) for i in range(8)]
    bad = Utterance("nan", str(_nan_wav(tmp_path / "wav" / "nan.wav")), "ab ba", 1.0)
    return write_manifest(tmp_path / "nan.jsonl", [*good[:4], bad, *good[4:]])


def test_prepare_skip_leaves_out_a_file_with_nan_samples(nan_corpus, capsys):
    out = nan_corpus.with_name("prepared.jsonl")
    code, text, err = run(capsys, "prepare", str(nan_corpus), "--format", "jsonl", "--out", str(out),
                          "--on-bad-audio", "skip", "-q")
    assert code == 0, err
    from speechtl.data.manifest import read_manifest

    assert "nan" not in {u.id for u in read_manifest(out)} and len(read_manifest(out)) == 8
    assert "NaN or infinite samples" in out.with_suffix(".skipped.tsv").read_text()
    code, _, err = run(capsys, "prepare", str(nan_corpus), "--format", "jsonl", "--out", str(out) + "2", "-q")
    assert code == 1 and "nan.wav" in err and "NaN or infinite samples" in err


def test_train_skip_leaves_out_a_file_with_nan_samples(tiny_run_args, nan_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = [a for a in tiny_run_args if not a.startswith("train=")]
    code, _, err = run(capsys, *args, f"train={nan_corpus}", f"out={out}", "on_bad_audio=skip")
    assert code == 0, err
    s = json.loads((out / "train_summary.json").read_text())
    assert [b["id"] for b in s["skipped_audio"]] == ["nan"] and s["train_utterances"] == 8
    code, _, err = run(capsys, *args, f"train={nan_corpus}", f"out={tmp_path / 'run2'}")
    assert code == 1 and "nan.wav" in err and "NaN or infinite samples" in err and not (tmp_path / "run2" / "checkpoints").exists()


def test_evaluate_skip_leaves_out_a_file_with_nan_samples(tiny_model, nan_corpus, tmp_path, capsys):
    code, text, err = run(capsys, "evaluate", str(tiny_model), str(nan_corpus), "--out-dir", str(tmp_path / "e"),
                          "--on-bad-audio", "skip", "-q")
    assert code == 0, err
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["utterances"] == 8 and [s["id"] for s in summary["skipped"]] == ["nan"]


def test_extract_refuses_a_file_with_nan_samples_before_any_work(tiny_run_args, nan_corpus, tmp_path, capsys):
    enc = next(a.split("=", 1)[1] for a in tiny_run_args if a.startswith("encoder="))
    cache = tmp_path / "cache"
    code, _, err = run(capsys, "extract", "--encoder", enc, "--manifest", str(nan_corpus), "--out", str(cache), "-q")
    assert code == 1 and "nan.wav" in err and "NaN or infinite samples" in err and not cache.exists()


@pytest.fixture
def lying_corpus(tmp_path) -> Path:
    """Eight good clips and a 20 s recording whose manifest line says 2 s."""
    good = [Utterance(f"g{i}", str(make_wav(tmp_path / "wav" / f"g{i}.wav", 1.0 + 0.1 * i, freq=200 + 40 * i, seed=i)),
                      "ab ba", round(1.0 + 0.1 * i, 4)) for i in range(8)]
    liar = Utterance("liar", str(make_wav(tmp_path / "wav" / "long.wav", 20.0)), "ab ba", 2.0)
    return write_manifest(tmp_path / "lying.jsonl", [*good, liar])


def test_train_refuses_or_skips_a_clip_longer_than_its_manifest_says(tiny_run_args, lying_corpus, tmp_path, capsys):
    args = [a for a in tiny_run_args if not a.startswith("train=")]
    code, _, err = run(capsys, *args, f"train={lying_corpus}", f"out={tmp_path / 'a'}", "max_duration=5")
    assert code == 1 and "long.wav" in err and "the manifest says 2 s but the audio is 20.00 s long" in err
    code, _, err = run(capsys, *args, f"train={lying_corpus}", f"out={tmp_path / 'b'}", "max_duration=5", "on_bad_audio=skip")
    assert code == 0, err
    s = json.loads((tmp_path / "b" / "train_summary.json").read_text())
    assert [b["id"] for b in s["skipped_audio"]] == ["liar"] and "20.00 s" in s["skipped_audio"][0]["reason"]


def test_evaluate_refuses_a_clip_longer_than_its_manifest_says(tiny_model, lying_corpus, tmp_path, capsys):
    code, _, err = run(capsys, "evaluate", str(tiny_model), str(lying_corpus), "--out-dir", str(tmp_path / "e"), "-q")
    assert code == 1 and "liar" in err and "audio is 20.00 s long" in err


def test_max_batch_seconds_holds_for_a_real_long_clip_with_no_max_duration(tiny_run_args, tmp_path, capsys):
    utts = [Utterance(f"g{i}", str(make_wav(tmp_path / "wav" / f"g{i}.wav", 1.0 + 0.1 * i, seed=i)), "ab ba",
                      round(1.0 + 0.1 * i, 4)) for i in range(6)]
    utts.append(Utterance("long", str(make_wav(tmp_path / "wav" / "long.wav", 20.0)), "ab ba", 20.0))
    m = write_manifest(tmp_path / "m.jsonl", utts)
    args = [a for a in tiny_run_args if not a.startswith("train=")]
    code, _, err = run(capsys, *args, f"train={m}", f"out={tmp_path / 'r'}", "max_duration=none")
    assert code == 0, err
    s = json.loads((tmp_path / "r" / "train_summary.json").read_text())
    assert s["dropped_ids"]["too_long"] == ["long"] and s["train_utterances"] == 6


# -------------------------------------------------- non-finite settings and losses never reach a saved model

@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
@pytest.mark.parametrize("key", ["lr", "encoder_lr", "max_batch_seconds", "warmup", "max_duration", "clip_norm"])
def test_non_finite_float_settings_are_refused(tiny_run_args, tmp_path, capsys, key, value):
    code, _, err = run(capsys, *tiny_run_args, f"out={tmp_path / 'r'}", f"{key}={value}")
    assert code == 1 and f"config key {key!r}: must be a finite number" in err and not (tmp_path / "r").exists()


def test_a_loss_that_stays_nan_stops_the_run_and_keeps_the_last_good_weights(tiny_run_args, tmp_path, monkeypatch, capsys):
    import torch
    from safetensors.torch import load_file

    import speechtl.training.loop as loop

    real, calls = loop.ctc_loss, []

    def poisoned(*a, **kw):  # finite for the first 4 updates, NaN from the 5th on
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float("nan") if len(calls) > 4 else loss

    monkeypatch.setattr(loop, "ctc_loss", poisoned)
    out = tmp_path / "r"
    args = [a for a in tiny_run_args if not a.startswith(("max_steps", "eval_every"))]
    code, _, err = run(capsys, *args, f"out={out}", "max_steps=50", "eval_every=2", "log_every=1")
    assert code == 1 and "NaN or infinite for 3 updates in a row (steps 5-7)" in err and "last good weights" in err
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ck["state"]["step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    head = load_file(str(out / "model" / "head.safetensors"))
    assert all(torch.isfinite(v).all() for v in head.values())
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]  # no row of a broken update


# ------------------------------------------------------- resume: the encoder the run started with, or none

def test_resume_with_another_encoder_of_the_same_shape_is_refused(tiny_run_args, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    enc = Path(next(a.split("=", 1)[1] for a in tiny_run_args if a.startswith("encoder=")))
    other = tmp_path / "other-encoder"
    shutil.copytree(enc, other)
    weights = load_file(str(other / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "run"
    code, _, err = run(capsys, *tiny_run_args, f"out={out}")
    assert code == 0, err
    args = [a for a in tiny_run_args if not a.startswith(("encoder=", "max_steps"))]
    code, _, err = run(capsys, *args, f"encoder={other}", f"out={out}", "resume=true", "max_steps=4")
    assert code == 1 and "another encoder" in err and str(enc) in err and "fingerprint" in err
    code, _, err = run(capsys, *args, f"encoder={enc}", f"out={out}", "resume=true", "max_steps=4")
    assert code == 0, err
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 4


# --------------------------------------------------------- a feature cache moved with its corpus is reused

def test_a_cache_moved_with_its_corpus_is_not_extracted_again(tiny_run_args, tmp_path, capsys):
    import shutil

    from speechtl.data.manifest import read_manifest
    from speechtl.features.cache import FeatureCache

    enc = next(a.split("=", 1)[1] for a in tiny_run_args if a.startswith("encoder="))
    here = tmp_path / "here"
    utts = [Utterance(f"u{i}", str(make_wav(here / "wav" / f"u{i}.wav", 0.6 + 0.1 * i, seed=i)), "ab", round(0.6 + 0.1 * i, 4))
            for i in range(4)]
    write_manifest(here / "m.jsonl", utts)  # audio paths relative to the manifest
    code, _, err = run(capsys, "extract", "--encoder", enc, "--manifest", str(here / "m.jsonl"), "--out", str(here / "cache"), "-q")
    assert code == 0, err
    there = tmp_path / "elsewhere" / "there"
    shutil.move(str(here), str(there))
    shards = {p.name: p.stat().st_mtime_ns for p in (there / "cache").glob("*.safetensors")}
    FeatureCache(there / "cache").check(read_manifest(there / "m.jsonl"))  # current where it now lies
    code, _, err = run(capsys, "extract", "--encoder", enc, "--manifest", str(there / "m.jsonl"), "--out", str(there / "cache"))
    assert code == 0, err
    assert {p.name: p.stat().st_mtime_ns for p in (there / "cache").glob("*.safetensors")} == shards  # nothing extracted


# ------------------------------------------- damaged checkpoints: named, and the previous one takes over

def _damage(path: Path, how: str) -> None:
    import os

    import torch

    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "random":
        path.write_bytes(os.urandom(4096))
    elif how == "empty":
        path.write_bytes(b"")
    else:  # another torch file
        torch.save({"weights": torch.zeros(3)}, path)


@pytest.fixture(scope="module")
def finished_run(tiny_run_args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    args = [a for a in tiny_run_args if not a.startswith(("max_steps", "eval_every"))]
    assert main([*args, f"out={out}", "max_steps=4", "eval_every=2"]) == 0
    return out


@pytest.mark.parametrize("how,says", [("truncated", "not a readable checkpoint"), ("random", "not a torch zip archive"),
                                      ("empty", "(empty)"), ("other", "not a speechtl training checkpoint")])
def test_a_damaged_checkpoint_is_named(tiny_run_args, finished_run, tmp_path, capsys, how, says):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "checkpoints" / "previous.pt").unlink(missing_ok=True)
    _damage(out / "checkpoints" / "last.pt", how)
    args = [a for a in tiny_run_args if not a.startswith(("max_steps", "eval_every"))]
    code, _, err = run(capsys, *args, f"out={out}", "max_steps=6", "eval_every=2", "resume=true")
    assert code == 1 and f"{out / 'checkpoints' / 'last.pt'}: " in err and says in err, err
    assert "unexpected error" not in err and "start afresh" in err


@pytest.mark.parametrize("how", ["truncated", "random", "empty", "other"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tiny_run_args, finished_run, tmp_path, capsys, how):
    import shutil

    import torch

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    previous = torch.load(out / "checkpoints" / "previous.pt", weights_only=True)["state"]["step"]
    _damage(out / "checkpoints" / "last.pt", how)
    args = [a for a in tiny_run_args if not a.startswith(("max_steps", "eval_every"))]
    code, _, err = run(capsys, *args, f"out={out}", "max_steps=6", "eval_every=2", "resume=true")
    assert code == 0, err
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 6
    assert (out / "checkpoints" / "last.pt.damaged").is_file() and previous >= 2
    assert torch.load(out / "checkpoints" / "previous.pt", weights_only=True)["state"]["step"] >= previous


# ------------------------------------------------------------- a full disk: the error names the file

def test_a_full_disk_while_saving_a_checkpoint_names_the_file_and_keeps_the_last_one(tiny_run_args, finished_run, tmp_path,
                                                                                     monkeypatch, capsys):
    import shutil

    import speechtl.training.checkpoint as checkpoint

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = (out / "checkpoints" / "last.pt").read_bytes()

    def full_disk(obj, f, *a, **kw):  # what torch.save says when the disk fills under it
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 2240 vs 2134\n"
                           "basic_ios::clear: iostream error")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    args = [a for a in tiny_run_args if not a.startswith(("max_steps", "eval_every"))]
    code, _, err = run(capsys, *args, f"out={out}", "max_steps=6", "eval_every=2", "resume=true")
    assert code == 1 and f"{out / 'checkpoints' / 'last.pt'}: cannot write it (" in err and "is the disk full" in err, err
    assert "unexpected error" not in err
    assert (out / "checkpoints" / "last.pt").read_bytes() == before
    assert not list((out / "checkpoints").glob(".last.pt.*.tmp"))


def test_a_full_disk_in_transcribe_names_the_output_file(tiny_model, tmp_path, monkeypatch, capsys):
    import errno
    import pathlib

    wav = make_wav(tmp_path / "a.wav", 0.5)

    def full_disk(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    code, _, err = run(capsys, "transcribe", str(tiny_model), str(wav), "--out", str(tmp_path / "out"), "-q")
    assert code == 1 and f"{tmp_path / 'out' / 'a.txt'}: cannot write it (No space left on device" in err, err


# ------------------------------------------------------------------ damaged model files are named

@pytest.mark.parametrize("cut", [10, 0.5])
def test_a_truncated_head_is_named(tiny_model, tmp_path, capsys, cut):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    head = model / "head.safetensors"
    data = head.read_bytes()
    head.write_bytes(data[: cut if isinstance(cut, int) else int(len(data) * cut)])
    wav = make_wav(tmp_path / "a.wav", 0.5)
    code, _, err = run(capsys, "transcribe", str(model), str(wav), "-q")
    assert code == 1 and f"{head}: cannot read these weights" in err and "damaged or cut short" in err, err
    assert "unexpected error" not in err


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.marker),))


def test_pickle_encoder_weights_are_refused_with_a_safe_way_out(tiny_run_args, tmp_path, capsys):
    import shutil

    import torch

    enc = Path(next(a.split("=", 1)[1] for a in tiny_run_args if a.startswith("encoder=")))
    bad = tmp_path / "pickled-encoder"
    shutil.copytree(enc, bad)
    (bad / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"weight": _Payload(marker)}, bad / "pytorch_model.bin")
    args = [a for a in tiny_run_args if not a.startswith("encoder=")]
    code, _, err = run(capsys, *args, f"encoder={bad}", f"out={tmp_path / 'r'}")
    assert code == 1 and f"{bad / 'pytorch_model.bin'}: refused: these pickle weights" in err and "model.safetensors" in err
    assert "weights_only` set to `False` will likely succeed" not in err and not marker.exists()


# ------------------------------------------------------------------------------ the smaller items

def test_a_nan_duration_names_its_line(tmp_path, capsys):
    wav = make_wav(tmp_path / "a.wav", 0.5)
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": "a", "audio": str(wav), "text": "ab", "duration": 0.5}) + "\n"
                 + '{"id": "b", "audio": "%s", "text": "ab", "duration": NaN}\n' % wav)
    code, _, err = run(capsys, "prepare", str(m), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl"), "-q")
    assert code == 1 and f"{m}:2: 'duration' must be a non-negative number of seconds" in err, err


def test_a_jsonl_manifest_with_a_byte_order_mark_is_read(tmp_path, capsys):
    wav = make_wav(tmp_path / "a.wav", 0.5)
    m = tmp_path / "m.jsonl"
    m.write_bytes(b"\xef\xbb\xbf" + (json.dumps({"id": "a", "audio": str(wav), "text": "ab", "duration": 0.5}) + "\n").encode())
    code, _, err = run(capsys, "prepare", str(m), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl"), "-q")
    assert code == 0, err
    from speechtl.data.manifest import read_manifest

    assert [u.id for u in read_manifest(tmp_path / "o.jsonl")] == ["a"]


@pytest.mark.parametrize("flag,value", [("--beam-width", "0"), ("--beam-width", "-3"), ("--batch-seconds", "0"),
                                        ("--batch-seconds", "-1"), ("--batch-seconds", "nan"), ("--chunk-length-s", "0"),
                                        ("--chunk-length-s", "-5")])
def test_transcribe_refuses_meaningless_numbers(tiny_model, tmp_path, capsys, flag, value):
    wav = make_wav(tmp_path / "a.wav", 0.5)
    with pytest.raises(SystemExit) as e:
        main(["transcribe", str(tiny_model), str(wav), flag, value, "-q"])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_a_chunk_too_short_to_hold_a_frame_is_named(tiny_model, tmp_path, capsys):
    wav = make_wav(tmp_path / "a.wav", 0.5)
    code, _, err = run(capsys, "transcribe", str(tiny_model), str(wav), "--chunk-length-s", "0.01", "-q")
    assert code == 1 and "chunk_length_s (0.01) leaves windows of less than one frame" in err and "ZeroDivision" not in err


def test_beam_width_zero_is_refused_by_the_library_too():
    from speechtl.decoding.options import DecodeOptions

    with pytest.raises(ValueError, match="beam width must be a whole number of at least 1"):
        DecodeOptions.of(beam_width=0)


def test_transcribe_no_overwrite_refuses_existing_outputs(tiny_model, tmp_path, capsys):
    wav = make_wav(tmp_path / "a.wav", 0.5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("keep me\n")
    code, _, err = run(capsys, "transcribe", str(tiny_model), str(wav), "--out", str(out), "--no-overwrite", "-q")
    assert code == 1 and str(out / "a.txt") in err and (out / "a.txt").read_text() == "keep me\n"
    code, _, err = run(capsys, "transcribe", str(tiny_model), str(wav), "--out", str(out), "-q")  # today's default
    assert code == 0 and (out / "a.txt").read_text() != "keep me\n"
    from speechtl.cli.app import build_parser

    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "transcribe" in a.choices)
    assert "replace transcripts already there (the default)" in " ".join(sub.choices["transcribe"].format_help().split())


def test_an_empty_dev_manifest_is_warned_about(tiny_run_args, tmp_path, caplog, capsys):
    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n")
    with caplog.at_level("WARNING", logger="speechtl"):
        code, _, err = run(capsys, *tiny_run_args, f"out={tmp_path / 'r'}", f"dev={dev}")
    assert code == 0, err
    assert f"{dev}: the dev manifest holds no utterances" in caplog.text


# ------------------------------------------------------- a hand-broken encoder config.json is named with its key

@pytest.mark.parametrize("edit,says", [
    ("delete", "config.json: missing"),
    ("not_json", "config.json: not valid JSON"),
    ({"model_type": None}, "no 'model_type' key"),
    ({"num_hidden_layers": -1}, "key 'num_hidden_layers' must be a whole number of at least 1 (got -1)"),
    ({"hidden_size": "32"}, "key 'hidden_size' must be a whole number of at least 1 (got '32')"),
    ({"intermediate_size": 1.5}, "key 'intermediate_size' must be a whole number"),
    ({"conv_dim": [8, "x"]}, "key 'conv_dim' must be a list of whole numbers"),
    ({"hidden_act": "gelu_but_not_really"}, "key 'hidden_act': 'gelu_but_not_really' is not an activation"),
    ({"feat_extract_activation": 3}, "key 'feat_extract_activation': 3 is not an activation"),
    ({"hidden_size": 48}, "key 'hidden_size' is 48, but model.safetensors holds feature_projection.projection.weight"),
    ({"num_hidden_layers": 3}, "key 'num_hidden_layers' is 3, but model.safetensors holds 2 transformer layers"),
])
@pytest.mark.parametrize("command", ["train", "transcribe"])
def test_a_broken_encoder_config_is_named_with_its_key(tiny_run_args, tiny_model, tmp_path, capsys, edit, says, command):
    import shutil

    if command == "train":
        enc = tmp_path / "enc"
        shutil.copytree(Path(next(a.split("=", 1)[1] for a in tiny_run_args if a.startswith("encoder="))), enc)
    else:
        shutil.copytree(tiny_model, tmp_path / "m")
        enc = tmp_path / "m" / "encoder"
    cfg_path = enc / "config.json"
    if edit == "delete":
        cfg_path.unlink()
    elif edit == "not_json":
        cfg_path.write_text('{"model_type": "wav2vec2", "hidden_size": 32,,}')
    else:
        cfg = json.loads(cfg_path.read_text())
        for k, v in edit.items():
            if v is None:
                cfg.pop(k)
            else:
                cfg[k] = v
        cfg_path.write_text(json.dumps(cfg))
    if command == "train":
        args = [a for a in tiny_run_args if not a.startswith("encoder=")]
        code, _, err = run(capsys, *args, f"encoder={enc}", f"out={tmp_path / 'r'}")
    else:
        code, _, err = run(capsys, "transcribe", str(tmp_path / "m"), str(make_wav(tmp_path / "a.wav", 0.5)), "-q")
    assert code == 1 and f"{cfg_path}: " in err and says in err, err
    assert "unexpected error" not in err and "freeze_layers" not in err


def test_a_resumed_extraction_shows_a_sane_progress_bar(tiny_run_args, tmp_path):
    import io
    import warnings

    from speechtl.encoders.registry import load_encoder
    from speechtl.features.extract import extract_to_cache

    enc = load_encoder(next(a.split("=", 1)[1] for a in tiny_run_args if a.startswith("encoder=")))
    # 1.9 s in all: 0.000528 audio-hours, which a total rounded to 4 places put under the sum of the updates
    utts = [Utterance(f"u{i}", str(make_wav(tmp_path / f"u{i}.wav", 0.95, seed=i)), "ab", 0.95) for i in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import contextlib

        with contextlib.redirect_stderr(io.StringIO()) as bar:
            extract_to_cache(enc, utts, tmp_path / "c", num_workers=0, progress=True)
    assert not [w for w in caught if "clamping frac" in str(w.message)]
    assert "-" not in bar.getvalue().split("<")[-1].split(",")[0]  # no negative time left


def test_a_copied_run_folder_resumes_in_itself(tiny_run_args, finished_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    before = (finished_run / "train_summary.json").read_text()
    code, out_text, err = run(capsys, "train", str(copy / "config.yaml"), "resume=true", "max_steps=6", "-q")
    assert code == 0, err
    assert f"model in {copy / 'model'}" in out_text
    assert json.loads((copy / "train_summary.json").read_text())["steps"] == 6
    assert (finished_run / "train_summary.json").read_text() == before  # the original run is left alone
