"""speechtl.data.corpora.importers: each corpus format, bad audio, duration filter, dev split."""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import make_corrupt, make_wav, write_text
from speechtl.data.audio import AudioError
from speechtl.data.corpora.importers import PrepareError, PrepareOptions, PrepareResult, prepare, split_dev, write_prepared
from speechtl.data.manifest import ManifestError, Utterance, read_manifest


def by_id(utts):
    return {u.id: u for u in utts}


def normed(utts):
    """Audio paths with ``..`` collapsed: read_manifest returns ``<manifest dir>/../x.wav``
    for audio outside the manifest's folder (see test_audio_manifest's xfail)."""
    return [replace(u, audio=os.path.normpath(u.audio)) for u in utts]


# --------------------------------------------------------------------------- folder


def make_folder_corpus(root: Path) -> None:
    make_wav(root / "alice" / "a1.wav", 1.0)
    write_text(root / "alice" / "a1.txt", "  Hello, World!\n")
    make_wav(root / "alice" / "a2.flac", 1.5)
    write_text(root / "alice" / "a2.txt", "second\nline")
    make_wav(root / "bob" / "b1.wav", 0.5, sr=8000)
    write_text(root / "bob" / "b1.txt", "Bob's clip")
    make_wav(root / "top.wav", 0.25)
    write_text(root / "top.txt", "top level")
    write_text(root / "README.txt", "not a transcript")  # orphan .txt is ignored
    make_corrupt(root / "._hidden.wav")  # hidden files are ignored


def test_folder(tmp_path):
    root = tmp_path / "corpus"
    make_folder_corpus(root)
    res = prepare(root, PrepareOptions(format="folder", lang="en"))
    assert isinstance(res, PrepareResult)
    assert res.dev == [] and res.skipped == [] and res.dropped_duration == 0
    u = by_id(res.utterances)
    assert sorted(u) == ["alice-a1", "alice-a2", "bob-b1", "top"]
    assert u["alice-a1"].text == "Hello, World!"  # raw, whitespace stripped
    assert u["alice-a2"].text == "second line"
    assert u["bob-b1"].text == "Bob's clip"
    assert u["alice-a1"].speaker == "alice" and u["bob-b1"].speaker == "bob"
    assert u["top"].speaker is None
    assert all(x.lang == "en" for x in res.utterances)
    assert u["alice-a1"].duration == pytest.approx(1.0, abs=0.01)
    assert u["alice-a2"].duration == pytest.approx(1.5, abs=0.01)
    assert u["bob-b1"].duration == pytest.approx(0.5, abs=0.01)
    assert u["top"].duration == pytest.approx(0.25, abs=0.01)
    assert Path(u["alice-a2"].audio).is_absolute()
    assert Path(u["alice-a2"].audio) == (root / "alice" / "a2.flac").absolute()


@pytest.mark.parametrize("sr", [16000, 32000, 44100])
@pytest.mark.parametrize("channels", [1, 2])
def test_folder_durations_any_rate(tmp_path, sr, channels):
    root = tmp_path / "c"
    lengths = {"x": 0.73, "y": 2.31}
    for name, sec in lengths.items():
        make_wav(root / f"{name}.wav", sec, sr=sr, channels=channels)
        write_text(root / f"{name}.txt", name)
    res = prepare(root, PrepareOptions(format="folder"))
    for u in res.utterances:
        assert u.duration == pytest.approx(lengths[u.id], abs=0.01)


def test_folder_missing_transcript(tmp_path):
    root = tmp_path / "c"
    make_wav(root / "a.wav", 1.0)
    write_text(root / "a.txt", "a")
    lonely = make_wav(root / "b.wav", 1.0)
    with pytest.raises(ManifestError, match="b.wav.*no transcript"):
        prepare(root, PrepareOptions(format="folder"))
    res = prepare(root, PrepareOptions(format="folder", on_bad_audio="skip"))
    assert [u.id for u in res.utterances] == ["a"]
    assert [p for p, _ in res.skipped] == [str(lonely.absolute())]


def test_folder_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no audio files"):
        prepare(tmp_path / "empty", PrepareOptions(format="folder"))
    with pytest.raises(PrepareError, match="not found"):
        prepare(tmp_path / "nope", PrepareOptions(format="folder"))


def test_folder_duplicate_ids(tmp_path):
    root = tmp_path / "c"
    make_wav(root / "a.wav", 1.0)
    make_wav(root / "a.flac", 1.0)
    write_text(root / "a.txt", "a")
    with pytest.raises(ManifestError, match=r"duplicate id 'a'.*a\.flac.*a\.wav"):
        prepare(root, PrepareOptions(format="folder"))


