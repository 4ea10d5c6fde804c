"""The on-disk feature cache: equal to on-the-fly features, stale detection, resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_encoder_dir
from speechtl.cli.app import main
from speechtl.data.manifest import read_manifest, write_manifest
from speechtl.encoders.registry import load_encoder
from speechtl.features import extract as extract_mod
from speechtl.features.cache import FeatureCache, StaleCacheError
from speechtl.features.extract import extract_in_memory, extract_to_cache
from speechtl.features.fingerprint import encoder_fingerprint
from speechtl.training.config import load_train_config
from speechtl.training.train import train


@pytest.fixture()
def utts(tones):
    return read_manifest(tones)


def test_cache_equals_features_computed_in_memory(tmp_path, tiny_encoder, utts):
    enc = load_encoder(str(tiny_encoder))
    cache = extract_to_cache(enc, utts, tmp_path / "c", dtype="float32", shard_seconds=3.0, num_workers=0, progress=False)
    assert len(cache.shards) > 1 and len(cache) == len(utts)
    ref = extract_in_memory(enc, utts)  # float16, batched differently
    for u in utts:
        got = cache[u.id]
        assert got.shape == ref[u.id].shape == (enc.num_layers, enc.frame_lengths(int(round(u.duration * 16000))), enc.hidden_size)
        torch.testing.assert_close(got, ref[u.id].float(), atol=2e-2, rtol=2e-2)
    cache.check(utts, encoder_fingerprint(enc))  # current: no error


def test_layer_subset_and_lazy_layer_reads(tmp_path, tiny_encoder, utts):
    enc = load_encoder(str(tiny_encoder))
    full = extract_to_cache(enc, utts, tmp_path / "all", num_workers=0, progress=False)
    sub = extract_to_cache(enc, utts, tmp_path / "sub", layers="0,-1", num_workers=0, progress=False)
    assert sub.meta["layers"] == [0, enc.num_layers - 1]
    u = utts[0].id
    torch.testing.assert_close(sub[u], full[u][[0, enc.num_layers - 1]])
    torch.testing.assert_close(FeatureCache(tmp_path / "all", layers=[2])[u], full[u][[2]])


def test_stale_cache_is_detected(tmp_path, session_dir, utts):
    enc = load_encoder(str(tiny_encoder_dir(session_dir)))
    cache = extract_to_cache(enc, utts, tmp_path / "c", num_workers=0, progress=False)
    other = load_encoder(str(tiny_encoder_dir(session_dir)), random_init=True, seed=3)
    with pytest.raises(StaleCacheError, match="different encoder"):
        cache.check(utts, encoder_fingerprint(other))
    with pytest.raises(StaleCacheError, match="layers"):
        cache.check(utts, layers=[0, 1])
    changed = [u if i else type(u)(**{**u.__dict__, "duration": u.duration + 0.5}) for i, u in enumerate(utts)]
    with pytest.raises(StaleCacheError, match="other audio"):
        cache.check(changed)
    extra = utts + [type(utts[0])(**{**utts[0].__dict__, "id": "new"})]
    with pytest.raises(StaleCacheError, match="not in the cache"):
        cache.check(extra)


def test_interrupted_extraction_resumes_where_it_stopped(tmp_path, tiny_encoder, utts, monkeypatch):
    enc = load_encoder(str(tiny_encoder))
    straight = extract_to_cache(enc, utts, tmp_path / "straight", shard_seconds=3.0, num_workers=0, progress=False)
    n = len(straight.shards)
    assert n >= 3

    real_save, saved = extract_mod.save_file, []

    def crash_after_two(tensors, path, metadata=None):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(path)
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(extract_mod, "save_file", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract_to_cache(enc, utts, tmp_path / "c", shard_seconds=3.0, num_workers=0, progress=False)
    assert not list((tmp_path / "c").glob("*.tmp*")), "a partial shard was left behind"
    with pytest.raises(StaleCacheError, match="unfinished"):
        FeatureCache(tmp_path / "c").check(utts)

    saved.clear()
    monkeypatch.setattr(extract_mod, "save_file", lambda t, p, metadata=None: (saved.append(p), real_save(t, p, metadata=metadata)))
    cache = extract_to_cache(enc, utts, tmp_path / "c", shard_seconds=3.0, num_workers=0, progress=False)
    assert len(saved) == n - 2  # only the missing shards were computed
    cache.check(utts)
    for s in cache.shards:
        a, b = load_file(str(tmp_path / "c" / s.file)), load_file(str(tmp_path / "straight" / s.file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_write_disjoint_shards_of_one_cache(tmp_path, tiny_encoder, utts):
    enc = load_encoder(str(tiny_encoder))
    kw = dict(shard_seconds=3.0, num_workers=0, progress=False, world_size=2)
    assert extract_to_cache(enc, utts, tmp_path / "c", rank=1, **kw) is None
    files_rank1 = {p.name for p in (tmp_path / "c").glob("shard-*")}
    cache = extract_to_cache(enc, utts, tmp_path / "c", rank=0, **kw)
    files_all = {p.name for p in (tmp_path / "c").glob("shard-*")}
    assert files_rank1 and files_rank1 < files_all and len(files_all) == len(cache.shards)
    cache.check(utts)


def test_extract_cli(tmp_path, tiny_encoder, tones, capsys):
    assert main(["extract", "--encoder", str(tiny_encoder), "--manifest", str(tones), "--out", str(tmp_path / "c"),
                 "--num-workers", "0", "-q"]) == 0
    assert "cached 8 clips" in capsys.readouterr().out
    meta = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert meta["utterances"] == 8 and meta["dtype"] == "float16"
    assert main(["extract", "--encoder", str(tiny_encoder), "--manifest", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "d"), "-q"]) == 1


def _losses(run):
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_training_from_the_cache_matches_on_the_fly_training(tmp_path, tiny_encoder, tones):
    base = dict(encoder=str(tiny_encoder), train=str(tones), mode="frozen", head="bilstm", bilstm_hidden=8, max_steps=5,
                eval_every=5, log_every=1, num_workers=0, max_batch_seconds=4.0, lr=3e-3, seed=0,
                amp="none")  # float32 encoder everywhere; bf16 features are checked in their own test
    runs = {"fly": {"cache_features": False}, "memory": {}, "disk": {"feature_cache": str(tmp_path / "fc")}}
    for name, kw in runs.items():
        summary = train(load_train_config(None, {**base, "out": str(tmp_path / name), **kw}), progress=False)
        assert summary["steps"] == 5
    assert (tmp_path / "fc" / "train" / "cache.json").is_file()
    # float16 features against float32 ones: the same losses up to fp16 rounding
    fly, memory, disk = (_losses(tmp_path / name) for name in runs)
    assert len(fly) == len(disk) == 5
    assert disk == pytest.approx(fly, rel=1e-2)
    assert disk == pytest.approx(memory, rel=1e-2)
    # the saved model is complete: it carries its own copy of the encoder
    enc_a = load_file(str(tmp_path / "fly" / "model" / "encoder" / "model.safetensors"))
    enc_b = load_file(str(tmp_path / "disk" / "model" / "encoder" / "model.safetensors"))
    assert enc_a.keys() == enc_b.keys() and all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)


def test_torchrun_ranks_fill_one_cache(tmp_path, tiny_encoder, tones):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "speechtl",
           "extract", "--encoder", str(tiny_encoder), "--manifest", str(tones), "--out", str(tmp_path / "c"),
           "--shard-minutes", "0.05", "--num-workers", "0", "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("cached 8 clips") == 1  # only rank 0 reports
    cache = FeatureCache(tmp_path / "c")
    assert len(cache.shards) >= 2
    cache.check(read_manifest(tones))


def test_extract_names_a_broken_file_before_any_work(tmp_path, tiny_encoder, tones, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    utts = read_manifest(tones)
    utts[3] = type(utts[3])(**{**utts[3].__dict__, "audio": str(bad)})
    m = write_manifest(tmp_path / "m.jsonl", utts, absolute=True)
    assert main(["extract", "--encoder", str(tiny_encoder), "--manifest", str(m), "--out", str(tmp_path / "c"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "bad.wav" in err and "u3" in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_batches_run_side_by_side_give_the_same_features(tmp_path, tones, norm):
    # group-norm feature encoders run clip by clip inside a padded batch, from per-call state
    enc = load_encoder(str(tiny_encoder_dir(tmp_path, feat_extract_norm=norm)))
    utts = read_manifest(tones)
    one = extract_in_memory(enc, utts, max_batch_seconds=4.0, streams=1)
    threads = torch.get_num_threads()
    side_by_side = extract_in_memory(enc, utts, max_batch_seconds=4.0, streams=3)
    assert torch.get_num_threads() == threads  # restored
    assert one.keys() == side_by_side.keys()
    for uid in one:
        torch.testing.assert_close(side_by_side[uid], one[uid], rtol=2e-3, atol=2e-3)  # float16, other op threads
    extract_to_cache(enc, utts, tmp_path / "c", max_batch_seconds=4.0, streams=2, progress=False)
    cache = FeatureCache(tmp_path / "c")
    for uid in one:
        torch.testing.assert_close(cache[uid], one[uid], rtol=2e-3, atol=2e-3)


def test_encoder_precision_policy(monkeypatch):
    from speechtl.core import precision

    cpu = torch.device("cpu")
    for amx, auto in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(precision, "cpu_has_amx", lambda amx=amx: amx)
        assert precision.encoder_autocast_dtype(cpu, "auto") is auto  # bf16 only where the CPU has AMX
        assert precision.encoder_autocast_dtype(cpu, "bf16") is torch.bfloat16
        assert precision.encoder_autocast_dtype(cpu, "none") is None
        assert precision.compute_dtype_name(cpu, "auto") == ("bfloat16" if amx else "float32")
    assert precision.autocast_dtype(cpu, "auto") is None  # training never autocasts on a CPU
    with pytest.raises(ValueError, match="amp must be one of"):
        precision.encoder_autocast_dtype(cpu, "fp8")


def test_cache_records_its_precision_and_another_precision_is_stale(tmp_path, tiny_encoder, utts):
    enc = load_encoder(str(tiny_encoder))
    full = extract_to_cache(enc, utts, tmp_path / "c", dtype="float32", amp="none", num_workers=0, progress=False)
    assert full.meta["compute"] == "float32"
    f32 = {u.id: full[u.id] for u in utts}
    full.check(utts, compute="float32")
    with pytest.raises(StaleCacheError, match="ran in float32"):
        full.check(utts, compute="bfloat16")
    # the same directory asked for bf16: every shard is made again, none is reused
    low = extract_to_cache(enc, utts, tmp_path / "c", dtype="float32", amp="bf16", num_workers=0, progress=False)
    assert low.meta["compute"] == "bfloat16" and not low.missing_shards()
    low.check(utts, compute="bfloat16")
    for u in utts:
        got, ref = low[u.id], f32[u.id]
        assert not torch.equal(got, ref)
        assert ((got - ref).norm() / ref.norm()).item() < 0.05  # bf16 rounding, not other features


def test_training_reextracts_a_cache_made_in_another_precision(tmp_path, tiny_encoder, tones, caplog):
    base = dict(encoder=str(tiny_encoder), train=str(tones), mode="frozen", head="linear", max_steps=2, eval_every=2,
                num_workers=0, max_batch_seconds=4.0, feature_cache=str(tmp_path / "fc"))
    meta = tmp_path / "fc" / "train" / "cache.json"
    train(load_train_config(None, {**base, "out": str(tmp_path / "a"), "amp": "none"}), progress=False)
    assert json.loads(meta.read_text())["compute"] == "float32"
    with caplog.at_level("WARNING"):
        train(load_train_config(None, {**base, "out": str(tmp_path / "b"), "amp": "bf16"}), progress=False)
    assert "ran in float32" in caplog.text
    assert json.loads(meta.read_text())["compute"] == "bfloat16"


def test_shards_are_capped_by_feature_bytes_as_well_as_seconds(tmp_path, tiny_encoder, utts):
    enc = load_encoder(str(tiny_encoder))
    per_second = enc.frame_rate * enc.num_layers * enc.hidden_size * 2  # float16, all layers
    total = sum(u.duration for u in utts)
    kw = dict(num_workers=0, progress=False, amp="none")
    cache = extract_to_cache(enc, utts, tmp_path / "c", shard_gb=total * per_second / 3 / 1e9, **kw)
    assert len(cache.shards) >= 3  # a third of the features per shard
    for s in cache.shards:
        audio = sum(u.duration for u in utts if u.id in s.ids)
        longest = max(u.duration for u in utts if u.id in s.ids)
        assert (audio - longest) * per_second < total * per_second / 3  # full before its last clip, not after
    one = extract_to_cache(enc, utts, tmp_path / "one", **kw)
    assert len(one.shards) == 1
    for u in utts:  # batched differently: float32 rounding, then float16 storage
        torch.testing.assert_close(cache[u.id], one[u.id], atol=2e-3, rtol=1e-2)


class _SlowEncoder(torch.nn.Module):
    """Returns each clip's first sample as its one feature, after a delay set per batch,
    so that batches run side by side finish out of order."""

    def forward(self, waveforms, lengths, all_layers=True):
        import time

        from speechtl.encoders.base import EncoderOutput

        time.sleep(float(waveforms[0, 1]))
        return EncoderOutput((waveforms[:, :1, None],), torch.ones(len(lengths), dtype=torch.long))


def test_side_by_side_batches_come_back_in_order_and_errors_surface():
    from contextlib import closing

    from speechtl.data.loader import Batch
    from speechtl.features.encode import encode_batches

    def batch(n, delay):
        w = torch.tensor([[float(n), delay]])
        return Batch(w, torch.tensor([2]), torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                     [f"b{n}"], [""], [0.0])

    delays = [0.2, 0.0, 0.0, 0.0, 0.15, 0.0, 0.0, 0.05, 0.0]  # later batches overtake earlier ones
    batches = [batch(n, d) for n, d in enumerate(delays)]
    with closing(encode_batches(_SlowEncoder(), batches, torch.device("cpu"), streams=3, amp="none")) as it:
        got = [(b.ids[0], float(f[0][0, 0, 0])) for b, f in it]
    assert got == [(f"b{n}", float(n)) for n in range(len(delays))]

    def failing():
        yield from batches[:3]
        raise OSError("cannot read b3.wav")

    with pytest.raises(OSError, match="b3.wav"):
        with closing(encode_batches(_SlowEncoder(), failing(), torch.device("cpu"), streams=2, amp="none")) as it:
            list(it)


def test_re_rendered_audio_of_the_same_length_is_stale_even_in_a_subset_of_a_shard(tmp_path, tiny_encoder):
    import shutil

    import soundfile as sf

    from conftest import make_wav
    from speechtl.data.manifest import Utterance

    utts = []
    for i in range(6):  # one shard holds them all
        p = make_wav(tmp_path / "wavs" / f"u{i}.wav", 1.0, freq=300 + 20 * i, seed=i)
        utts.append(Utterance(f"u{i}", str(p), "ab", 1.0))
    enc = load_encoder(str(tiny_encoder))
    cache = extract_to_cache(enc, utts, tmp_path / "c", num_workers=0, progress=False)
    assert len(cache.shards) == 1
    cache.check(utts)
    cache.check(utts[:2])  # a subset: fine while its audio is unchanged
    before = (tmp_path / "wavs" / "u1.wav").stat().st_size
    shutil.copy(make_wav(tmp_path / "other.wav", 1.0, freq=900, seed=7), tmp_path / "wavs" / "u1.wav")
    assert (tmp_path / "wavs" / "u1.wav").stat().st_size == before and sf.info(str(tmp_path / "wavs" / "u1.wav")).duration == 1.0
    with pytest.raises(StaleCacheError, match="other audio.*'u1'"):
        cache.check(utts)
    with pytest.raises(StaleCacheError, match="other audio.*'u1'"):
        cache.check(utts[:2])  # only part of the shard is asked for: still verified
    cache.check([utts[0], utts[2]])  # clips whose audio did not change stay usable
