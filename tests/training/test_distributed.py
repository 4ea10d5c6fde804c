"""Multi-process training (torchrun + gloo) and crash-safe resume after SIGKILL."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_encoder_dir, tone_corpus
from speechtl.training.checkpoint import load_checkpoint

NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                  final_dropout=0.0, layerdrop=0.0)


def _env(threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _losses(out: Path) -> list[float]:
    rows = list(csv.DictReader(open(out / "metrics.csv", encoding="utf-8")))
    return [float(r["loss"]) for r in rows]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tone_corpus(tmp_path_factory.mktemp("ddp") / "tones", n=16)


def test_two_process_gloo_training_matches_one_process_with_accumulation(tmp_path, corpus):
    from speechtl.data.manifest import read_manifest, write_manifest

    enc = tiny_encoder_dir(tmp_path, **NO_DROPOUT)
    dev = write_manifest(tmp_path / "dev.jsonl", read_manifest(corpus)[:5], absolute=True)  # odd: ranks score 3 and 2
    # clips of 0.8-2 s under a 1.5 s cap: one clip per micro-batch, 16 per epoch, and 4 updates of
    # 4 micro-batches take exactly one epoch, in both set-ups
    common = ["encoder=" + str(enc), f"train={corpus}", f"dev={dev}", "mode=finetune", "max_steps=4", "eval_every=4",
              "log_every=1", "max_batch_seconds=1.5", "mask_time_prob=0", "head_dropout=0", "num_workers=0",
              "lr=3e-3", "encoder_lr=1e-3", "seed=0", "device=cpu"]
    one = subprocess.run([sys.executable, "-m", "speechtl", "train", *common, f"out={tmp_path / 'one'}", "grad_accum=4", "-q"],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert one.returncode == 0, one.stderr[-3000:]
    # 2 processes x 2 micro-batches: gradients are synchronised on the second only (no_sync on the first)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "speechtl", "train", *common, f"out={tmp_path / 'two'}", "grad_accum=2", "-q"],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trained 4 steps") == 1  # rank 0 reports for both

    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert a[0] != a[-1]  # it trained
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5), (a, b)

    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"]["max_seconds_per_update"] == 6.0
    assert summary["audio_hours_seen"] == pytest.approx(
        json.loads((tmp_path / "one" / "train_summary.json").read_text())["audio_hours_seen"])
    # dev scoring is gathered: every dev utterance, in manifest order, scored once, as one process scores it
    two_dev = [json.loads(line) for line in open(tmp_path / "two" / "dev" / "hyps.jsonl", encoding="utf-8")]
    assert [h["id"] for h in two_dev] == [f"u{i}" for i in range(5)]
    one_dev = [json.loads(line) for line in open(tmp_path / "one" / "dev" / "hyps.jsonl", encoding="utf-8")]
    assert [h["ref"] for h in two_dev] == [h["ref"] for h in one_dev]
    ck = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert len(ck["rng_ranks"]) == 2 and ck["state"]["world_size"] == 2

    # resuming a 2-process checkpoint with 1 process is refused with a clear message
    again = subprocess.run([sys.executable, "-m", "speechtl", "train", *common, f"out={tmp_path / 'two'}", "resume=true",
                            "max_steps=6", "-q"], capture_output=True, text=True, timeout=300, env=_env())
    assert again.returncode != 0 and "same number of processes" in again.stderr


def _weights(out: Path) -> dict:
    return load_checkpoint(out / "checkpoints" / "last.pt")["model"]


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_weights(tmp_path, corpus, tiny_encoder):
    # dropout and time masking on, so the random streams must be restored too
    args = [f"encoder={tiny_encoder}", f"train={corpus}", "mode=finetune", "max_steps=60", "eval_every=20", "save_every=1",
            "log_every=1", "max_batch_seconds=2.0", "mask_time_prob=0.2", "mask_time_length=2", "num_workers=0", "seed=0",
            "device=cpu"]
    cmd = [sys.executable, "-m", "speechtl", "train", *args, "-q"]
    straight = subprocess.run(cmd + [f"out={tmp_path / 'straight'}"], capture_output=True, text=True, timeout=300, env=_env())
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    ckpt = out / "checkpoints" / "last.pt"
    rng = random.Random(1234)
    kills, last_step = 0, 0
    while kills < 3:
        p = subprocess.Popen(cmd + [f"out={out}", "resume=true"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=_env(), start_new_session=True)
        # wait for training to move past the last checkpoint, then kill at a random moment
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline:
            if ckpt.exists():
                try:
                    step = load_checkpoint(ckpt)["state"]["step"]
                except Exception:  # being replaced at this instant: os.replace is atomic, retry
                    step = last_step
                if step > last_step:
                    break
            time.sleep(0.02)
        assert ckpt.exists(), "no checkpoint within 120 s: " + (p.stderr.read()[-2000:] if p.poll() is not None else "")
        time.sleep(rng.uniform(0.0, 0.25))
        assert p.poll() is None, "training finished before it could be killed: " + p.stderr.read()[-2000:]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        kills += 1
        ck = load_checkpoint(ckpt)  # whatever the moment, the checkpoint on disk loads
        assert ck["state"]["step"] >= last_step
        last_step = ck["state"]["step"]
    assert 0 < last_step < 60
    done = subprocess.run(cmd + [f"out={out}", "resume=true"], capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = _weights(tmp_path / "straight"), _weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 60
    rows = list(csv.DictReader(open(out / "metrics.csv", encoding="utf-8")))
    assert [int(r["step"]) for r in rows] == list(range(1, 61))  # no row lost or repeated across the kills


def test_a_folder_swap_cut_short_by_a_kill_is_repaired_on_the_next_write(tmp_path):
    from speechtl.core.io import atomic_dir, atomic_path

    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    # the state a kill leaves between atomic_dir's two renames: the old folder set aside, no new one yet
    os.replace(target, tmp_path / ".model.old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed while writing")
    assert (target / "weights").read_text() == "v1"  # the complete old folder is back, the half-written one gone
    assert not list(tmp_path.glob(".model.*"))
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2" and not list(tmp_path.glob(".model.*"))

    f = tmp_path / "last.pt"
    f.write_text("complete")
    with pytest.raises(RuntimeError):
        with atomic_path(f) as tmp:
            tmp.write_text("trunc")
            raise RuntimeError("killed while writing")
    assert f.read_text() == "complete" and not list(tmp_path.glob(".last.pt.*"))


def test_sampler_gives_every_rank_a_batch_when_there_are_fewer_batches_than_ranks():
    from speechtl.data.loader import DynamicBucketSampler

    durations = [1.0, 1.0, 1.0]  # two batches under a 2 s cap
    per_rank = [DynamicBucketSampler(durations, 2.0, seed=0, rank=r, world_size=8).batches() for r in range(8)]
    assert all(len(b) == 1 for b in per_rank)
    assert {i for b in per_rank for batch in b for i in batch} == {0, 1, 2}
