"""speechtl.data.audio, speechtl.data.manifest, speechtl.data.text and speechtl.decoding.metrics."""

from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import make_corrupt, make_signal, make_wav, write_text
from speechtl.data.audio import SAMPLE_RATE, AudioError, AudioInfo, audio_info, load_audio
from speechtl.data.manifest import ManifestError, Utterance, read_manifest, total_duration, write_manifest
from speechtl.data.text import (
    PAD,
    UNK,
    WORD_DELIMITER,
    Normalizer,
    NormalizerConfig,
    Vocabulary,
    describe_oov,
    load_normalizer,
    save_normalizer,
)


def assert_16k_mono(wav: np.ndarray, expected_len: int, tol: int = 1) -> None:
    assert wav.dtype == np.float32
    assert wav.ndim == 1
    assert wav.flags["C_CONTIGUOUS"]
    assert abs(len(wav) - expected_len) <= tol, (len(wav), expected_len)
    assert np.all(np.isfinite(wav)) and np.abs(wav).max() <= 1.0


def peak_hz(wav: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    spec = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.argmax(spec) * sr / len(wav))


# --------------------------------------------------------------------------- audio


@pytest.mark.parametrize("subtype,tol", [("PCM_16", 1e-4), ("PCM_24", 1e-6), ("FLOAT", 1e-7)])
def test_load_wav_bit_depths(tmp_path, subtype, tol):
    p = make_wav(tmp_path / f"{subtype}.wav", 1.0, subtype=subtype)
    wav = load_audio(p)
    assert_16k_mono(wav, 16000, tol=0)
    np.testing.assert_allclose(wav, make_signal(1.0), atol=tol)


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_load_resamples_to_16k(tmp_path, sr):
    seconds = 1.3
    p = make_wav(tmp_path / f"{sr}.wav", seconds, sr=sr, noise=0.0)
    wav = load_audio(p)
    n_native = int(round(seconds * sr))
    assert_16k_mono(wav, round(n_native * SAMPLE_RATE / sr))
    assert peak_hz(wav) == pytest.approx(440, abs=2)  # the tone survives resampling


def test_load_other_target_rate(tmp_path):
    p = make_wav(tmp_path / "a.wav", 1.0, sr=16000)
    assert len(load_audio(p, sample_rate=8000)) == 8000


def test_stereo_mixdown(tmp_path):
    p = make_wav(tmp_path / "st.wav", 1.0, channels=2, subtype="FLOAT")
    wav = load_audio(p)
    assert_16k_mono(wav, 16000, tol=0)
    data = make_signal(1.0, channels=2)
    np.testing.assert_allclose(wav, data.mean(axis=1), atol=1e-6)


def test_window_offset_duration(tmp_path):
    p = make_wav(tmp_path / "long.wav", 2.0, sr=44100)
    wav = load_audio(p, offset=0.5, duration=0.25)
    assert_16k_mono(wav, 4000)
    full = load_audio(make_wav(tmp_path / "long16.wav", 2.0, subtype="FLOAT"))
    part = load_audio(tmp_path / "long16.wav", offset=0.5, duration=0.25)
    np.testing.assert_array_equal(part, full[8000:12000])


@pytest.mark.parametrize(
    "name,sr,channels,tol",
    [
        ("a.flac", 16000, 1, 0),
        ("b.flac", 44100, 2, 1),
        ("c.ogg", 16000, 1, 0),
        ("d.ogg", 48000, 2, 1),
        ("e.mp3", 16000, 1, 32),  # mp3: allow 2 ms in case a libsndfile build is not gapless
        ("f.mp3", 44100, 2, 32),
    ],
)
def test_load_compressed(tmp_path, name, sr, channels, tol):
    p = make_wav(tmp_path / name, 1.0, sr=sr, channels=channels, noise=0.0)
    wav = load_audio(p)
    assert_16k_mono(wav, 16000, tol=tol)
    # mono: the 440 Hz tone; stereo: the mixdown of 440 Hz and 880 Hz channels
    assert min(abs(peak_hz(wav) - f) for f in ((440,) if channels == 1 else (440, 880))) <= 2
    info = audio_info(p)
    assert info.sample_rate == sr
    assert info.duration == pytest.approx(1.0, abs=0.011)


@pytest.mark.parametrize(
    "name,sr,channels,seconds",
    [("a.wav", 16000, 1, 0.5), ("b.wav", 44100, 2, 3.21), ("c.flac", 32000, 1, 1.75), ("d.ogg", 22050, 1, 0.9)],
)
def test_audio_info(tmp_path, name, sr, channels, seconds):
    p = make_wav(tmp_path / name, seconds, sr=sr, channels=channels)
    info = audio_info(p)
    assert isinstance(info, AudioInfo)
    assert (info.sample_rate, info.channels) == (sr, channels)
    assert info.duration == pytest.approx(seconds, abs=1e-3)