def test_corrupt_file_error_and_skip(tmp_path, caplog):
    root = tmp_path / "c"
    make_folder_corpus(root)
    bad = make_corrupt(root / "bob" / "bad.wav")
    write_text(root / "bob" / "bad.txt", "corrupt")
    with pytest.raises(AudioError) as ei:
        prepare(root, PrepareOptions(format="folder"))
    assert str(bad.absolute()) in str(ei.value)

    with caplog.at_level(logging.WARNING, logger="speechtl.data.corpora.importers"):
        res = prepare(root, PrepareOptions(format="folder", on_bad_audio="skip"))
    assert "bob-bad" not in by_id(res.utterances)
    assert len(res.utterances) == 4
    assert [p for p, _ in res.skipped] == [str(bad.absolute())]
    assert res.skipped[0][1]  # a reason
    assert "skipped 1 file" in caplog.text

    out = tmp_path / "out" / "train.jsonl"
    written = write_prepared(res, out)
    report = tmp_path / "out" / "train.skipped.tsv"
    assert written == [out, report]
    lines = report.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path\treason"
    assert len(lines) == 2 and lines[1].startswith(str(bad.absolute()) + "\t")
    assert normed(read_manifest(out)) == res.utterances
    # JSONL skip report on request
    jreport = tmp_path / "out" / "skips.jsonl"
    write_prepared(res, out, skip_report=jreport)
    rec = [json.loads(x) for x in jreport.read_text(encoding="utf-8").splitlines()]
    assert rec == [{"path": str(bad.absolute()), "reason": res.skipped[0][1]}]
    assert not list((tmp_path / "out").glob(".*.tmp"))  # no temporaries left


def test_no_skip_report_without_skips(tmp_path):
    root = tmp_path / "c"
    make_folder_corpus(root)
    res = prepare(root, PrepareOptions(format="folder"))
    written = write_prepared(res, tmp_path / "m.jsonl")
    assert written == [tmp_path / "m.jsonl"]
    assert not (tmp_path / "m.skipped.tsv").exists()


# --------------------------------------------------------------------------- csv / tsv


