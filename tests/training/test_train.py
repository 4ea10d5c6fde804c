"""The training loop: freezing policies, resume, outputs, and that it learns."""

import csv
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from speechtl.training.config import load_train_config
from speechtl.training.train import TrainingInterrupted, lr_lambda, min_ctc_frames, train


def _cfg(tmp_path, corpus, encoder, **kw):
    base = dict(encoder=str(encoder), train=str(corpus), out=str(tmp_path / "out"), max_steps=4, eval_every=2,
                num_workers=0, max_batch_seconds=4.0, lr=3e-3, encoder_lr=1e-3, seed=0)
    base.update(kw)
    return load_train_config(None, base)


def _encoder_weights(model_dir):
    return load_file(str(model_dir / "encoder" / "model.safetensors"))


def test_frozen_encoder_is_bit_identical_after_training(tmp_path, tones, tiny_encoder):
    summary = train(_cfg(tmp_path, tones, tiny_encoder, mode="frozen", head="bilstm", bilstm_hidden=8), progress=False)
    assert summary["steps"] == 4
    src = load_file(str(tiny_encoder / "model.safetensors"))
    out = _encoder_weights(tmp_path / "out" / "model")
    assert src.keys() == out.keys()
    assert all(torch.equal(src[k], out[k]) for k in src)
    head = load_file(str(tmp_path / "out" / "model" / "head.safetensors"))
    assert "layer_sum.weights" in head and not torch.all(head["layer_sum.weights"] == 0)


def test_finetune_freeze_period(tmp_path, tones, tiny_encoder):
    src = load_file(str(tiny_encoder / "model.safetensors"))

    def run(steps, sub):
        train(_cfg(tmp_path / sub, tones, tiny_encoder, mode="finetune", max_steps=steps, eval_every=steps,
                   freeze_encoder_steps=3, mask_time_prob=0.0), progress=False)
        return _encoder_weights(tmp_path / sub / "out" / "model")

    at_n, after_n = run(3, "a"), run(4, "b")
    transformer = [k for k in src if not k.startswith("feature_extractor.")]
    cnn = [k for k in src if k.startswith("feature_extractor.")]
    assert all(torch.equal(src[k], at_n[k]) for k in src), "encoder changed during the freeze period"
    assert any(not torch.equal(src[k], after_n[k]) for k in transformer), "transformer never trained after the freeze"
    assert all(torch.equal(src[k], after_n[k]) for k in cnn), "the CNN feature encoder must stay frozen"


