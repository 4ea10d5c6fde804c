"""Continued self-supervised training of Whisper's encoder (``continue_steps``) on a tiny
random Whisper: the masks, what trains and what stays, resume, and bad configurations."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import test_seq2seq as base  # noqa: E402
from test_seq2seq import _cfg, _unlabelled  # noqa: E402

from speechtl.training.config import load_train_config  # noqa: E402

tiny_whisper, corpus = base.tiny_whisper, base.corpus  # the fixtures of test_seq2seq, shared


def test_masks_stay_inside_each_clip_and_leave_numpys_generator_alone():
    from speechtl.training.seq2seq_continue import mask_spans

    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    lengths = [40, 12, 3]
    a = mask_spans(lengths, 50, 0.65, 10, np.random.default_rng(0))
    b = mask_spans(lengths, 50, 0.65, 10, np.random.default_rng(0))
    assert (np.random.get_state()[1] == before).all()  # the global generator is put back
    assert torch.equal(a, b)  # the same seed, the same spans
    assert a.shape == (3, 50) and a.dtype == torch.bool
    for row, n in zip(a, lengths):
        assert row[:n].any() and not row[n:].any()  # every clip masked somewhere, never past its end
    assert 0.3 < a[0, :40].float().mean() < 0.8  # about the asked share where the clip is long enough


@pytest.mark.parametrize("frames", ["masked", "all"])
def test_continued_pretraining_trains_the_encoder_towards_the_unmasked_teacher(tiny_whisper, corpus, tmp_path, frames):
    from speechtl.training import seq2seq as trainer
    from speechtl.training.seq2seq_continue import CONTINUED, continue_encoder, encoder_params

    unl = _unlabelled(tmp_path / "unl.jsonl", corpus["test"])
    run = trainer._build(_cfg(tiny_whisper, corpus, tmp_path / "r", seq2seq_train="lora", seq2seq_window="clip",
                              unlabelled=str(unl), continue_steps=30, continue_lr=1e-2, continue_frames=frames),
                         progress=False)
    enc = {k: v.detach().clone() for k, v in encoder_params(run.model).items()}
    others = {k: p.detach().clone() for k, p in run.model.named_parameters() if k not in enc}
    assert enc and all("lora_" in k for k in enc)
    done = continue_encoder(run, progress=False)
    assert done["steps"] == 30 and done["clips"] == 8 + len(run.train.utts)
    assert done["loss_last10"] < 0.8 * done["loss_first10"], done
    now = dict(run.model.named_parameters())
    assert any(not torch.equal(now[k], v) for k, v in enc.items())  # the encoder's LoRA moved
    assert all(torch.equal(now[k], v) for k, v in others.items())  # nothing else did
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "r" / CONTINUED))
    assert set(saved) == set(enc) and all(torch.equal(saved[k], now[k].detach()) for k in saved)


def test_continued_pretraining_runs_before_training_and_a_resume_loads_it(tiny_whisper, corpus, tmp_path, monkeypatch):
    from speechtl.training import seq2seq_continue
    from speechtl.training.train import train

    unl = _unlabelled(tmp_path / "unl.jsonl", corpus["test"])
    kw = dict(seq2seq_train="full", seq2seq_window="clip", unlabelled=str(unl), continue_steps=4, self_train_rounds=0,
              max_steps=4, eval_every=4)
    summary = train(_cfg(tiny_whisper, corpus, tmp_path / "run", **kw), progress=False)
    assert summary["continued"]["steps"] == 4 and "dev_after" in summary["continued"]
    assert summary["self_train_rounds"] == 0 and summary["pseudo_labelled"] == 0 and summary["steps"] == 4
    # a run cut off after the stage: resume loads its weights instead of training again
    (tmp_path / "run" / "checkpoints" / "last.pt").unlink()

    def no_training(*a, **k):
        raise AssertionError("the stage trained again")

    monkeypatch.setattr(seq2seq_continue, "_batch_loss", no_training)
    again = train(_cfg(tiny_whisper, corpus, tmp_path / "run", resume=True, **kw), progress=False)
    assert again["continued"]["loaded_from"].endswith("continued.safetensors")


def test_bad_continued_pretraining_configurations_fail_before_any_work(tiny_whisper, corpus, tmp_path):
    unl = str(_unlabelled(tmp_path / "unl.jsonl", corpus["test"]))
    out = tmp_path / "a"
    with pytest.raises(ValueError, match="'continue_steps': continued pretraining trains the encoder on the unlabelled"):
        _cfg(tiny_whisper, corpus, out, seq2seq_train="lora", continue_steps=5)
    for part in ("decoder", "lora_decoder"):
        with pytest.raises(ValueError, match=f"'continue_steps': for seq2seq_train=lora or full.*{part}"):
            _cfg(tiny_whisper, corpus, out, seq2seq_train=part, unlabelled=unl, continue_steps=5)
    with pytest.raises(ValueError, match="'continue_steps': continued pretraining of Whisper's encoder is for mode=seq2seq"):
        load_train_config(None, {"train": str(corpus["train"]), "continue_steps": 5})
    with pytest.raises(ValueError, match="'self_train_rounds': 0 with unlabelled and no continue_steps"):
        _cfg(tiny_whisper, corpus, out, seq2seq_train="lora", unlabelled=unl, self_train_rounds=0)
    with pytest.raises(ValueError, match="'continue_mask_prob': must be in"):
        _cfg(tiny_whisper, corpus, out, seq2seq_train="lora", unlabelled=unl, continue_steps=5, continue_mask_prob=1.0)
    with pytest.raises(ValueError, match="'continue_frames': 'some' is not one of masked, all"):
        _cfg(tiny_whisper, corpus, out, seq2seq_train="lora", unlabelled=unl, continue_steps=5, continue_frames="some")
    with pytest.raises(ValueError, match="'continue_lr': must be greater than 0"):
        _cfg(tiny_whisper, corpus, out, seq2seq_train="lora", unlabelled=unl, continue_steps=5, continue_lr=0)
    assert not out.exists()
    assert _cfg(tiny_whisper, corpus, out, seq2seq_train="full", unlabelled=unl, continue_steps=5).continue_steps == 5
