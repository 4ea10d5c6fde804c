"""On-the-fly augmentation and layer distillation from a teacher encoder."""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_signal
from speechtl.data.augment import AugmentConfig, Augmenter
from speechtl.data.loader import AudioDataset, collate
from speechtl.data.manifest import read_manifest
from speechtl.encoders.registry import load_encoder
from speechtl.encoders.testing import encoder_from_config, tiny_config
from speechtl.models.distill import Distiller, spread_layers
from speechtl.training.config import load_train_config
from speechtl.training.train import TrainingInterrupted, train

OFF = AugmentConfig(p_gain=0, p_reverb=0, p_telephone=0, p_codec=0, p_noise=0)


def _speechlike(seconds=1.0):
    return make_signal(seconds, freq=220.0, seed=3).astype(np.float32) * 0.5


@pytest.mark.parametrize("effect", ["p_gain", "p_reverb", "p_telephone", "p_codec", "p_noise"])
def test_each_effect_keeps_the_length_and_changes_the_clip(effect):
    wav = _speechlike()
    torch.manual_seed(0)
    out = Augmenter(dataclasses.replace(OFF, **{effect: 1.0}))(wav)
    assert out.shape == wav.shape and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and np.max(np.abs(out)) <= 1.0
    assert np.mean((out - wav) ** 2) > 1e-6 * np.mean(wav**2), f"{effect} left the clip unchanged"


def test_augmentation_follows_torch_seed_and_is_off_when_all_probabilities_are_zero():
    wav = _speechlike()
    aug = Augmenter()
    torch.manual_seed(5)
    a = aug(wav)
    torch.manual_seed(5)
    b = aug(wav)
    torch.manual_seed(6)
    c = aug(wav)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(Augmenter(OFF)(wav), wav)


def test_telephone_band_removes_high_frequencies():
    t = np.arange(16000) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 1000 * t) + 0.3 * np.sin(2 * np.pi * 6000 * t)).astype(np.float32)
    out = Augmenter(dataclasses.replace(OFF, p_telephone=1.0))(wav)
    spec = np.abs(np.fft.rfft(out))
    assert spec[6000] < 0.05 * spec[1000]


def test_dataset_keeps_the_clean_clip_beside_the_augmented_one(tones):
    utts = read_manifest(tones)[:3]
    ds = AudioDataset(utts, encode=lambda s: [1] * len(s), augment=Augmenter(dataclasses.replace(OFF, p_noise=1.0)),
                      keep_clean=True)
    torch.manual_seed(0)
    batch = collate([ds[i] for i in range(3)])
    assert batch.clean is not None and batch.clean.shape == batch.waveforms.shape
    assert not torch.equal(batch.clean, batch.waveforms)
    plain = collate([AudioDataset(utts, encode=lambda s: [1])[i] for i in range(3)])
    assert plain.clean is None and torch.equal(plain.waveforms, batch.clean)


def test_spread_layers():
    assert spread_layers(8, 3) == [3, 5, 8]
    assert spread_layers(6, 3) == [2, 4, 6]
    assert spread_layers(2, 1) == [2]


def _tiny(seed, **kw):
    return encoder_from_config(tiny_config("wav2vec2", layerdrop=0.0, **kw), seed=seed)


