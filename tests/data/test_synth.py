import shutil
from pathlib import Path

import pytest

if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng not installed", allow_module_level=True)

sf = pytest.importorskip("soundfile")
pytest.importorskip("librosa")
pytest.importorskip("wordfreq")

from speechtl.data.corpora.synth import SynthConfig, list_variants, synthesize, utterance_specs, wordfreq_lang  # noqa: E402
from speechtl.data.manifest import read_manifest  # noqa: E402
from speechtl.data.text import Normalizer  # noqa: E402


def _synth(tmp_path, name, **kw):
    kw.setdefault("lang", "en-us")
    kw.setdefault("minutes", 0.1)
    kw.setdefault("workers", 2)
    return synthesize(SynthConfig(out_dir=tmp_path / name, **kw), progress=False)


def test_english_corpus(tmp_path):
    utts = _synth(tmp_path, "en", minutes=0.2, seed=1)
    manifest = read_manifest(tmp_path / "en" / "manifest.jsonl")
    assert [u.id for u in manifest] == [u.id for u in utts] == [f"en-us-{i:06d}" for i in range(len(utts))]
    total = sum(u.duration for u in manifest)
    assert total >= 12.0
    assert total - manifest[-1].duration < 12.0  # stopped at the first prefix reaching the target
    for u in manifest:
        info = sf.info(u.audio)
        assert info.samplerate == 16000 and info.channels == 1
        assert abs(info.frames / info.samplerate - u.duration) < 0.01
        assert u.lang == "en-us" and u.text and u.text == Normalizer()(u.text)
    assert len({u.speaker for u in manifest}) > 1
    assert all(u.speaker.startswith("en-us-") for u in manifest)
    # no stray files beyond the manifest
    assert sorted(p.stem for p in (tmp_path / "en" / "wavs").iterdir()) == sorted(u.id for u in manifest)


def test_deterministic(tmp_path):
    a = _synth(tmp_path, "a", seed=3, workers=1)
    b = _synth(tmp_path, "b", seed=3, workers=3)
    assert [(u.id, u.text, u.speaker, u.duration) for u in a] == [(u.id, u.text, u.speaker, u.duration) for u in b]
    for ua, ub in zip(a, b):
        assert Path(ua.audio).read_bytes() == Path(ub.audio).read_bytes()
    c = _synth(tmp_path, "c", seed=4)
    assert [u.text for u in c] != [u.text for u in a]


def test_text_file(tmp_path):
    src = tmp_path / "lines.txt"
    src.write_text("Hello, World!\n\n  The QUICK brown fox.\n-dash first line\nI have 3 cats\n", encoding="utf-8")
    utts = _synth(tmp_path, "tf", minutes=0.15, text_file=src, prefix="x-")
    assert utts and all(u.id.startswith("x-en-us-") for u in utts)
    expected = {"hello world", "the quick brown fox", "dash first line"}
    texts = [u.text for u in utts]
    assert set(texts) <= expected
    assert set(texts[:3]) == expected  # every line once before any repeats


def test_language_without_wordlist(tmp_path):
    assert wordfreq_lang("en-us") == "en" and wordfreq_lang("cmn") == "zh" and wordfreq_lang("pt-br") == "pt"
    with pytest.raises(ValueError, match="text_file"):
        synthesize(SynthConfig(lang="eo", minutes=0.1, out_dir=tmp_path / "eo"), progress=False)
    assert not (tmp_path / "eo" / "manifest.jsonl").exists()


def test_czech(tmp_path):
    utts = _synth(tmp_path, "cs", lang="cs", minutes=0.1, noise_snr_db=20.0, speakers=("f2", "klatt3"))
    assert sum(u.duration for u in utts) >= 6.0
    assert any(ch in u.text for u in utts for ch in "áčďéěíňóřšťúůýž")
    assert {u.speaker.split("-")[1] for u in utts} <= {"f2", "klatt3"}


def test_variants_and_specs():
    variants = list_variants()
    assert {"m1", "f2", "klatt", "whisper"} <= set(variants)
    specs = utterance_specs(SynthConfig(lang="cs", minutes=1, out_dir="unused", seed=7))
    first = [next(specs) for _ in range(50)]
    assert all(2 <= len(s.text.split()) <= 10 for s in first)
    assert len({s.speaker for s in first}) > 1


def test_errors(tmp_path):
    from speechtl.data.corpora.synth import Speaker, UttSpec, synth_utterances

    with pytest.raises(ValueError, match="variant"):
        synthesize(SynthConfig(lang="en-us", minutes=0.1, out_dir=tmp_path / "v", variants=("nosuchvoice",)), progress=False)
    with pytest.raises(ValueError, match="voice"):
        synthesize(SynthConfig(lang="xx-nolang", minutes=0.1, out_dir=tmp_path / "l"), progress=False)
    spec = UttSpec(0, "bad-000000", "hello", Speaker("m1", 150, 50))
    with pytest.raises(RuntimeError, match="bad-000000"):
        synth_utterances([spec], tmp_path / "e", lang="xx-nolang")


def test_cli_variant_selection(tmp_path):
    from speechtl.cli.app import main
    from speechtl.data.manifest import read_manifest

    assert main(["synth", "--lang", "en-us", "--minutes", "0.1", "--out", str(tmp_path / "a"), "--variants", "m3,f2,klatt",
                 "--exclude-variants", "klatt", "--workers", "2", "-q"]) == 0
    variants = {u.speaker.split("-")[2] for u in read_manifest(tmp_path / "a" / "manifest.jsonl")}
    assert variants and variants <= {"m3", "f2"}


def test_cli_rate_pitch_and_vocabulary_ranges(tmp_path):
    from speechtl.cli.app import main

    assert main(["synth", "--lang", "en-us", "--minutes", "0.1", "--out", str(tmp_path / "a"), "--rate", "150-160",
                 "--pitch", "20-21", "--vocab-size", "50", "--speakers", "3", "-q"]) == 0
    speakers = {u.speaker for u in read_manifest(tmp_path / "a" / "manifest.jsonl")}
    for s in speakers:
        rate, pitch = s.split("-")[-2:]
        assert 150 <= int(rate[1:]) <= 160 and pitch in ("p20", "p21")
    with pytest.raises(SystemExit):
        main(["synth", "--lang", "en-us", "--minutes", "0.1", "--out", str(tmp_path / "b"), "--rate", "200-100"])


def test_mbrola_voices_take_no_variant_and_read_their_language():
    import random

    from speechtl.data.corpora.synth import Speaker, is_mbrola, make_speakers

    assert is_mbrola("mb-de1") and not is_mbrola("de")
    speakers = make_speakers(SynthConfig(lang="mb-de1", minutes=1, out_dir="unused", n_speakers=4), random.Random(0))
    assert {s.variant for s in speakers} == {""} and len(set(speakers)) == 4
    assert Speaker("", 150, 40).name("mb-de1") == "mb-de1-r150-p40"
    assert wordfreq_lang("mb-de1") == "de" and wordfreq_lang("mb-br1") == "pt"  # listed by espeak-ng, installed or not
    with pytest.raises(ValueError, match="MBROLA voice 'mb-zz9'"):
        wordfreq_lang("mb-zz9")


@pytest.mark.skipif(shutil.which("mbrola") is None, reason="mbrola is not installed")
def test_mbrola_voice_missing_names_its_package(tmp_path):
    with pytest.raises(ValueError, match="apt-get install mbrola-zz9"):
        _synth(tmp_path, "m", lang="mb-zz9")
