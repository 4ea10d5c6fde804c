"""``log=tensorboard``: event files beside metrics.csv that TensorBoard reads back with the
same figures."""

import csv

import pytest

from speechtl.training.config import load_train_config
from speechtl.training.train import train

pytest.importorskip("tensorboard")


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_match_metrics_csv(tmp_path, tones, tiny_encoder):
    out = tmp_path / "out"
    cfg = load_train_config(None, dict(encoder=str(tiny_encoder), train=str(tones), dev=str(tones), out=str(out),
                                       mode="frozen", max_steps=12, eval_every=6, log_every=2, num_workers=0,
                                       max_batch_seconds=4.0, lr=3e-3, seed=0, log="csv,tensorboard"))
    train(cfg, progress=False)
    rows = list(csv.DictReader(open(out / "metrics.csv", newline="")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]  # the CSV as it always was
    assert list(out.glob("events.out.tfevents.*"))
    acc = _events(out)
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/audio_hours", "lr/head", "dev/wer", "dev/cer"} <= set(tags)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [int(r["step"]) for r in rows]
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    assert [e.value for e in acc.Scalars("lr/head")] == pytest.approx([float(r["lr_head"]) for r in rows], rel=1e-6)
    dev = [r for r in rows if r["dev_wer"]]
    assert [e.step for e in acc.Scalars("dev/wer")] == [int(r["step"]) for r in dev] == [6, 12]
    assert [e.value for e in acc.Scalars("dev/cer")] == pytest.approx([float(r["dev_cer"]) for r in dev], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/audio_hours")] == pytest.approx([float(r["audio_hours"]) for r in rows],
                                                                                 abs=1e-5)
    tag, = [t for t in acc.Tags()["tensors"] if t.startswith("dev/transcripts")]  # torch adds "/text_summary"
    text = acc.Tensors(tag)
    assert [e.step for e in text] == [6, 12]
    table = text[-1].tensor_proto.string_val[0].decode()
    assert "| utterance | reference | hypothesis |" in table and "| u0 |" in table


def test_csv_only_writes_no_events(tmp_path, tones, tiny_encoder):
    out = tmp_path / "out"
    cfg = load_train_config(None, dict(encoder=str(tiny_encoder), train=str(tones), out=str(out), mode="frozen",
                                       max_steps=2, eval_every=2, num_workers=0, max_batch_seconds=4.0, seed=0))
    train(cfg, progress=False)
    assert (out / "metrics.csv").exists() and not list(out.glob("events.out.tfevents.*"))


@pytest.mark.parametrize("value", ["tensorbord", "csv,wandb", ""])
def test_unknown_log_sink_is_refused_naming_the_key(value):
    with pytest.raises(ValueError, match="config key 'log': .* is not csv, tensorboard or csv,tensorboard"):
        load_train_config(None, {"train": "t.jsonl", "log": value})