def bad_files(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    return {
        "missing": tmp_path / "missing.wav",
        "empty": empty,
        "text": write_text(tmp_path / "notes.wav", "this is not audio, just some text\n" * 20),
        "corrupt": make_corrupt(tmp_path / "corrupt.wav"),
        "truncated_header": _truncated(tmp_path),
        "folder": _folder(tmp_path),
    }


def _truncated(tmp_path: Path) -> Path:
    good = make_wav(tmp_path / "good.wav", 0.5)
    p = tmp_path / "truncated.wav"
    p.write_bytes(good.read_bytes()[:20])  # cut inside the RIFF header
    return p


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "dir.wav"
    d.mkdir()
    return d


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "corrupt", "truncated_header", "folder"])
@pytest.mark.parametrize("fn", [load_audio, audio_info], ids=["load_audio", "audio_info"])
def test_audio_errors_name_the_file(tmp_path, kind, fn):
    path = bad_files(tmp_path)[kind]
    with pytest.raises(AudioError) as ei:
        fn(path)
    assert str(path) in str(ei.value)
    assert ei.value.path == str(path)
    assert ei.value.reason
    if kind == "missing":
        assert "not found" in str(ei.value)
    if kind == "empty":
        assert "empty" in str(ei.value)


# --------------------------------------------------------------------------- manifest


def make_utts(tmp_path: Path) -> list[Utterance]:
    a = make_wav(tmp_path / "data" / "wavs" / "a.wav", 1.0)
    b = make_wav(tmp_path / "data" / "wavs" / "sub" / "b.flac", 0.5)
    return [
        Utterance("a", str(a), "Hello World", 1.0, lang="en", speaker="s1", extra={"corpus": "x"}),
        Utterance("b", str(b), "Xin chào", 0.5),
    ]


def test_manifest_round_trip(tmp_path):
    utts = make_utts(tmp_path)
    path = tmp_path / "data" / "train.jsonl"
    assert write_manifest(path, utts) == path
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"id": "a", "audio": "wavs/a.wav", "text": "Hello World", "duration": 1.0,
                        "lang": "en", "speaker": "s1", "corpus": "x"}
    assert lines[1] == {"id": "b", "audio": "wavs/sub/b.flac", "text": "Xin chào", "duration": 0.5}
    assert "Xin chào" in path.read_text(encoding="utf-8")  # not \u-escaped
    back = read_manifest(path)
    assert back == utts
    assert all(Path(u.audio).is_absolute() and Path(u.audio).is_file() for u in back)
    assert back[0].extra == {"corpus": "x"}
    assert total_duration(back) == pytest.approx(1.5)
    # reading from another working directory gives the same absolute paths
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert read_manifest("data/train.jsonl") == utts
    finally:
        os.chdir(cwd)


def test_manifest_absolute(tmp_path):
    utts = make_utts(tmp_path)
    path = tmp_path / "m" / "abs.jsonl"
    write_manifest(path, utts, absolute=True)
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert [x["audio"] for x in lines] == [u.audio for u in utts]
    assert read_manifest(path) == utts


def test_manifest_round_trip_audio_outside_manifest_folder(tmp_path):
    utts = make_utts(tmp_path)
    path = tmp_path / "manifests" / "train.jsonl"
    write_manifest(path, utts)
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0])["audio"] == "../data/wavs/a.wav"
    assert read_manifest(path) == utts


def test_manifest_absolute_with_relative_input(tmp_path):
    make_utts(tmp_path)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        write_manifest(tmp_path / "m" / "abs.jsonl", [Utterance("a", "data/wavs/a.wav", "t", 1.0)], absolute=True)
    finally:
        os.chdir(cwd)
    line = json.loads((tmp_path / "m" / "abs.jsonl").read_text(encoding="utf-8"))
    assert Path(line["audio"]).is_absolute()


def test_write_manifest_duplicate_id(tmp_path):
    utts = make_utts(tmp_path)
    path = tmp_path / "dup.jsonl"
    with pytest.raises(ManifestError, match="duplicate id 'a'"):
        write_manifest(path, [utts[0], utts[1], utts[0]])
    assert not path.exists()  # atomic: nothing half-written
    assert not list(tmp_path.glob(".dup.jsonl.*"))


def _manifest(tmp_path: Path, lines: list[str]) -> Path:
    make_wav(tmp_path / "a.wav", 0.2)
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