def test_csv(tmp_path):
    d = tmp_path / "ds"
    make_wav(d / "wavs" / "one.wav", 1.0)
    make_wav(d / "wavs" / "two.wav", 2.0, sr=22050)
    outside = make_wav(tmp_path / "elsewhere" / "three.wav", 0.5)
    with open(d / "meta.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "transcript", "who"])
        w.writerow(["wavs/one.wav", "Hello, \"quoted\" world", "s1"])
        w.writerow(["wavs/two.wav", "  multi\nline  ", "s2"])
        w.writerow([str(outside.absolute()), "abs path", ""])
    opts = PrepareOptions(format="csv", audio_column="file", text_column="transcript", speaker_column="who")
    res = prepare(d / "meta.csv", opts)
    u = by_id(res.utterances)
    assert sorted(u) == ["three", "wavs-one", "wavs-two"]
    assert u["wavs-one"].text == 'Hello, "quoted" world'
    assert u["wavs-two"].text == "multi line"
    assert u["wavs-one"].speaker == "s1" and u["three"].speaker is None
    assert u["wavs-two"].duration == pytest.approx(2.0, abs=0.01)
    assert u["three"].audio == str(outside.absolute())
    assert u["wavs-one"].audio == str((d / "wavs" / "one.wav").absolute())


def test_csv_columns_by_index_and_id_column(tmp_path):
    make_wav(tmp_path / "a.wav", 1.0)
    write_text(tmp_path / "m.csv", "id,text,path\nutt-1,hi there,a.wav\n")
    res = prepare(tmp_path / "m.csv", PrepareOptions(format="csv", audio_column=2, text_column="text", id_column="id"))
    assert [(u.id, u.text) for u in res.utterances] == [("utt-1", "hi there")]


def test_csv_errors(tmp_path):
    make_wav(tmp_path / "a.wav", 1.0)
    write_text(tmp_path / "m.csv", "path,sentence\na.wav,hi\n")
    with pytest.raises(PrepareError, match=r"m\.csv: no text column 'text'; columns are: path, sentence"):
        prepare(tmp_path / "m.csv", PrepareOptions(format="csv"))
    write_text(tmp_path / "short.csv", "path,text\na.wav,hi\nb.wav\n")
    with pytest.raises(PrepareError, match=r"short\.csv:3: expected at least 2"):
        prepare(tmp_path / "short.csv", PrepareOptions(format="csv"))
    write_text(tmp_path / "dup.csv", "path,text\na.wav,hi\na.wav,again\n")
    with pytest.raises(ManifestError, match=r"duplicate id 'a': .*dup\.csv:2 and .*dup\.csv:3"):
        prepare(tmp_path / "dup.csv", PrepareOptions(format="csv"))
    write_text(tmp_path / "missing.csv", "path,text\na.wav,hi\nnothere.wav,x\n")
    with pytest.raises(AudioError, match="nothere.wav"):
        prepare(tmp_path / "missing.csv", PrepareOptions(format="csv"))
    res = prepare(tmp_path / "missing.csv", PrepareOptions(format="csv", on_bad_audio="skip"))
    assert [u.id for u in res.utterances] == ["a"]
    assert res.skipped == [(str((tmp_path / "nothere.wav").absolute()), "file not found")]


def test_tsv(tmp_path):
    make_wav(tmp_path / "clips" / "x.ogg", 1.2, subtype=None)
    make_wav(tmp_path / "clips" / "y.wav", 0.8, sr=48000, channels=2)
    # tsv is read without quoting: a stray quote in the text is kept as is
    write_text(tmp_path / "m.tsv", 'path\ttext\tspk\nclips/x.ogg\tShe said "hi\tA\nclips/y.wav\tcomma, here\tB\n')
    res = prepare(tmp_path / "m.tsv", PrepareOptions(format="tsv", speaker_column="spk"))
    u = by_id(res.utterances)
    assert sorted(u) == ["clips-x", "clips-y"]
    assert u["clips-x"].text == 'She said "hi'
    assert u["clips-y"].text == "comma, here"
    assert (u["clips-x"].speaker, u["clips-y"].speaker) == ("A", "B")
    assert u["clips-x"].duration == pytest.approx(1.2, abs=0.01)
    assert u["clips-y"].duration == pytest.approx(0.8, abs=0.01)


# --------------------------------------------------------------------------- librispeech


def make_librispeech(root: Path) -> dict:
    expect = {}
    for spk, chapter, n in (("103", "1240", 2), ("1034", "121119", 3)):
        folder = root / "train-clean-100" / spk / chapter
        lines = []
        for i in range(n):
            uid = f"{spk}-{chapter}-{i:04d}"
            sec = 0.5 + 0.25 * i
            make_wav(folder / f"{uid}.flac", sec, subtype="PCM_16")
            text = f"WORDS OF {spk} NUMBER {i}"
            lines.append(f"{uid} {text}")
            expect[uid] = (text, spk, sec)
        write_text(folder / f"{spk}-{chapter}.trans.txt", "\n".join(lines) + "\n")
    return expect


@pytest.mark.parametrize("level", ["parent", "split"])
def test_librispeech(tmp_path, level):
    root = tmp_path / "LibriSpeech"
    expect = make_librispeech(root)
    src = root if level == "parent" else root / "train-clean-100"
    res = prepare(src, PrepareOptions(format="librispeech"))
    got = {u.id: (u.text, u.speaker, u.duration) for u in res.utterances}
    assert sorted(got) == sorted(expect)
    for uid, (text, spk, sec) in expect.items():
        assert got[uid][:2] == (text, spk)
        assert got[uid][2] == pytest.approx(sec, abs=0.01)
        assert by_id(res.utterances)[uid].audio.endswith(f"{uid}.flac")


def test_librispeech_missing_flac_and_no_transcripts(tmp_path):
    root = tmp_path / "ls"
    make_librispeech(root)
    (root / "train-clean-100" / "103" / "1240" / "103-1240-0001.flac").unlink()
    with pytest.raises(AudioError, match="103-1240-0001.flac"):
        prepare(root, PrepareOptions(format="librispeech"))
    res = prepare(root, PrepareOptions(format="librispeech", on_bad_audio="skip"))
    assert len(res.utterances) == 4 and len(res.skipped) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="trans.txt"):
        prepare(tmp_path / "empty", PrepareOptions(format="librispeech"))


# --------------------------------------------------------------------------- common voice


