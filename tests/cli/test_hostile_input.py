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