def test_distiller_loss_falls_as_the_student_learns_the_teacher():
    teacher, student = _tiny(1), _tiny(2)
    d = Distiller(teacher, [1, 2], [1, 2], student.hidden_size)
    opt = torch.optim.Adam([*student.parameters(), *d.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x, lengths = torch.randn(2, 16000, generator=g) * 0.1, torch.tensor([16000, 12000])
    losses = []
    for _ in range(30):
        out = student(x, lengths)
        loss, parts = d(out.hidden_states, out.lengths, x, lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(parts) == {"l1_0", "cos_0", "l1_1", "cos_1"}
    assert losses[-1] < 0.7 * losses[0]
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(not k.startswith("teacher") for k in d.state_dict())


def test_distiller_ignores_padding():
    teacher, student = _tiny(1), _tiny(2).eval()  # no dropout: the two passes must agree
    d = Distiller(teacher, [2], [2], student.hidden_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16000, generator=g) * 0.1
    padded = torch.cat([x, torch.randn(1, 8000, generator=g)], dim=1)  # junk after the clip
    a, _ = d(student(x, torch.tensor([16000])).hidden_states, torch.tensor([49]), x, torch.tensor([16000]))
    out = student(padded.clone().index_fill_(1, torch.arange(16000, 24000), 0.0), torch.tensor([16000]))
    b, _ = d(out.hidden_states, out.lengths, padded, torch.tensor([16000]))
    assert torch.allclose(a, b, atol=1e-4)


def test_distiller_refuses_layers_the_teacher_lacks():
    teacher = _tiny(1)
    with pytest.raises(ValueError, match="teacher_layers.*0..2"):
        Distiller(teacher, [3], [2], 16)


def _cfg(tmp_path, corpus, encoder, **kw):
    base = dict(encoder=str(encoder), train=str(corpus), out=str(tmp_path / "out"), max_steps=4, eval_every=2,
                num_workers=0, max_batch_seconds=4.0, lr=3e-3, encoder_lr=1e-3, seed=0, mode="scratch")
    base.update(kw)
    return load_train_config(None, base)


def test_scratch_training_with_a_whisper_teacher_and_augmentation_resumes_exactly(tmp_path, tones, tiny_encoder):
    from transformers import WhisperForConditionalGeneration

    from speechtl.encoders.whisper import tiny_whisper_config

    torch.manual_seed(0)
    teacher_dir = tmp_path / "whisper"
    WhisperForConditionalGeneration(tiny_whisper_config()).save_pretrained(str(teacher_dir))
    # threads=1: a run and its resumed copy repeat exactly only on a fixed thread count
    kw = dict(teacher=str(teacher_dir), augment=0.7, max_steps=5, eval_every=5, save_every=1, mask_time_prob=0.0, threads=1,
              layerdrop=0.0)
    straight = train(_cfg(tmp_path / "a", tones, tiny_encoder, **kw), progress=False)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tmp_path / "b", tones, tiny_encoder, **kw), progress=False, should_stop=lambda step: step == 2)
    ck = torch.load(tmp_path / "b" / "out" / "checkpoints" / "last.pt", weights_only=True)
    assert "distill" in ck and any(k.startswith("proj.") for k in ck["distill"])
    resumed = train(_cfg(tmp_path / "b", tones, tiny_encoder, resume=True, **kw), progress=False)
    assert straight["steps"] == resumed["steps"] == 5
    a = load_file(str(tmp_path / "a" / "out" / "model" / "encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "model" / "encoder" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the saved encoder is a plain encoder: no projections, no teacher
    assert load_encoder(str(tmp_path / "a" / "out" / "model" / "encoder")).num_layers == 3
    import csv

    rows = list(csv.DictReader(open(tmp_path / "a" / "out" / "metrics.csv")))
    assert rows and all(0 < float(r["distill_loss"]) < float(r["loss"]) for r in rows)
    no_teacher = train(_cfg(tmp_path / "c", tones, tiny_encoder, **{**kw, "teacher": None}), progress=False)
    c = load_file(str(tmp_path / "c" / "out" / "model" / "encoder" / "model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a), "the teacher changed nothing"
    assert no_teacher["steps"] == 5
    assert all(r["distill_loss"] == "" for r in csv.DictReader(open(tmp_path / "c" / "out" / "metrics.csv")))
    with pytest.raises(ValueError, match="teacher"):
        train(_cfg(tmp_path / "b", tones, tiny_encoder, resume=True, **{**kw, "teacher": None, "max_steps": 6}), progress=False)


def test_teacher_with_another_frame_rate_is_refused(tmp_path, tones, tiny_encoder, session_dir):
    from conftest import tiny_encoder_dir

    coarse = tiny_encoder_dir(session_dir, conv_stride=(5, 2, 2, 2, 2, 2, 4))  # 40 ms frames
    with pytest.raises(ValueError, match="same frame rate"):
        train(_cfg(tmp_path, tones, tiny_encoder, teacher=str(coarse)), progress=False)


@pytest.mark.parametrize("bad, match", [
    (dict(teacher="x", mode="frozen"), "teacher"),
    (dict(augment=1.5), "augment"),
    (dict(augment=0.5, mode="frozen"), "cache_features"),
    (dict(teacher_layers=[-1]), "teacher_layers"),
    (dict(distill_weight=-1.0), "distill_weight"),
    (dict(teacher="x", layerdrop=0.1), "layerdrop"),
])
def test_bad_distillation_settings_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        load_train_config(None, {"train": "x", "mode": "scratch", **bad})


def test_resume_reads_a_metrics_log_written_before_the_distillation_column(tmp_path, tones, tiny_encoder):
    import csv

    kw = dict(mode="finetune", max_steps=4, eval_every=2, log_every=1)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tmp_path, tones, tiny_encoder, **kw), progress=False, should_stop=lambda step: step == 2)
    log = tmp_path / "out" / "metrics.csv"
    old_fields = ["step", "epoch", "loss", "lr_head", "lr_encoder", "audio_hours", "elapsed_s", "dev_wer", "dev_cer"]
    rows = list(csv.DictReader(open(log)))
    with open(log, "w", newline="") as f:  # as the previous release wrote it
        w = csv.DictWriter(f, fieldnames=old_fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    train(_cfg(tmp_path, tones, tiny_encoder, resume=True, **kw), progress=False)
    rows = list(csv.DictReader(open(log)))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and all(None not in r.values() for r in rows)


def test_student_layers_pair_with_teacher_layers_and_same_width_starts_from_identity():
    teacher = _tiny(1)
    d = Distiller(teacher, [1, 2], [1, 2], teacher.hidden_size)
    x, lengths = torch.randn(1, 16000) * 0.1, torch.tensor([16000])
    with torch.no_grad():
        own = teacher(x, lengths)
        loss, parts = d(own.hidden_states, own.lengths, x, lengths)
    assert float(parts["l1_0"]) == 0 and float(parts["l1_1"]) == 0  # a student equal to its teacher
    with pytest.raises(ValueError, match="student_layers"):
        load_train_config(None, {"train": "x", "mode": "scratch", "teacher_layers": [1, 2], "student_layers": [1]})


def test_a_whisper_encoder_continues_training_with_itself_as_teacher(tmp_path, tones):
    """The pretraining recipe's set-up: a Whisper encoder fine-tuned with phoneme CTC while
    its middle layers are held near the unchanged copy's. Without augmentation the first
    update's distillation loss is the cosine term's floor alone (-log sigmoid(1)); the
    saved encoder is a Whisper directory that loads back with the trained weights."""
    import csv
    import math

    from transformers import WhisperForConditionalGeneration

    from speechtl.encoders.whisper import tiny_whisper_config

    torch.manual_seed(0)
    start = tmp_path / "whisper"
    WhisperForConditionalGeneration(tiny_whisper_config()).save_pretrained(str(start))
    cfg = _cfg(tmp_path, tones, str(start), mode="finetune", teacher=str(start), teacher_layers=[1], student_layers=[1],
               freeze_feature_encoder=False, max_steps=4, eval_every=4, mask_time_prob=0.0, layerdrop=0.0,
               encoder_lr=1e-3, log_every=1)
    train(cfg, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    assert float(rows[0]["distill_loss"]) == pytest.approx(-math.log(1 / (1 + math.exp(-1))), abs=1e-4)
    assert float(rows[-1]["distill_loss"]) > float(rows[0]["distill_loss"])  # the student moved away
    trained = load_encoder(str(tmp_path / "out" / "model" / "encoder"))
    original = load_encoder(str(start))
    assert trained.config.model_type == "whisper"
    changed = [k for k, v in original.model.state_dict().items() if not torch.equal(v, trained.model.state_dict()[k])]
    assert any(k.startswith("conv1.") for k in changed), "the convolution stem stayed fixed"
    assert any(k.startswith("layers.") for k in changed)