def make_commonvoice(root: Path, tsv_name: str = "train.tsv") -> dict:
    rows = [("spk_a", "common_voice_xx_1.mp3", "Xin chào thế giới.", 1.0),
            ("spk_a", "common_voice_xx_2.mp3", "Đây là \"câu\" hai", 1.5),
            ("spk_b", "common_voice_xx_3.mp3", "ba", 0.6)]
    header = "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\taccents\tvariant\tlocale\tsegment\n"
    body = ""
    for spk, name, text, sec in rows:
        make_wav(root / "clips" / name, sec, sr=48000)
        body += f"{spk}\t{name}\tsid\t{text}\t\t2\t0\t\t\t\t\tvi\t\n"
    write_text(root / tsv_name, header + body)
    return {Path(name).stem: (text, spk, sec) for spk, name, text, sec in rows}


def test_commonvoice(tmp_path):
    root = tmp_path / "cv" / "vi"
    expect = make_commonvoice(root)
    for src in (root / "train.tsv", root):
        res = prepare(src, PrepareOptions(format="commonvoice", lang="vi"))
        got = {u.id: u for u in res.utterances}
        assert sorted(got) == sorted(expect)
        for uid, (text, spk, sec) in expect.items():
            assert got[uid].text == text
            assert got[uid].speaker == spk
            assert got[uid].lang == "vi"
            # mp3 durations from the header: within an mp3 frame of padding
            assert got[uid].duration == pytest.approx(sec, abs=0.05)
            assert got[uid].audio == str((root / "clips" / f"{uid}.mp3").absolute())


def test_commonvoice_folder_prefers_validated(tmp_path):
    root = tmp_path / "cv"
    make_commonvoice(root, "train.tsv")
    write_text(root / "validated.tsv", "client_id\tpath\tsentence\nspk_c\tcommon_voice_xx_3.mp3\tonly one\n")
    res = prepare(root, PrepareOptions(format="commonvoice"))
    assert [(u.id, u.text, u.speaker) for u in res.utterances] == [("common_voice_xx_3", "only one", "spk_c")]
    write_text(root / "bad.tsv", "client_id\tfile\tsentence\n")
    with pytest.raises(PrepareError, match=r"bad\.tsv: no audio column 'path'"):
        prepare(root / "bad.tsv", PrepareOptions(format="commonvoice"))


# --------------------------------------------------------------------------- jsonl


