"""What a command costs before it starts its work: imports, the encoder's fingerprint for
the feature-cache key, DataLoader worker processes, the garbage collector."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from argparse import Namespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_wav, tiny_encoder_dir
from speechtl.data.manifest import Utterance
from speechtl.encoders.registry import load_encoder
from speechtl.features import extract as extract_mod
from speechtl.features import fingerprint as fingerprint_mod
from speechtl.features.extract import extract_to_cache
from speechtl.features.fingerprint import encoder_fingerprint, fingerprint_reuse_key


def _run_python(code: str, cwd=None) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, cwd=cwd,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- imports


def test_the_parser_and_help_import_neither_torch_nor_transformers():
    got = _run_python("""
        import contextlib, io, json, sys
        import speechtl.cli.app as cli

        cli.build_parser()
        after_parser = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        helps = {}
        for argv in (["--help"], ["prepare", "--help"], ["extract", "--help"], ["transcribe", "--help"],
                     ["lm", "build", "--help"], ["evaluate", "--help"], ["train", "--help"]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                cli.main(argv)
            helps[" ".join(argv)] = out.getvalue()
        heavy = sorted(m for m in ("torch", "transformers", "numpy", "soundfile") if m in sys.modules)
        print(json.dumps({"after_parser": after_parser, "heavy": heavy, "helps": helps}))
    """)
    assert got["after_parser"] == []
    assert got["heavy"] == []  # not even numpy or soundfile
    assert "transcribe" in got["helps"]["--help"] and "--num-workers" in got["helps"]["extract --help"]
    assert "lora_rank" in got["helps"]["train --help"]  # the config keys, adapters' included


def test_prepare_and_lm_build_run_without_torch(tmp_path):
    for i in range(3):
        make_wav(tmp_path / "corpus" / f"c{i}.wav", 0.5, freq=300 + 40 * i)
        (tmp_path / "corpus" / f"c{i}.txt").write_text(f"word{i} again", encoding="utf-8")
    got = _run_python(f"""
        import json, sys
        from speechtl.cli.app import main

        rc = [main(["prepare", {str(tmp_path / "corpus")!r}, "--format", "folder", "--out", {str(tmp_path / "m.jsonl")!r}, "-q"]),
              main(["lm", "build", {str(tmp_path / "m.jsonl")!r}, "--out", {str(tmp_path / "lm.arpa")!r}, "-q"])]
        print(json.dumps({{"rc": rc, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}}))
    """)
    assert got == {"rc": [0, 0], "heavy": []}
    assert "\\data\\" in (tmp_path / "lm.arpa").read_text()


def test_reading_and_resampling_audio_imports_neither_librosa_nor_scipy_signal(tmp_path):
    path = make_wav(tmp_path / "a.wav", 0.7, sr=22050)
    got = _run_python(f"""
        import json, sys
        from speechtl.data.audio import load_audio

        wav = load_audio({str(path)!r})
        print(json.dumps({{"n": len(wav), "heavy": sorted(m for m in ("librosa", "scipy.signal", "numba") if m in sys.modules)}}))
    """)
    assert got == {"n": int(0.7 * 16000), "heavy": []}


def test_resampling_gives_what_librosa_soxr_hq_gives():
    import librosa
    import numpy as np

    from speechtl.data.audio import resample

    rng = np.random.default_rng(0)
    for sr in (8000, 22050, 44100, 48000):
        for n in (1, 7, 22051):
            x = rng.standard_normal(n).astype(np.float32)
            ours, theirs = resample(x, sr, 16000), librosa.resample(x, orig_sr=sr, target_sr=16000, res_type="soxr_hq")
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


def test_train_help_still_lists_the_config_keys(capsys):
    from speechtl.cli.app import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "key=value" in out and "max_steps" in out and "feature_cache" in out


def test_public_names_of_the_package_load_on_first_use():
    got = _run_python("""
        import json, sys
        import speechtl

        before = sorted(m for m in ("numpy", "soundfile", "torch") if m in sys.modules)
        from speechtl import AudioError, ManifestError, Utterance, load, load_audio, read_manifest, write_manifest
        light = sorted(m for m in ("torch",) if m in sys.modules)
        print(json.dumps({"before": before, "light": light, "audio": speechtl.data.audio.SAMPLE_RATE,
                          "all": sorted(speechtl.__all__), "dir": "load_audio" in dir(speechtl)}))
    """)
    assert got["before"] == [] and got["light"] == [] and got["audio"] == 16000 and got["dir"]
    assert {"load", "load_audio", "Recognizer", "read_manifest"} <= set(got["all"])
    import speechtl
    from speechtl import Recognizer
    from speechtl.inference.recognizer import Recognizer as R

    assert Recognizer is R
    with pytest.raises(AttributeError):
        speechtl.no_such_name  # noqa: B018


# --------------------------------------------------------------------------- encoder fingerprint


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A private fingerprint store (under $SPEECHTL_CACHE), which also keeps the fingerprints
    of encoder folders written a moment ago (the tests' are)."""
    monkeypatch.setenv("SPEECHTL_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.setattr(fingerprint_mod, "RACY_SECONDS", 0.0)
    return tmp_path / "user-cache" / "fingerprints"


def _encoder_folder(tmp_path):
    return tiny_encoder_dir(tmp_path / "encoders")


def test_the_fingerprint_is_hashed_once_and_reused(tmp_path, store, monkeypatch):
    folder = _encoder_folder(tmp_path)
    enc = load_encoder(str(folder))
    first = encoder_fingerprint(enc)
    assert first == encoder_fingerprint(enc, reuse=False)  # the same value as hashing every weight
    assert len(list(store.iterdir())) == 1

    def no_hashing(*a, **k):
        raise AssertionError("hashed the weights again")

    monkeypatch.setattr(fingerprint_mod, "_hash_weights", no_hashing)
    assert encoder_fingerprint(load_encoder(str(folder))) == first  # another load of the same files


def test_a_changed_weight_file_changes_the_fingerprint(tmp_path, store):
    folder = _encoder_folder(tmp_path)
    enc = load_encoder(str(folder))
    first = encoder_fingerprint(enc)
    old_files = fingerprint_mod._source_files(enc)
    # change one value that the reuse key's sampled values do not read
    path = folder / "model.safetensors"
    weights = load_file(str(path))
    name = max(weights, key=lambda k: weights[k].numel())
    assert weights[name].numel() > 2 * fingerprint_mod.PROBE_VALUES
    weights[name].view(-1)[1] += 1.0
    st = path.stat()
    save_file(weights, str(path), metadata={"format": "pt"})
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its old modification time
    changed = load_encoder(str(folder))
    # only the file's state tells the two apart: the sampled values are the same
    assert fingerprint_reuse_key(changed, files=old_files) == fingerprint_reuse_key(enc, files=old_files)
    assert fingerprint_reuse_key(changed) != fingerprint_reuse_key(enc, files=old_files)
    assert encoder_fingerprint(changed) == encoder_fingerprint(changed, reuse=False) != first


def test_weights_changed_in_memory_are_hashed_afresh(tmp_path, store):
    folder = _encoder_folder(tmp_path)
    enc = load_encoder(str(folder))
    first = encoder_fingerprint(enc)
    weight = max(enc.model.parameters(), key=lambda p: p.numel())
    with torch.no_grad():
        weight.add_(0.01)  # as a training step would
    assert encoder_fingerprint(enc) == encoder_fingerprint(enc, reuse=False) != first
    fresh = load_encoder(str(folder), random_init=True, seed=5)  # same folder, other weights
    assert encoder_fingerprint(fresh) == encoder_fingerprint(fresh, reuse=False) != first


def test_a_freshly_written_folder_is_not_remembered(tmp_path, store, monkeypatch):
    monkeypatch.setattr(fingerprint_mod, "RACY_SECONDS", 2.0)
    folder = tiny_encoder_dir(tmp_path / "encoders")  # just written: its timestamps could still hide a change
    assert encoder_fingerprint(load_encoder(str(folder)))
    assert not store.exists() or not list(store.iterdir())
    now = os.stat(folder / "config.json").st_mtime_ns
    assert not fingerprint_mod._racy([str(folder), [["f", 1, now - 3 * 10**9, now - 3 * 10**9, 1]]])


def test_an_unwritable_store_only_costs_a_hash(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SPEECHTL_CACHE", str(blocker))
    enc = load_encoder(str(_encoder_folder(tmp_path)))
    assert encoder_fingerprint(enc) == encoder_fingerprint(enc, reuse=False)


# --------------------------------------------------------------------------- DataLoader workers


def test_a_small_job_starts_no_decoding_workers(tmp_path, store, monkeypatch):
    from speechtl.data import loader

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)  # a big machine
    big = [3.0] * 300  # 300 clips, 15 min
    assert loader.decode_workers("cpu", big) == 2 and loader.decode_workers("cuda", big) == 8
    for small in ([3.0] * 150, [1.0] * 300, [30.0] * 10):  # few clips, or little audio
        assert loader.decode_workers("cpu", small) == 0 and loader.decode_workers("cuda", small) == 0
    assert loader.decode_workers("cpu") == 2  # without the job's size: as before

    seen = []
    real = extract_mod.DataLoader
    monkeypatch.setattr(extract_mod, "DataLoader", lambda *a, **k: seen.append(k["num_workers"]) or real(*a, **k))
    utts = [Utterance(f"u{i}", str(make_wav(tmp_path / f"u{i}.wav", 0.6, freq=300 + 50 * i)), "ab", 0.6) for i in range(2)]
    extract_to_cache(load_encoder(str(_encoder_folder(tmp_path))), utts, tmp_path / "c", progress=False)
    assert seen == [0]


def test_training_starts_workers_by_the_same_rule_unless_num_workers_is_set(monkeypatch):
    from speechtl.training.build import workers_for

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    small = [Utterance(f"s{i}", "x.wav", "ab", 2.0) for i in range(50)]
    big = [Utterance(f"b{i}", "x.wav", "ab", 3.0) for i in range(300)]

    def workers(num_workers, utts):
        return workers_for(Namespace(num_workers=num_workers), torch.device("cpu"), utts)

    assert (workers(None, small), workers(None, big)) == (0, 2)
    assert (workers(3, small), workers(0, big)) == (3, 0)  # a value given is kept


# --------------------------------------------------------------------------- the schedule


def test_the_schedule_is_timed_once_per_machine_and_read_back(tmp_path, store, monkeypatch):
    from speechtl.features import cpu_plan as schedule

    enc = load_encoder(str(_encoder_folder(tmp_path)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # two cores: 2 streams or 1, each CNN
    options = schedule.candidates(enc, "cpu")
    assert set(options) == {schedule.Schedule(s, c) for s in (2, 1) for c in (True, False)}
    timed = []
    real = schedule.time_schedule
    fastest = schedule.Schedule(1, False)  # made the fastest here, whatever this machine says

    def fake(encoder, device, sched, amp):
        timed.append(sched)
        real(encoder, device, sched, amp)  # runs: the probe must work for every option
        return 0.01 if sched == fastest else 0.05

    monkeypatch.setattr(schedule, "time_schedule", fake)
    assert schedule.choose(enc, "cpu") == fastest and sorted(timed, key=str) == sorted(options, key=str)
    assert enc.fast_cnn  # the probe leaves the encoder as it was
    kept = json.loads(schedule.store_path().read_text())
    (entry,) = kept.values()
    assert entry["schedule"] == {"streams": 1, "fast_cnn": False} and len(entry["seconds_per_audio_second"]) == 4

    timed.clear()
    assert schedule.choose(enc, "cpu") == fastest and timed == []  # read back, not timed again
    assert schedule.choose(enc, "cuda") == schedule.Schedule(1, False)  # a GPU runs one stream
    schedule.store_path().write_text("not json")
    assert schedule.choose(enc, "cpu", calibrate=False) == schedule.default_schedule(enc, "cpu")


def test_a_big_extraction_runs_the_chosen_schedule_and_a_small_one_the_default(tmp_path, store, monkeypatch):
    from speechtl.features import cpu_plan as schedule

    enc = load_encoder(str(_encoder_folder(tmp_path)))
    utts = [Utterance(f"u{i}", str(make_wav(tmp_path / f"u{i}.wav", 0.6, freq=300 + 50 * i)), "ab", 0.6) for i in range(2)]
    monkeypatch.setattr(extract_mod, "choose_schedule", lambda *a, **k: schedule.Schedule(1, False))
    seen = []
    real = extract_mod.encode_batches

    def spy(encoder, loader, device, layer_ids, dtype, streams, amp):
        seen.append((streams, encoder.fast_cnn))
        return real(encoder, loader, device, layer_ids, dtype, streams, amp)

    monkeypatch.setattr(extract_mod, "encode_batches", spy)
    small = extract_to_cache(enc, utts, tmp_path / "small", progress=False, amp="none")  # float32: bf16 (AMX CPUs) differs by schedule
    monkeypatch.setattr(extract_mod, "is_small_job", lambda durations: False)
    big = extract_to_cache(enc, utts, tmp_path / "big", progress=False, amp="none")
    assert seen == [(None, True), (1, False)] and enc.fast_cnn  # restored after
    for u in utts:  # the same features either way
        torch.testing.assert_close(small[u.id].float(), big[u.id].float(), atol=2e-3, rtol=1e-2)


# --------------------------------------------------------------------------- garbage collector


def test_start_up_freezes_only_in_a_process_started_as_the_command():
    from speechtl.cli.common import start_up

    frozen = gc.get_freeze_count()
    with start_up(Namespace(as_program=False)):
        assert gc.isenabled()
    assert gc.get_freeze_count() == frozen  # a caller's process: left alone
    try:
        with start_up(Namespace(as_program=True)):
            assert not gc.isenabled()
            kept = [object() for _ in range(10)]  # noqa: F841
        assert gc.isenabled() and gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()