GOOD = json.dumps({"id": "a", "audio": "a.wav", "text": "t", "duration": 0.2})


@pytest.mark.parametrize(
    "bad_line,message",
    [
        ('{"id": "b", "audio": "a.wav", "text": "t", "duration": 0.2', "not valid JSON"),
        (json.dumps({"id": "b", "audio": "a.wav", "duration": 0.2}), "missing field(s) text"),
        (json.dumps({"id": "a", "audio": "a.wav", "text": "t", "duration": 0.2}), "duplicate id 'a' (first on line 1)"),
        (json.dumps({"id": "b", "audio": "nope.wav", "text": "t", "duration": 0.2}), "audio file not found"),
        (json.dumps({"id": "b", "audio": "a.wav", "text": "t", "duration": -1}), "'duration'"),
        (json.dumps({"id": "b", "audio": "a.wav", "text": 3, "duration": 1}), "'text' must be a string"),
        ("[1, 2]", "expected a JSON object"),
    ],
    ids=["json", "missing-field", "duplicate", "missing-audio", "duration", "text-type", "not-object"],
)
def test_read_manifest_errors_name_the_line(tmp_path, bad_line, message):
    p = _manifest(tmp_path, [GOOD, "", bad_line])  # the blank line still counts: bad line is 3
    with pytest.raises(ManifestError) as ei:
        read_manifest(p)
    assert str(ei.value).startswith(f"{p}:3: ")
    assert message in str(ei.value)


def test_read_manifest_no_file_check_and_not_found(tmp_path):
    p = _manifest(tmp_path, [GOOD, json.dumps({"id": "b", "audio": "gone.wav", "text": "t", "duration": 1})])
    assert [u.id for u in read_manifest(p, check_files=False)] == ["a", "b"]
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nothing.jsonl")


# --------------------------------------------------------------------------- text


def test_normalizer_defaults():
    n = Normalizer()
    decomposed = "C\u030cesky\u0301"  # C + combining caron ... y + combining acute
    assert unicodedata.normalize("NFC", decomposed) != decomposed
    out = n(decomposed)
    assert out == "český" and len(out) == 5
    assert n("Hello, World!  How are   you?") == "hello world how are you"
    assert n("Don't stop — it's fine.") == "don't stop it's fine"
    assert n("Don\u2019t") == "don't"  # curly apostrophe mapped to '
    assert n("'quoted' words") == "quoted words"
    assert n("Tiếng Việt có dấu: Đường, ả, ỹ!") == "tiếng việt có dấu đường ả ỹ"
    assert n("tab\there\nnewline") == "tab here newline"


def test_normalizer_options_and_mappings(tmp_path):
    n = Normalizer(NormalizerConfig(mappings={"ß": "ss", "ü": "ue"}))
    assert n("Straße über") == "strasse ueber"
    keep = Normalizer(NormalizerConfig(lowercase=False, strip_punctuation=False))
    assert keep("Hi,  There!") == "Hi, There!"
    no_apos = Normalizer(NormalizerConfig(keep_apostrophes=False))
    assert no_apos("don't") == "don t"
    save_normalizer(tmp_path / "norm.json", n)
    n2 = load_normalizer(tmp_path / "norm.json")
    assert n2.to_dict() == n.to_dict() and n2("Straße") == "strasse"


def test_vocabulary_matches_wav2vec2_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    n = Normalizer()
    texts = [n(t) for t in ["Hello, World!", "Don't stop", "Tiếng Việt", "C\u030cesky"]]
    vocab = Vocabulary.build(texts)
    assert vocab.tokens[:3] == [PAD, UNK, WORD_DELIMITER]
    assert vocab.tokens[3:] == sorted(set("".join(texts).replace(" ", "")))
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert json.loads(path.read_text(encoding="utf-8"))[PAD] == 0
    assert Vocabulary.load(path).tokens == vocab.tokens

    tok = transformers.Wav2Vec2CTCTokenizer(
        str(path), unk_token=UNK, pad_token=PAD, word_delimiter_token=WORD_DELIMITER
    )
    assert tok.pad_token_id == vocab.pad_id and tok.unk_token_id == vocab.unk_id
    assert tok.word_delimiter_token_id == vocab.delimiter_id
    for sentence in ["hello world", "tiếng việt", "don't stop", "český world", "hello zebra"]:
        assert tok(sentence).input_ids == vocab.encode(sentence), sentence
    ids = vocab.encode("hello world")
    assert vocab.decode(ids) == "hello world"


