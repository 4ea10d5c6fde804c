"""Dataset, bucketed sampler and collate."""

import random

import pytest
import torch
from torch.utils.data import DataLoader

from speechtl.data.loader import AudioDataset, DynamicBucketSampler, collate, padding_overhead, random_batches
from speechtl.data.manifest import read_manifest
from speechtl.data.text import Normalizer, Vocabulary


def _durations(n=500, seed=0):
    rng = random.Random(seed)
    return [rng.uniform(1.0, 15.0) for _ in range(n)]


def test_batches_respect_the_cap_and_cover_every_clip_once():
    d = _durations()
    s = DynamicBucketSampler(d, 60.0, seed=1)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(len(d)))
    assert all(max(d[i] for i in b) * len(b) <= 60.0 for b in batches)


def test_deterministic_by_seed_and_epoch():
    d = _durations()
    a, b = DynamicBucketSampler(d, 60.0, seed=3), DynamicBucketSampler(d, 60.0, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(DynamicBucketSampler(d, 60.0, seed=4)) != list(b)


def test_bucketing_keeps_padding_low_where_random_batching_does_not():
    d = _durations(2000)
    bucketed = DynamicBucketSampler(d, 120.0, seed=0).padding_overhead()
    rand = padding_overhead(random_batches(d, 120.0, seed=0), d)
    assert bucketed < 0.15 < rand


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_shards_and_the_same_number_of_steps(world):
    d = _durations(101)
    samplers = [DynamicBucketSampler(d, 30.0, seed=0, rank=r, world_size=world) for r in range(world)]
    counts = {len(list(s)) for s in samplers}
    assert len(counts) == 1
    seen = [i for s in samplers for b in s for i in b]
    assert set(seen) == set(range(len(d)))  # repeats only pad the last round


def test_skip_resumes_mid_epoch():
    d = _durations(50)
    s = DynamicBucketSampler(d, 30.0, seed=0)
    full = list(s)
    s.skip = 3
    assert list(s) == full[3:]
    assert list(s) == full  # skip applies to one pass only


def test_manifest_round_trips_through_the_loader(tones):
    utts = read_manifest(tones)
    norm = Normalizer()
    vocab = Vocabulary.build(norm(u.text) for u in utts)
    ds = AudioDataset(utts, normalize=norm, encode=vocab.encode)
    loader = DataLoader(ds, batch_sampler=DynamicBucketSampler(ds.durations, 5.0, shuffle=False), collate_fn=collate)
    seen = {}
    for batch in loader:
        assert batch.waveforms.shape == (len(batch.ids), int(batch.lengths.max()))
        for k, uid in enumerate(batch.ids):
            n = int(batch.lengths[k])
            assert torch.all(batch.waveforms[k, n:] == 0)
            ids = batch.targets[k, : int(batch.target_lengths[k])].tolist()
            seen[uid] = (n, vocab.decode(ids))
    for u in utts:
        n, text = seen[u.id]
        assert abs(n / 16000 - u.duration) < 0.01
        assert text == norm(u.text)