@pytest.mark.parametrize("mode", ["finetune", "frozen"])
def test_resume_gives_the_same_weights(tmp_path, tones, tiny_encoder, mode):
    # threads named: every update on the same count (sums split across threads round differently)
    kw = dict(mode=mode, max_steps=6, eval_every=2, mask_time_prob=0.2, mask_time_length=2, threads=1)
    train(_cfg(tmp_path / "straight", tones, tiny_encoder, **kw), progress=False)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tmp_path / "broken", tones, tiny_encoder, **kw), progress=False, should_stop=lambda step: step == 3)
    summary = train(_cfg(tmp_path / "broken", tones, tiny_encoder, resume=True, **kw), progress=False)
    assert summary["steps"] == 6
    for name in ("head.safetensors", "encoder/model.safetensors"):
        a = load_file(str(tmp_path / "straight" / "out" / "model" / name))
        b = load_file(str(tmp_path / "broken" / "out" / "model" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    rows = list(csv.DictReader(open(tmp_path / "broken" / "out" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == sorted({int(r["step"]) for r in rows})


def test_outputs_summary_metrics_and_dev_scoring(tmp_path, tones, tiny_encoder):
    summary = train(_cfg(tmp_path, tones, tiny_encoder, mode="frozen", dev=str(tones), log_every=1), progress=False)
    out = tmp_path / "out"
    saved = json.loads((out / "train_summary.json").read_text())
    for key in ("steps", "wall_time_s", "audio_hours_seen", "best_dev_wer", "best_dev_cer"):
        assert key in saved and saved[key] is not None
    assert saved == json.loads(json.dumps(summary))
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert rows[1]["dev_cer"] != "" and rows[0]["dev_cer"] == ""
    for f in ("hyps.jsonl", "errs.txt", "summary.json"):
        assert (out / "dev" / f).is_file()
    vocab = json.loads((out / "model" / "vocab.json").read_text())
    assert list(vocab)[:3] == ["<pad>", "[UNK]", "|"]


def test_infeasible_clips_are_dropped_with_a_count(tmp_path, tiny_encoder):
    from conftest import make_wav
    from speechtl.data.manifest import Utterance, write_manifest

    ok = make_wav(tmp_path / "ok.wav", 1.0)
    short = make_wav(tmp_path / "short.wav", 0.1)  # 4 frames at 50 Hz
    manifest = write_manifest(tmp_path / "m.jsonl", [
        Utterance("ok", str(ok), "ab", 1.0), Utterance("short", str(short), "a very long transcript", 0.1),
        Utterance("empty", str(ok), "", 1.0)])
    summary = train(_cfg(tmp_path, manifest, tiny_encoder, mode="frozen", max_steps=1), progress=False)
    assert summary["dropped"] == {"empty_transcript": 1, "too_short_for_transcript": 1, "too_long": 0}
    assert summary["dropped_ids"] == {"empty_transcript": ["empty"], "too_short_for_transcript": ["short"]}
    assert summary["train_utterances"] == 1


def test_min_ctc_frames_counts_repeats():
    assert min_ctc_frames([1, 2, 3]) == 3
    assert min_ctc_frames([1, 1, 2, 2]) == 6


def test_schedules():
    cfg = load_train_config(None, {"train": "x", "max_steps": 100, "warmup": 0.1, "hold": 0.4})
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.01) and f(10) == 1.0 and f(49) == 1.0
    assert f(100) == pytest.approx(0.05) and f(60) < 1.0
    lin = lr_lambda(load_train_config(None, {"train": "x", "max_steps": 100, "warmup": 10, "schedule": "linear"}))
    assert lin(10) == 1.0 and lin(55) == pytest.approx(0.5) and lin(100) == 0.0


def test_config_yaml_and_overrides(tmp_path):
    (tmp_path / "m.jsonl").write_text("")
    (tmp_path / "c.yaml").write_text("mode: finetune\ntrain: m.jsonl\nlr: 3e-4\nmax_steps: 10\n")
    cfg = load_train_config(tmp_path / "c.yaml", ["max_steps=20", "encoder_lr=1e-5", "dev=none"])
    assert cfg.mode == "finetune" and cfg.max_steps == 20 and cfg.lr == 3e-4 and cfg.encoder_lr == 1e-5
    assert cfg.train == str(tmp_path / "m.jsonl") and cfg.dev is None
    with pytest.raises(ValueError, match="unknown config key"):
        load_train_config(tmp_path / "c.yaml", ["max_stepz=3"])
    with pytest.raises(ValueError, match="expected int"):
        load_train_config(tmp_path / "c.yaml", ["max_steps=many"])


def test_training_learns_to_transcribe_speech(tmp_path, speech_corpus):
    """~20 synthesised utterances: a frozen-encoder head on the bundled encoder must
    drive training-set CER below 0.3."""
    from speechtl.encoders.registry import BUNDLED_DIR

    if not (BUNDLED_DIR / "default" / "model.safetensors").is_file():
        pytest.skip("no bundled encoder in this checkout")
    summary = train(_cfg(tmp_path, speech_corpus, "default", mode="frozen", head="bilstm", bilstm_hidden=96, bilstm_layers=1,
                         dev=str(speech_corpus), max_steps=160, eval_every=40, lr=6e-3, max_batch_seconds=20), progress=False)
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < losses[0] / 3, losses
    assert summary["best_dev_cer"] < 0.3, summary
    # the folder's own decoding: an LM of the training text, tuned on dev, which evaluate uses by default
    from speechtl.data.manifest import read_manifest
    from speechtl.decoding.options import DecodeOptions
    from speechtl.inference.recognizer import Recognizer

    d = summary["decoding"]
    tuned = d["tuned_on"]
    dev = read_manifest(speech_corpus, check_files=False)
    assert tuned["utterances"] == len(dev) and tuned["greedy"]["cer"] == pytest.approx(summary["best_dev_cer"], abs=1e-9)
    rec = Recognizer.load(tmp_path / "out" / "model")
    default, greedy = rec.evaluate(dev), rec.evaluate(dev, options=DecodeOptions())
    assert greedy["wer"] == pytest.approx(tuned["greedy"]["wer"])
    assert default["decoder"] == d["decoder"]
    if d["decoder"] == "beam":  # what tuning measured is what a user gets, and no worse than greedy
        assert default["wer"] == pytest.approx(tuned["beam"]["wer"]) and default["wer"] <= greedy["wer"]


def test_cached_frozen_training_matches_on_the_fly(tmp_path, tones, tiny_encoder):
    # no dropout: transformers draws from the RNG in every encoder layer even in eval mode,
    # so the two paths see different dropout masks; the numerics are what is compared
    kw = dict(mode="frozen", max_steps=6, eval_every=6, log_every=1, dev=str(tones), head_dropout=0.0,
              amp="none")  # a float32 encoder in both: a CPU with AMX would otherwise cache bf16 features
    a = train(_cfg(tmp_path / "cached", tones, tiny_encoder, cache_features=True, **kw), progress=False)
    b = train(_cfg(tmp_path / "live", tones, tiny_encoder, cache_features=False, **kw), progress=False)
    losses = [[float(r["loss"]) for r in csv.DictReader(open(tmp_path / d / "out" / "metrics.csv"))] for d in ("cached", "live")]
    assert len(losses[0]) == 6
    # features are cached in float16: the loss curves agree to that precision
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)
    assert a["best_dev_cer"] == pytest.approx(b["best_dev_cer"], abs=0.02)


def test_early_stopping_when_dev_error_stops_improving(tmp_path, tones, tiny_encoder):
    # lr=0: the dev error cannot improve after the first evaluation
    summary = train(_cfg(tmp_path, tones, tiny_encoder, mode="frozen", dev=str(tones), lr=0.0, max_steps=50, eval_every=1,
                         patience=2), progress=False)
    assert summary["stop_reason"] == "early_stopping"
    assert summary["steps"] == 3 and summary["best_step"] == 1


def test_unreadable_audio_stops_training_before_it_starts(tmp_path, tiny_encoder):
    from conftest import make_corrupt, make_wav
    from speechtl.data.manifest import Utterance, write_manifest

    ok = make_wav(tmp_path / "ok.wav", 1.0)
    bad = make_corrupt(tmp_path / "bad.wav")
    manifest = write_manifest(tmp_path / "m.jsonl", [Utterance("ok", str(ok), "ab", 1.0), Utterance("bad", str(bad), "ab", 1.0)])
    with pytest.raises(ValueError, match="bad.wav"):
        train(_cfg(tmp_path, manifest, tiny_encoder, mode="frozen", max_steps=1), progress=False)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_frozen_dev_score_uses_dev_audio_when_ids_repeat(tmp_path, tones, tiny_encoder):
    # train and dev manifests from separate sources often reuse ids (u0, u1, ...); an
    # untrained head still emits feature-dependent characters, so any mix-up shows
    from conftest import tone_corpus
    from speechtl.data.manifest import read_manifest
    from speechtl.inference.recognizer import Recognizer

    dev = tone_corpus(tmp_path / "dev", n=6, seed=5)
    assert {u.id for u in read_manifest(dev)} <= {u.id for u in read_manifest(tones)}
    train(_cfg(tmp_path, tones, tiny_encoder, mode="frozen", dev=str(dev), max_steps=1, eval_every=1, lr=1e-9),
          progress=False)
    during = {r["id"]: r["hyp"] for r in map(json.loads, open(tmp_path / "out" / "dev" / "hyps.jsonl"))}
    Recognizer.load(tmp_path / "out" / "model").evaluate(read_manifest(dev), out_dir=tmp_path / "eval")
    after = {r["id"]: r["hyp"] for r in map(json.loads, open(tmp_path / "eval" / "hyps.jsonl"))}
    assert any(during.values())
    assert during == after


class _Payload:
    """Pickles to a call that would create a file: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path, tones, tiny_encoder, capsys):
    import torch

    from speechtl.cli.app import main

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "model": _Payload(marker)}, out / "checkpoints" / "last.pt")
    rc = main(["train", f"encoder={tiny_encoder}", f"train={tones}", f"out={out}", "max_steps=2", "num_workers=0",
               "resume=true", "-q"])
    assert rc == 1
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()  # the payload never ran


def test_speed_perturbation_copies_every_clip_at_each_factor(tmp_path, tones, tiny_encoder):
    import numpy as np

    from speechtl.data.audio import change_speed
    from speechtl.data.loader import AudioDataset, speed_copies
    from speechtl.data.manifest import read_manifest

    utts = read_manifest(tones)
    items = speed_copies(utts, [0.9, 1.1])
    assert len(items) == 3 * len(utts) and items[: len(utts)] == utts
    u, slow = utts[0], items[len(utts)]
    assert slow.id == f"sp0.9-{u.id}" and slow.duration == pytest.approx(u.duration / 0.9)
    ds = AudioDataset(items)
    n = ds[0]["wav"].numel()
    assert ds[len(utts)]["wav"].numel() == pytest.approx(n / 0.9, abs=2)
    assert ds[2 * len(utts)]["wav"].numel() == pytest.approx(n / 1.1, abs=2)
    # a 400 Hz tone played 1.1 times as fast is a 440 Hz tone
    t = np.arange(16000) / 16000
    fast = change_speed(np.sin(2 * np.pi * 400 * t).astype(np.float32), 1.1)
    assert np.argmax(np.abs(np.fft.rfft(fast))) * 16000 / fast.size == pytest.approx(440, abs=2)

    summary = train(_cfg(tmp_path, tones, tiny_encoder, mode="frozen", speed_perturb="0.9,1.1", max_steps=2), progress=False)
    assert summary["speed_perturb"] == [0.9, 1.1]
    assert summary["train_utterances"] == len(utts) and summary["train_items"] == 3 * len(utts)
    assert summary["train_hours"] == pytest.approx(sum(x.duration for x in utts) / 3600)


@pytest.mark.parametrize("bad", ["1.0", "3", "[0.9, 0.9]", "fast"])
def test_speed_perturbation_factors_are_checked(tmp_path, bad):
    with pytest.raises(ValueError, match="speed_perturb"):
        load_train_config(None, [f"train={tmp_path}/m.jsonl", f"speed_perturb={bad}"])


def test_speed_perturbed_copies_have_their_own_cache_entries(tmp_path, tones, tiny_encoder):
    import dataclasses

    from speechtl.data.loader import speed_copies
    from speechtl.data.manifest import read_manifest
    from speechtl.encoders.registry import load_encoder
    from speechtl.features.cache import FeatureCache, StaleCacheError
    from speechtl.features.extract import extract_in_memory, extract_to_cache

    utts = read_manifest(tones)[:2]
    items = speed_copies(utts, [1.1])
    enc = load_encoder(str(tiny_encoder))
    extract_to_cache(enc, items, tmp_path / "c", progress=False)
    cache = FeatureCache(tmp_path / "c")
    cache.check(items)
    mem = extract_in_memory(enc, items)
    for u in items:
        assert mem[u.id].shape == cache[u.id].shape
    assert mem[items[2].id].shape[1] < mem[utts[0].id].shape[1]  # fewer frames when faster
    other_speed = dataclasses.replace(items[2], speed=1.2)  # same id, other speed
    with pytest.raises(StaleCacheError, match="cached from other audio"):
        FeatureCache(tmp_path / "c").check([*items[:2], other_speed, items[3]])


def test_speed_copies_refuse_colliding_ids_and_resume_refuses_other_data(tmp_path, tones, tiny_encoder):
    import dataclasses

    from speechtl.data.loader import speed_copies
    from speechtl.data.manifest import read_manifest

    utts = read_manifest(tones)
    clash = [*utts, dataclasses.replace(utts[0], id=f"sp1.1-{utts[0].id}")]
    with pytest.raises(ValueError, match="share the id"):
        speed_copies(clash, [1.1])
    assert "speed" not in utts[0].to_json() and speed_copies(utts, [1.1])[-1].to_json()["speed"] == 1.1
    kw = dict(mode="frozen", max_steps=4, eval_every=2, save_every=2)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tmp_path, tones, tiny_encoder, **kw), progress=False, should_stop=lambda step: step >= 2)
    with pytest.raises(ValueError, match="training items"):
        train(_cfg(tmp_path, tones, tiny_encoder, resume=True, speed_perturb=[0.9], **kw), progress=False)


@pytest.mark.parametrize("with_dev", [False, True])
def test_resuming_a_finished_run_is_a_no_op(tmp_path, tones, tiny_encoder, with_dev, caplog):
    kw = dict(mode="finetune", max_steps=4, eval_every=3, mask_time_prob=0.0, **({"dev": str(tones)} if with_dev else {}))
    first = train(_cfg(tmp_path, tones, tiny_encoder, **kw), progress=False)
    out = tmp_path / "out"
    rows = (out / "metrics.csv").read_text()
    weights = (out / "model" / "head.safetensors").read_bytes()
    ckpt = (out / "checkpoints" / "last.pt").read_bytes()
    again = train(_cfg(tmp_path, tones, tiny_encoder, resume=True, **kw), progress=False)
    assert again["steps"] == first["steps"] == 4
    assert (out / "metrics.csv").read_text() == rows
    assert (out / "model" / "head.safetensors").read_bytes() == weights
    assert (out / "checkpoints" / "last.pt").read_bytes() == ckpt
    assert "this run is complete" in caplog.text
    more = train(_cfg(tmp_path, tones, tiny_encoder, resume=True, **{**kw, "max_steps": 6}), progress=False)
    assert more["steps"] == 6  # a raised max_steps trains on


@pytest.mark.parametrize("key,value,message", [
    ("schedule", "cosine", "'schedule': 'cosine' is not one of tristage, linear, constant"),
    ("best_metric", "loss", "'best_metric': 'loss' is not one of cer, wer"),
    ("max_minutes", "abc", "'max_minutes': expected a number or none, got 'abc'"),
    ("save_every", "often", "'save_every': expected an integer or none"),
    ("freeze_feature_encoder", "maybe", "'freeze_feature_encoder': expected true or false or none, got 'maybe'"),
    ("dev", 3, "'dev': expected a string or none"),
    ("feature_cache", True, "'feature_cache': expected a string or none"),
    ("grad_accum", 0, "'grad_accum': must be at least 1 (got 0)"),
    ("eval_every", 0, "'eval_every': must be at least 1 (got 0)"),
    ("max_minutes", 0, "'max_minutes': must be greater than 0"),
    ("head_dropout", 1.5, "'head_dropout': must be in [0, 1)"),
    ("device", "gpu", "'device': 'gpu' is not auto, cpu, cuda or cuda:N"),
])
def test_bad_configuration_values_stop_before_any_work(tmp_path, key, value, message):
    from speechtl.training.config import TrainConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(train="t.jsonl", **{key: value})  # from Python, as from YAML or key=value
    with pytest.raises(ValueError, match=re.escape(message)):
        load_train_config(None, {"train": "t.jsonl", key: value})


def test_ctrl_c_saves_a_checkpoint_that_resume_continues(tmp_path, tones, tiny_encoder):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    args = [sys.executable, "-m", "speechtl", "train", f"encoder={tiny_encoder}", f"train={tones}", f"out={out}",
            "mode=finetune", "max_steps=100000", "eval_every=100000", "log_every=1", "num_workers=0", "-q"]
    p = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.csv").is_file():
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "saving a checkpoint" in err
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    done = ck["state"]["step"]
    assert done >= 1
    summary = train(_cfg(tmp_path, tones, tiny_encoder, mode="finetune", max_steps=done + 2, eval_every=100000,
                         out=str(out), resume=True), progress=False)
    assert summary["steps"] == done + 2


def test_a_binding_time_budget_shapes_the_schedule(tmp_path, tones, tiny_encoder, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="speechtl.training")
    summary = train(_cfg(tmp_path, tones, tiny_encoder, mode="frozen", max_steps=1_000_000, max_minutes=0.15,
                         eval_every=1_000_000, log_every=1, lr=1e-2), progress=False)
    assert summary["stop_reason"] == "max_minutes" and summary["steps"] > 20
    assert "learning-rate schedule is fitted" in caplog.text
    with open(tmp_path / "out" / "metrics.csv", newline="") as f:
        lrs = [float(r["lr_head"]) for r in csv.DictReader(f)]
    assert max(lrs) > 0.9e-2  # warm-up finished and the peak was reached
    assert lrs[-1] < 0.3e-2, lrs[::10]  # and the rate decayed before the budget ran out