def test_vocabulary_oov():
    vocab = Vocabulary.build(["abc", "cab ba"])
    assert len(vocab) == 6
    ids = vocab.encode("abz zq")
    assert ids == [3, 4, vocab.unk_id, vocab.delimiter_id, vocab.unk_id, vocab.unk_id]
    assert vocab.oov == Counter({"z": 2, "q": 1})
    vocab.encode("|")  # a literal delimiter is not a character of the vocabulary
    assert vocab.oov["|"] == 1
    report = describe_oov(vocab.oov)
    assert "4 out-of-vocabulary" in report and "'z'×2" in report and "'q'×1" in report
    assert describe_oov(Counter()) == "no out-of-vocabulary characters"
    assert vocab.oov_report(["abz", "xx"]) == Counter({"x": 2, "z": 1})
    assert "(+1 more)" in describe_oov(Counter("xyz"), limit=2)


def test_vocabulary_rejects_bad_layout(tmp_path):
    with pytest.raises(ValueError):
        Vocabulary(["a", "b"])
    with pytest.raises(ValueError):
        Vocabulary([PAD, UNK, WORD_DELIMITER, "a", "a"])
    (tmp_path / "v.json").write_text(json.dumps({PAD: 0, UNK: 1, WORD_DELIMITER: 2, "a": 4}), encoding="utf-8")
    with pytest.raises(ValueError, match="without gaps"):
        Vocabulary.load(tmp_path / "v.json")


# --------------------------------------------------------------------------- metrics


PAIRS = [
    ("the cat sat on the mat", "the hat sat on mat"),
    ("hello world", "hello world"),
    ("a b c d", "a x c d e"),
    ("xin chào thế giới", "xin chao thế giới"),
    ("one", ""),
]


def test_score_matches_jiwer():
    jiwer = pytest.importorskip("jiwer")
    from speechtl.decoding.metrics import UtteranceResult, cer, score, wer

    refs, hyps = zip(*PAIRS)
    results = [UtteranceResult(f"u{i}", r, h, duration=1.5) for i, (r, h) in enumerate(PAIRS)]
    report = score(results)
    assert report.wer == pytest.approx(jiwer.wer(list(refs), list(hyps)))
    assert report.cer == pytest.approx(jiwer.cer(list(refs), list(hyps)))
    assert wer(refs, hyps) == pytest.approx(report.wer)
    assert cer(refs, hyps) == pytest.approx(report.cer)
    for (r, h), w, c in zip(PAIRS, report.word_counts, report.char_counts):
        assert w.rate == pytest.approx(jiwer.wer(r, h))
        assert c.rate == pytest.approx(jiwer.cer(r, h))


def test_score_normalizes_and_handles_empty_reference():
    from speechtl.decoding.metrics import UtteranceResult, score

    report = score([UtteranceResult("a", "Hello, World!", "hello world")], normalize=Normalizer())
    assert report.wer == 0.0 and report.cer == 0.0
    report = score([UtteranceResult("a", "", "")])
    assert report.wer == 0.0
    report = score([UtteranceResult("a", "", "extra word"), UtteranceResult("b", "one two", "one two")])
    assert report.word_counts[0].insertions == 2
    assert report.wer == pytest.approx(2 / 2)


def test_write_results(tmp_path):
    from speechtl.decoding.metrics import UtteranceResult, score, write_results

    results = [UtteranceResult(f"u{i}", r, h, duration=1.25) for i, (r, h) in enumerate(PAIRS)]
    report = score(results)
    out = tmp_path / "eval"
    summary = write_results(report, out, extra_summary={"model": "m"})
    hyps = [json.loads(x) for x in (out / "hyps.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [h["id"] for h in hyps] == [f"u{i}" for i in range(len(PAIRS))]
    assert hyps[0]["ref"] == PAIRS[0][0] and hyps[0]["hyp"] == PAIRS[0][1]
    assert set(hyps[0]) >= {"id", "ref", "hyp", "wer", "cer"}
    errs = (out / "errs.txt").read_text(encoding="utf-8")
    assert "(cat->hat)" in errs
    assert "(the->*)" in errs  # deletion
    assert "(*->e)" in errs  # insertion
    assert "(one->*)" in errs
    assert "u1:" not in errs  # a perfect utterance has no error line
    assert errs.startswith("%WER ")
    disk = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert disk == summary
    assert {"wer", "cer", "utterances", "audio_seconds"} <= set(disk)
    assert disk["utterances"] == len(PAIRS)
    assert disk["audio_seconds"] == pytest.approx(1.25 * len(PAIRS))
    assert disk["wer"] == pytest.approx(report.wer) and disk["model"] == "m"