def test_jsonl_validation(tmp_path):
    make_wav(tmp_path / "w" / "a.wav", 1.0)
    make_wav(tmp_path / "w" / "b.wav", 2.0)
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"id": "a", "audio": "w/a.wav", "text": "Raw Text!", "duration": 1.0, "speaker": "s", "custom": 7},
        {"id": "b", "audio": "w/b.wav", "text": "b", "duration": 2.0, "lang": "de"},
    ]
    write_text(manifest, "".join(json.dumps(x) + "\n" for x in lines))
    original = read_manifest(manifest)
    res = prepare(manifest, PrepareOptions(format="jsonl"))
    assert res.utterances == original
    assert res.utterances[0].extra == {"custom": 7}

    # a missing and a corrupt file: error by default, skipped on request
    make_corrupt(tmp_path / "w" / "c.wav")
    lines += [{"id": "c", "audio": "w/c.wav", "text": "c", "duration": 1.0},
              {"id": "d", "audio": "w/gone.wav", "text": "d", "duration": 1.0}]
    write_text(manifest, "".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(AudioError, match="c.wav"):
        prepare(manifest, PrepareOptions(format="jsonl"))
    res = prepare(manifest, PrepareOptions(format="jsonl", on_bad_audio="skip"))
    assert [u.id for u in res.utterances] == ["a", "b"]
    assert [Path(p).name for p, _ in res.skipped] == ["c.wav", "gone.wav"]
    assert res.skipped[1][1] == "file not found"


# --------------------------------------------------------------------------- filters and splits


def make_many(root: Path, n_speakers: int = 5, per_speaker: int = 4) -> None:
    for s in range(n_speakers):
        for i in range(per_speaker):
            make_wav(root / f"s{s}" / f"u{i}.wav", 0.3 + 0.2 * i)
            write_text(root / f"s{s}" / f"u{i}.txt", f"speaker {s} utt {i}")


def test_duration_filter(tmp_path, caplog):
    root = tmp_path / "c"
    make_many(root, n_speakers=2)  # durations 0.3, 0.5, 0.7, 0.9 per speaker
    with caplog.at_level(logging.INFO, logger="speechtl.data.corpora.importers"):
        res = prepare(root, PrepareOptions(format="folder", min_duration=0.4, max_duration=0.8))
    assert sorted(u.id for u in res.utterances) == ["s0-u1", "s0-u2", "s1-u1", "s1-u2"]
    assert res.dropped_duration == 4
    assert "dropped 4 clip" in caplog.text
    res = prepare(root, PrepareOptions(format="folder", max_duration=0.6))
    assert res.dropped_duration == 4 and len(res.utterances) == 4


def test_options_validation():
    with pytest.raises(ValueError, match="format"):
        PrepareOptions(format="kaldi")
    with pytest.raises(ValueError, match="on_bad_audio"):
        PrepareOptions(on_bad_audio="ignore")
    with pytest.raises(ValueError, match="dev_fraction"):
        PrepareOptions(dev_fraction=1.0)
    with pytest.raises(ValueError, match="exceeds"):
        PrepareOptions(min_duration=2, max_duration=1)


def test_dev_split_by_fraction_deterministic(tmp_path):
    root = tmp_path / "c"
    make_many(root)
    opts = PrepareOptions(format="folder", dev_fraction=0.25, seed=3)
    a = prepare(root, opts)
    b = prepare(root, opts)
    assert len(a.dev) == 5 and len(a.utterances) == 15
    assert [u.id for u in a.dev] == [u.id for u in b.dev]
    assert {u.id for u in a.dev}.isdisjoint(u.id for u in a.utterances)
    others = {tuple(u.id for u in prepare(root, PrepareOptions(format="folder", dev_fraction=0.25, seed=s)).dev)
              for s in range(4, 10)}
    assert len(others | {tuple(u.id for u in a.dev)}) > 1  # the seed matters
    # write_prepared: default dev path beside the train manifest, both readable
    written = write_prepared(a, tmp_path / "out" / "train.jsonl")
    assert written == [tmp_path / "out" / "train.jsonl", tmp_path / "out" / "train.dev.jsonl"]
    assert normed(read_manifest(written[1])) == a.dev
    assert normed(read_manifest(written[0])) == a.utterances


def test_dev_split_by_speaker(tmp_path):
    root = tmp_path / "c"
    make_many(root)
    opts = PrepareOptions(format="folder", dev_fraction=0.3, dev_by_speaker=True, seed=1)
    res = prepare(root, opts)
    dev_spk = {u.speaker for u in res.dev}
    train_spk = {u.speaker for u in res.utterances}
    assert dev_spk and train_spk and dev_spk.isdisjoint(train_spk)
    assert len(res.dev) >= 0.3 * 20 and len(res.dev) == 4 * len(dev_spk)
    assert [u.id for u in prepare(root, opts).dev] == [u.id for u in res.dev]


def test_split_dev_edge_cases():
    def utt(i, spk=None):
        return Utterance(id=f"u{i}", audio=f"/x/{i}.wav", text="t", duration=1.0, speaker=spk)

    assert split_dev([utt(0)], 0.5) == ([utt(0)], [])
    train, dev = split_dev([utt(i) for i in range(10)], 0.01)
    assert len(dev) == 1 and len(train) == 9  # at least one
    # by speaker: one speaker only -> no dev; unknown speakers stay in train
    assert split_dev([utt(i, "a") for i in range(4)], 0.5, by_speaker=True)[1] == []
    utts = [utt(0, "a"), utt(1, "b"), utt(2), utt(3)]
    train, dev = split_dev(utts, 0.25, by_speaker=True)
    assert len(dev) == 1 and dev[0].speaker in ("a", "b")
    assert utt(2) in train and utt(3) in train


def test_absolute_paths_option(tmp_path):
    root = tmp_path / "c"
    make_folder_corpus(root)
    res = prepare(root, PrepareOptions(format="folder", absolute_paths=True))
    out = tmp_path / "m.jsonl"
    write_prepared(res, out)
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert Path(first["audio"]).is_absolute()
    res = prepare(root, PrepareOptions(format="folder"))
    write_prepared(res, out)
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert first["audio"] == "c/alice/a1.wav"


def test_max_minutes_takes_nested_prefixes(tmp_path, caplog):
    from speechtl.data.corpora.importers import take_minutes

    utts = [Utterance(f"u{i}", f"/x/{i}.wav", "a", 20.0) for i in range(12)]  # 4 min in all
    one, two = take_minutes(utts, 1.0), take_minutes(utts, 2.0)
    assert [u.id for u in one] == ["u0", "u1", "u2"] and sum(u.duration for u in one) >= 60
    assert two[: len(one)] == one and len(two) == 6
    with caplog.at_level(logging.WARNING):
        assert take_minutes(utts, 10.0) == utts
    assert "only 4.0 min" in caplog.text
    with pytest.raises(ValueError, match="max_minutes"):
        PrepareOptions(max_minutes=-1)
