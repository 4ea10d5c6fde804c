"""Transcription: chunked long audio, timestamps, alignment, output formats, failures,
n-gram LMs and beam search."""

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from conftest import make_corrupt
from speechtl.cli.app import main
from speechtl.data.audio import load_audio
from speechtl.data.text import Vocabulary
from speechtl.decoding.decoders import BeamDecoder, GreedyDecoder, Word, align_words, token_runs
from speechtl.decoding.lm import ArpaModel, build_arpa, kenlm_available
from speechtl.inference.transcribe import Item, Transcriber, Transcript, render, segments_from_words

VOCAB = Vocabulary(["<pad>", "[UNK]", "|", "a", "b", "c", "k", "t", "s"])


class LocalModel(nn.Module):
    """A stand-in recogniser whose every frame depends only on its own 400 samples
    (25 ms window, 20 ms hop), so chunked decoding must reproduce whole-file decoding."""

    def __init__(self, vocab_size: int = len(VOCAB)):
        super().__init__()
        self.encoder = SimpleNamespace(config=SimpleNamespace(conv_stride=[5, 2, 2, 2, 2, 2, 2]), frame_rate=50.0)
        self.vocab_size = vocab_size

    def frame_lengths(self, samples: int) -> int:
        return max((samples - 400) // 320 + 1, 0)

    def forward(self, values, lengths):
        frames = torch.clamp((lengths - 400) // 320 + 1, min=0)
        t = int(frames.max())
        idx = torch.arange(t)[:, None] * 320 + torch.arange(400)[None]  # (T, 400)
        windows = values[:, idx.clamp(max=values.shape[1] - 1)]  # (B, T, 400)
        energy = windows.abs().mean(-1)
        centres = torch.linspace(0, 0.5, self.vocab_size)
        logits = -((energy[..., None] - centres) ** 2) * 400
        return logits, frames


def piecewise_signal(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    levels = np.repeat(rng.uniform(0, 0.5, size=n // 1600 + 1), 1600)[:n]
    return (levels * np.sign(rng.standard_normal(n))).astype(np.float32)


# strides under one frame (0.01 s) and none at all must not lose a frame per window
@pytest.mark.parametrize("chunk,stride", [(4.0, 1.0), (3.0, 0.5), (10.0, None), (4.0, 0.0), (4.0, 0.01)])
def test_chunked_log_probs_equal_whole_file(tmp_path, chunk, stride):
    wav = piecewise_signal(23.37)
    path = tmp_path / "long.wav"
    sf.write(path, wav, 16000, subtype="FLOAT")
    model = LocalModel()
    whole = Transcriber(model, VOCAB, torch.device("cpu"), chunk_length_s=60.0).file_log_probs(Item("x", str(path)))
    chunked = Transcriber(model, VOCAB, torch.device("cpu"), chunk_length_s=chunk, stride_length_s=stride,
                          max_batch_seconds=2 * chunk).file_log_probs(Item("x", str(path)))
    assert whole.shape[0] == (len(wav) - 400) // 320 + 1
    assert chunked.shape == whole.shape
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


def test_chunked_transcripts_match_and_keep_input_order(tmp_path):
    model = LocalModel()
    arrays = [piecewise_signal(s, seed=i) for i, s in enumerate([12.0, 1.5, 7.3, 0.9])]
    items = [Item(f"a{i}", f"<a{i}>", a) for i, a in enumerate(arrays)]
    whole = Transcriber(model, VOCAB, torch.device("cpu"), chunk_length_s=60.0)
    chunked = Transcriber(model, VOCAB, torch.device("cpu"), chunk_length_s=4.0, max_batch_seconds=8.0)
    a = dict(whole.run_indexed(items))
    b = dict(chunked.run_indexed(items))
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for i in range(4):
        assert a[i].text == b[i].text and a[i].text
        assert [w.start for w in a[i].words] == [w.start for w in b[i].words]
        assert a[i].duration == pytest.approx(len(arrays[i]) / 16000, abs=1e-3)


def test_short_files_run_side_by_side_with_the_same_transcripts_in_order(tmp_path):
    import threading

    seen = set()

    class Spy(LocalModel):
        def forward(self, values, lengths):
            seen.add(threading.get_ident())
            return super().forward(values, lengths)

    arrays = [piecewise_signal(1.0 + 0.37 * (i % 5), seed=i) for i in range(12)]
    items = [Item(f"a{i}", f"<a{i}>", a) for i, a in enumerate(arrays)]
    items.insert(5, Item("missing", str(tmp_path / "missing.wav")))  # fails in the middle of a batch
    threads = torch.get_num_threads()
    runs = {}
    for streams in (1, 3):
        seen.clear()
        tr = Transcriber(Spy(), VOCAB, torch.device("cpu"), max_batch_seconds=4.0, streams=streams)
        runs[streams] = list(tr.run_indexed(items))
        assert len(seen) == min(streams, 3) and torch.get_num_threads() == threads
    assert [i for i, _ in runs[1]] == [i for i, _ in runs[3]]  # the same order
    assert sorted(i for i, _ in runs[3]) == list(range(13))
    one, three = dict(runs[1]), dict(runs[3])
    assert three[5].error and "missing.wav" in three[5].path and one[5].error == three[5].error
    assert all(one[i].text == three[i].text and three[i].text for i in range(13) if i != 5)
    with pytest.raises(ValueError, match="streams"):
        Transcriber(Spy(), VOCAB, torch.device("cpu"), streams=0)


def one_hot_log_probs(path_ids: list[int], v: int = len(VOCAB), p: float = 0.9) -> np.ndarray:
    lp = np.full((len(path_ids), v), math.log((1 - p) / (v - 1)), dtype=np.float32)
    lp[np.arange(len(path_ids)), path_ids] = math.log(p)
    return lp


def test_word_times_from_frame_runs():
    i = VOCAB.index
    #        0  1       2       3  4       5       6       7  8  9       10
    path = [0, i["c"], i["a"], 0, i["t"], i["|"], i["s"], i["s"], 0, i["a"], 0]
    lp = one_hot_log_probs(path)
    words = GreedyDecoder(VOCAB)(lp, 0.02)
    assert [w.word for w in words] == ["cat", "sa"]
    assert (words[0].start, words[0].end) == (0.02, 0.1)
    assert (words[1].start, words[1].end) == (0.12, 0.2)
    assert all(w.confidence == pytest.approx(0.9, abs=1e-4) for w in words)
    assert token_runs(np.array([0, 3, 3, 0, 3])) == [(3, 1, 2), (3, 4, 4)]


def test_segments_split_at_pauses_and_length():
    words = [Word("a", 0.0, 0.5, 1.0), Word("b", 0.6, 1.0, 1.0), Word("c", 3.0, 3.5, 0.5), Word("d", 3.6, 14.0, 0.5)]
    segs = segments_from_words(words, max_gap_s=1.0, max_segment_s=10.0)
    assert [s.text for s in segs] == ["a b", "c", "d"]
    assert (segs[0].start, segs[0].end) == (0.0, 1.0)


def _transcript() -> Transcript:
    w = [Word("hello", 0.1, 0.6, 0.9), Word("world", 0.7, 1.2, 0.8), Word("again", 3661.5, 3662.25, 0.7)]
    return Transcript("x.wav", "hello world again", 3663.0, segments_from_words(w))


def test_srt_and_vtt_pass_their_parsers():
    import srt
    import webvtt

    t = _transcript()
    subs = list(srt.parse(render(t, "srt")))
    assert [s.content for s in subs] == ["hello world", "again"]
    assert subs[1].start.total_seconds() == pytest.approx(3661.5)
    assert subs[1].end.total_seconds() == pytest.approx(3662.25)
    cues = webvtt.from_string(render(t, "vtt"), strict=True)
    assert [c.text for c in cues] == ["hello world", "again"]
    assert cues[1].start == "01:01:01.500"
    data = json.loads(render(t, "json"))
    assert data["segments"][0]["words"][1] == {"word": "world", "start": 0.7, "end": 1.2, "confidence": 0.8}


def test_forced_alignment_recovers_word_times():
    i = VOCAB.index
    path = [0, 0, i["c"], i["c"], i["a"], 0, i["t"], 0, i["|"], 0, i["a"], 0, i["a"], i["t"], 0, 0]
    lp = one_hot_log_probs(path, p=0.6)
    words = align_words(lp, "cat aat", VOCAB, 0.02)
    assert [w.word for w in words] == ["cat", "aat"]
    assert (words[0].start, words[0].end) == (0.04, 0.14)
    assert (words[1].start, words[1].end) == (0.2, 0.28)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        align_words(lp, "cat dog", VOCAB, 0.02, where="clip.wav")
    with pytest.raises(ValueError, match="clip.wav: 16 frames .* too few"):
        align_words(lp, "cat " * 6, VOCAB, 0.02, where="clip.wav")
    with pytest.raises(ValueError, match="empty"):
        align_words(lp, "  ", VOCAB, 0.02)


# ------------------------------------------------------------------------ LM

def _corpus(n=300, seed=0):
    rnd = random.Random(seed)
    words = "the cat sat on a mat dog ran to big small red".split()
    return [" ".join(rnd.choice(words) for _ in range(rnd.randint(2, 8))) for _ in range(n)]


@pytest.mark.parametrize("order", [2, 3, 4])
def test_arpa_distributions_sum_to_one(tmp_path, order):
    path = tmp_path / "lm.arpa"
    path.write_text(build_arpa(_corpus(), order))
    m = ArpaModel(path)
    assert m.order == order
    predicted = sorted(m.vocab - {"<s>"})
    for ctx in [(), ("<s>",), ("the",), ("<s>", "the"), ("the", "cat", "sat"), ("unseen", "on"), ("red", "red", "red")]:
        assert sum(10 ** m.score(ctx, w) for w in predicted) == pytest.approx(1.0, abs=1e-4)
    assert m.score(("the",), "cat") > m.score(("the",), "zebra")


@pytest.mark.skipif(not kenlm_available(), reason="kenlm is not installed (pip install 'speechtl[lm]')")
def test_arpa_scores_match_kenlm(tmp_path):
    import kenlm

    for order in (2, 3, 4):
        path = tmp_path / f"lm{order}.arpa"
        path.write_text(build_arpa(_corpus(), order))
        ours, theirs = ArpaModel(path), kenlm.Model(str(path))
        for sentence in _corpus(20, seed=1) + ["unseen cat words the"]:
            state = kenlm.State()
            theirs.BeginSentenceWrite(state)
            ctx = ("<s>",)
            for w in sentence.split() + ["</s>"]:
                out = kenlm.State()
                assert ours.score(ctx, w) == pytest.approx(theirs.BaseScore(state, w, out), abs=1e-4)
                state, ctx = out, ours.next_state(ctx, w)


def test_lm_build_cli(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The cat, sat!\nthe DOG ran\n\n")
    assert main(["lm", "build", str(text), "--order", "3", "--out", str(tmp_path / "lm.arpa")]) == 0
    m = ArpaModel(tmp_path / "lm.arpa")
    assert {"the", "cat", "sat", "dog", "ran"} <= m.vocab  # normalised: lower case, no punctuation
    with pytest.raises(ValueError, match="at least 2"):
        build_arpa(["a b"], 1)


def test_word_list_joins_the_unigrams_only(tmp_path):
    plain, listed = tmp_path / "plain.arpa", tmp_path / "listed.arpa"
    plain.write_text(build_arpa(_corpus(), 3))
    listed.write_text(build_arpa(_corpus(), 3, extra_words=["zebra", "cat", "okapi"]))
    a, b = ArpaModel(plain), ArpaModel(listed)
    assert b.vocab - a.vocab == {"zebra", "okapi"}
    assert b.score((), "zebra") > b.score((), "neverseen") and b.score(("the",), "okapi") > a.score(("the",), "okapi")
    # no n-grams invented around the listed words
    assert {g for g in b.table if len(g) > 1} == {g for g in a.table if len(g) > 1}
    predicted = sorted(b.vocab - {"<s>"})
    for ctx in [(), ("the",), ("<s>", "the")]:
        assert sum(10 ** b.score(ctx, w) for w in predicted) == pytest.approx(1.0, abs=1e-4)


def test_lm_build_cli_word_list(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("ahoj světe\n")
    assert main(["lm", "build", str(text), "--wordlist", "cs", "--wordlist-size", "500", "--out", str(tmp_path / "lm.arpa")]) == 0
    m = ArpaModel(tmp_path / "lm.arpa")
    assert {"ahoj", "světe", "je", "na"} <= m.vocab and len(m.vocab) > 400
    assert "listed words" in capsys.readouterr().out


def _ambiguous(word_a: str, word_b: str, p_a: float = 0.55) -> np.ndarray:
    """Frames spelling word_a with probability p_a and word_b otherwise, letter by letter."""
    rows = []
    for ca, cb in zip(word_a, word_b):
        row = np.full(len(VOCAB), 1e-4)
        row[VOCAB.index[ca]] += p_a
        row[VOCAB.index[cb]] += 1 - p_a if cb != ca else 0
        rows += [row / row.sum(), np.eye(len(VOCAB))[0] * 0.999 + 1e-4]
    return np.log(np.array(rows, dtype=np.float64)).astype(np.float32)


def test_beam_search_with_lm_prefers_known_words(tmp_path):
    pytest.importorskip("pyctcdecode")
    sep = np.log(np.eye(len(VOCAB))[VOCAB.delimiter_id] * 0.999 + 1e-4)[None].astype(np.float32)
    lp = np.concatenate([_ambiguous("kat", "cat"), sep, _ambiguous("sat", "sat")])
    assert [w.word for w in GreedyDecoder(VOCAB)(lp, 0.02)] == ["kat", "sat"]
    path = tmp_path / "lm.arpa"
    path.write_text(build_arpa(["the cat sat", "a cat sat on a mat", "cat"] * 5, 3))
    words = BeamDecoder(VOCAB, lm=path, alpha=0.5, beta=1.0, beam_width=16)(lp, 0.02)
    assert [w.word for w in words] == ["cat", "sat"]
    assert words[0].start == 0.0 and words[1].start > words[0].end
    hot = BeamDecoder(VOCAB, beam_width=16, hotwords=["cat"])(lp, 0.02)
    assert [w.word for w in hot] == ["cat", "sat"]
    plain = BeamDecoder(VOCAB, beam_width=16)(lp, 0.02)
    assert [w.word for w in plain] == ["kat", "sat"]


# ------------------------------------------------------------------------ CLI and API on a trained model

@pytest.fixture(scope="module")
def model_dir(trained_model):
    return trained_model


@pytest.fixture(scope="module")
def speech_clips(speech_corpus):
    from speechtl.data.manifest import read_manifest

    return read_manifest(speech_corpus)


def test_folder_with_a_corrupt_file(tmp_path, model_dir, speech_clips, capsys):
    import shutil

    audio = tmp_path / "in"
    (audio / "sub").mkdir(parents=True)
    shutil.copy(speech_clips[0].audio, audio / "a.wav")
    shutil.copy(speech_clips[1].audio, audio / "sub" / "a.wav")  # same name in a subfolder: outputs must not collide
    joined = np.concatenate([load_audio(u.audio) for u in speech_clips])
    joined = np.tile(joined, int(np.ceil(35 * 16000 / len(joined))))[: 35 * 16000]
    sf.write(audio / "sub" / "c.flac", joined, 16000)  # long: chunked
    make_corrupt(audio / "sub" / "bad.wav")
    out = tmp_path / "out"
    rc = main(["transcribe", str(model_dir), str(audio), "--format", "json", "--out", str(out), "--chunk-length-s", "10", "-q"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "bad.wav" in err and "transcribed 3 of 4 file(s); 1 failed" in err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json"))
    assert written == ["a.json", "sub/a.json", "sub/c.json"]
    long = json.loads((out / "sub" / "c.json").read_text())
    assert long["duration"] == pytest.approx(35.0, abs=0.01)
    words = [w for s in long["segments"] for w in s["words"]]
    assert len(words) >= 20  # 35 s of speech
    assert all(0 <= w["start"] < w["end"] <= 35.0 for w in words)
    bad = [(a, b) for a, b in zip(words, words[1:]) if a["end"] > b["start"] + 1e-6]
    assert not bad, bad  # in order, across the windows
    assert not (out / "sub" / "bad.json").exists()


def test_srt_cli_and_python_api(tmp_path, model_dir, speech_clips, capsys):
    import srt

    import speechtl

    clip = speech_clips[2].audio
    assert main(["transcribe", str(model_dir), str(clip), "--format", "srt", "-q"]) == 0
    cues = list(srt.parse(capsys.readouterr().out))
    assert cues and all(c.content.strip() for c in cues)
    rec = speechtl.load(model_dir)
    t = rec.transcribe(clip, return_timestamps=True)
    assert isinstance(t, Transcript) and t.text == rec.transcribe(str(clip))
    assert t.words and t.text == " ".join(w.word for w in t.words)
    # word times lie inside the clip, in order, without overlap (20 ms frames)
    assert all(0 <= w.start < w.end <= t.duration + 0.02 for w in t.words)
    assert all(a.end <= b.start for a, b in zip(t.words, t.words[1:]))
    assert " ".join(c.content.replace("\n", " ") for c in cues) == t.text
    assert [round(c.start.total_seconds(), 3) for c in cues] == [s.start for s in t.segments]
    silence = np.zeros(8000, np.float32)
    both = rec.transcribe([clip, silence], chunk_length_s=1.0)
    assert both == [rec.transcribe(clip, chunk_length_s=1.0), rec.transcribe(silence)] and both[0]
    with pytest.raises(speechtl.AudioError, match="missing.wav: file not found"):
        rec.transcribe(tmp_path / "missing.wav")


def test_align_cli(tmp_path, model_dir, speech_clips, capsys):
    from speechtl.data.text import Normalizer

    u = speech_clips[3]
    text = Normalizer()(u.text)
    assert main(["align", str(model_dir), u.audio, text, "--out", str(tmp_path / "w.json"), "-q"]) == 0
    data = json.loads((tmp_path / "w.json").read_text())
    words = [w for s in data["segments"] for w in s["words"]]
    assert [w["word"] for w in words] == text.split()
    assert 0 <= words[0]["start"] and all(a["start"] < a["end"] <= b["start"] for a, b in zip(words, words[1:]))
    assert words[-1]["end"] <= u.duration + 0.02
    assert main(["align", str(model_dir), u.audio, "zz qq 名"]) == 1
    assert "outside the model's vocabulary" in capsys.readouterr().err


def test_unknown_character_is_one_rendering_everywhere_and_one_character_error():
    from speechtl.data.text import UNK_TEXT, Normalizer
    from speechtl.decoding.metrics import UtteranceResult, score

    ids = [VOCAB.index["c"], VOCAB.unk_id, VOCAB.index["t"], VOCAB.delimiter_id, VOCAB.index["s"]]
    assert VOCAB.decode(ids) == f"c{UNK_TEXT}t s"
    rows = []  # frames spelling c [UNK] t | s, each letter once, blanks between
    for i in ids:
        rows += [np.eye(len(VOCAB))[i], np.eye(len(VOCAB))[0]]
    lp = np.log(np.array(rows) * 0.999 + 1e-4).astype(np.float32)
    greedy = " ".join(w.word for w in GreedyDecoder(VOCAB)(lp, 0.02))
    assert greedy == f"c{UNK_TEXT}t s"
    pytest.importorskip("pyctcdecode")
    beam = " ".join(w.word for w in BeamDecoder(VOCAB, beam_width=8)(lp, 0.02))
    assert beam == greedy
    norm = Normalizer()
    assert norm(greedy) == greedy  # kept as a letter: no extra word
    report = score([UtteranceResult("u", "cat s", greedy, 1.0)], normalize=norm)
    assert report.word_counts[0].substitutions == 1 and report.word_counts[0].insertions == 0
    assert report.char_counts[0].substitutions == 1 and report.char_counts[0].insertions == 0


def test_align_refuses_a_recording_too_long_for_one_alignment(tmp_path):
    import resource

    frames = 30 * 60 * 50  # a 30-minute recording at 20 ms per frame
    lp = np.log(np.full((frames, len(VOCAB)), 1.0 / len(VOCAB), dtype=np.float32))
    text = " ".join(["cat sat"] * 3500)  # about 25,000 characters, as 30 minutes of speech has
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"30\.0 min of audio .* align it in pieces of at most about"):
        align_words(lp, text, VOCAB, 0.02, where="talk.wav")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing like the 2.5 GB trellis
    words = align_words(lp[:3000], "cat sat", VOCAB, 0.02)  # a short piece still aligns
    assert [w.word for w in words] == ["cat", "sat"]


@pytest.mark.parametrize("command", [["transcribe", "model", "a.wav"], ["extract", "--manifest", "m.jsonl", "--out", "o"]])
def test_streams_below_one_is_refused_before_any_work(command, capsys):
    from speechtl.cli.app import main

    with pytest.raises(SystemExit):
        main([*command, "--streams", "0"])
    assert "--streams: must be at least 1 (got 0)" in capsys.readouterr().err
