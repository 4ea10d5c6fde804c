"""Long recordings cut at pauses by voice activity detection (Silero VAD)."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from test_transcribe import VOCAB, LocalModel

from speechtl.cli.app import main
from speechtl.data.audio import load_audio
from speechtl.inference.transcribe import Item, Transcriber, segments_from_words
from speechtl.inference.vad import Piece, VadOptions, join_spans

pytest.importorskip("silero_vad")
SR = 16000


def test_spans_join_across_short_gaps_up_to_the_limit():
    spans = [(0, 16000), (20000, 30000), (60000, 70000), (72000, 200000), (201000, 210000)]
    pieces = join_spans(spans, max_piece=145000, join_gap=8000)
    # a 0.25 s gap joins; a 1.9 s gap does not; a join that would pass 9.06 s does not
    assert [(p.start, p.end) for p in pieces] == [(0, 30000), (60000, 200000), (201000, 210000)]
    assert pieces[1].spans == ((60000, 70000), (72000, 200000))


def test_segments_break_at_pauses_found_by_the_vad():
    from speechtl.decoding.decoders import Word

    words = [Word("a", 0.0, 0.3, 0.9), Word("b", 0.4, 0.6, 0.9), Word("c", 0.8, 1.0, 0.9), Word("d", 1.1, 1.3, 0.9)]
    assert [s.text for s in segments_from_words(words)] == ["a b c d"]
    assert [s.text for s in segments_from_words(words, breaks=[0.7])] == ["a b", "c d"]
    assert [s.text for s in segments_from_words(words, breaks=[0.35, 1.05])] == ["a", "b c", "d"]


@pytest.fixture(scope="module")
def talk(tmp_path_factory, speech_corpus):
    """Speech clips with 0.6 s pauses, then 8 s of silence, then more clips: (path, silence start, end)."""
    from speechtl.data.manifest import read_manifest

    clips = [load_audio(u.audio) for u in read_manifest(speech_corpus)][:12]
    pause = np.zeros(int(0.6 * SR), np.float32)
    first = np.concatenate([x for c in clips[:6] for x in (c, pause)])
    second = np.concatenate([x for c in clips[6:] for x in (c, pause)])
    silence = np.zeros(8 * SR, np.float32)
    path = tmp_path_factory.mktemp("vad") / "talk.wav"
    sf.write(path, np.concatenate([first, silence, second]), SR, subtype="FLOAT")
    return path, len(first) / SR, (len(first) + len(silence)) / SR


def test_vad_skips_the_silence_and_keeps_the_frames_of_speech(talk):
    path, quiet_from, quiet_to = talk
    read = []

    class Spy(LocalModel):
        def forward(self, values, lengths):
            read.extend(int(n) for n in lengths)
            return super().forward(values, lengths)

    model = Spy()
    whole = Transcriber(model, VOCAB, torch.device("cpu"), chunk_length_s=600.0).file_log_probs(Item("t", str(path)))
    read.clear()
    tr = Transcriber(model, VOCAB, torch.device("cpu"), chunk_length_s=6.0, max_batch_seconds=12.0, vad=VadOptions())
    lp, breaks = tr.long_log_probs(Item("t", str(path)))
    duration = sf.info(path).frames / SR
    assert lp.shape == whole.shape
    assert max(read) <= 6 * SR and sum(read) < (duration - 6.0) * SR  # no piece over the chunk; most of the silence never run
    filled = (lp == -30.0).sum(1) == lp.shape[1] - 1  # frames set, not run: blank, or a delimiter ending a word
    speech = ~filled
    assert (lp[filled].argmax(1) == VOCAB.delimiter_id).sum() == len(set(np.flatnonzero(filled) + 1) & set(np.flatnonzero(speech)))
    t = np.arange(len(lp)) * 0.02
    assert not speech[(t > quiet_from + 0.5) & (t < quiet_to - 0.5)].any()
    np.testing.assert_allclose(lp[speech], whole[speech], atol=1e-5)  # in place, frame for frame
    assert speech.mean() > 0.4
    assert any(quiet_from < b < quiet_to for b in breaks) and len(breaks) >= 8  # the pauses between the clips


def test_pieces_fit_the_chunk_with_their_context(talk):
    from speechtl.inference import vad

    path, _, _ = talk
    wav = load_audio(path)
    opts = VadOptions(min_silence_s=5.0)  # few pauses long enough: the length limit must cut
    pieces = vad.find_pieces(lambda a, n: wav[a:a + n], len(wav), opts, 4.0)
    assert all(isinstance(p, Piece) and p.end - p.start <= 4.0 * SR for p in pieces)
    assert len(pieces) >= 4


def test_bad_vad_flags_are_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        main(["transcribe", "model", "a.wav", "--vad-threshold", "1.5"])
    assert "--vad-threshold: must lie between 0 and 1 (got 1.5)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "model", "m.jsonl", "--min-silence-s", "-1"])
    assert "--min-silence-s: must not be negative (got -1)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="threshold must lie between 0 and 1"):
        VadOptions(threshold=0.0)


def test_vad_keeps_torch_threads():
    from speechtl.inference.vad import _detector

    before = torch.get_num_threads()
    _detector.cache_clear()
    _detector()
    assert torch.get_num_threads() == before


def test_cli_segments_follow_pauses_and_vad_off_keeps_windows(tmp_path, talk, capsys, trained_model):
    path, quiet_from, quiet_to = talk
    for vad in ("on", "off"):
        assert main(["transcribe", str(trained_model), str(path), "--format", "json", "--chunk-length-s", "6",
                     "--vad", vad, "-q"]) == 0
        out = json.loads(capsys.readouterr().out)
        words = [w for s in out["segments"] for w in s["words"]]
        assert len(words) >= 12
        if vad == "on":
            assert not any(s["start"] < quiet_from + 0.3 and s["end"] > quiet_to - 0.3 for s in out["segments"])
            assert len(out["segments"]) >= 10  # a cue per clip: each pause of 0.6 s ends one
            text = " ".join(w["word"] for w in words)
    assert main(["align", str(trained_model), str(path), text, "--chunk-length-s", "6",
                 "--out", str(tmp_path / "a.srt"), "--format", "srt", "-q"]) == 0
    import srt

    cues = list(srt.parse((tmp_path / "a.srt").read_text()))
    assert cues and not any(c.start.total_seconds() < quiet_from and c.end.total_seconds() > quiet_to for c in cues)


def test_evaluate_cuts_long_recordings_at_pauses_too(tmp_path, talk, trained_model, monkeypatch, capsys):
    from speechtl.data.manifest import Utterance, write_manifest
    from speechtl.inference import vad

    path, _, _ = talk
    calls = []
    real = vad.find_pieces
    monkeypatch.setattr(vad, "find_pieces", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    m = write_manifest(tmp_path / "m.jsonl", [Utterance("talk", str(path), "a talk", sf.info(path).duration)])
    scores = {}
    for setting in ("on", "off"):
        assert main(["evaluate", str(trained_model), str(m), "--chunk-length-s", "6", "--vad", setting,
                     "--json", str(tmp_path / f"{setting}.json"), "-q"]) == 0
        scores[setting] = json.loads((tmp_path / f"{setting}.json").read_text())
    assert calls == [sf.info(path).frames]  # once, for --vad on
    assert scores["on"]["utterances"] == scores["off"]["utterances"] == 1


def test_speech_spans_follow_silero_rules():
    """Our torch-free spans equal Silero's own function on random probability tracks,
    with and without cuts at the length limit."""
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    from speechtl.inference.vad import speech_spans

    rng = np.random.default_rng(0)
    cuts = found = 0
    for trial in range(300):
        n = int(rng.integers(1, 2000))
        # runs of speech and silence, with noisy probabilities around the thresholds
        level = np.repeat(rng.random(n // 20 + 1) > 0.5, 20)[:n]
        probs = np.clip(np.where(level, 0.8, 0.1) + rng.normal(0, 0.25, n), 0, 1).astype(np.float32)
        opts = VadOptions(threshold=float(rng.choice([0.35, 0.5, 0.65])), min_silence_s=float(rng.choice([0.1, 0.3, 0.6])))
        max_s = float(rng.choice([3.0, 8.0, 1e9]))
        total = n * 512 - int(rng.integers(0, 512))
        theirs = get_speech_timestamps_from_probs(
            probs.tolist(), SR, threshold=opts.threshold, min_speech_duration_ms=opts.min_speech_s * 1000,
            max_speech_duration_s=max_s, min_silence_duration_ms=opts.min_silence_s * 1000,
            speech_pad_ms=opts.speech_pad_s * 1000, audio_length_samples=total)
        ours = speech_spans(probs, total, opts, max_s)
        assert ours == [(int(s["start"]), int(s["end"])) for s in theirs if s["end"] > s["start"]], trial
        cuts += ours != speech_spans(probs, total, opts, 1e9)  # the length limit cut something
        found += bool(ours)
    assert cuts > 20 and found > 250  # spans were found, and cut, in most tracks


def test_vad_runs_without_torch(tmp_path, talk):
    """The detector and the spans import no torch (ONNX model folders use them without it)."""
    import subprocess
    import sys

    path, quiet_from, quiet_to = talk
    code = ("import sys, soundfile as sf\n"
            "from speechtl.inference.vad import VadOptions, find_pieces\n"
            f"wav, sr = sf.read({str(path)!r}, dtype='float32')\n"
            "pieces = find_pieces(lambda a, n: wav[a:a + n], len(wav), VadOptions(), 6.0)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print(len(pieces), min(p.start for p in pieces), max(p.end for p in pieces))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n, first, last = map(int, out.stdout.split())
    assert n >= 2 and first < quiet_from * SR and last > quiet_to * SR


def test_pieces_decoded_one_by_one_equal_the_whole_file_and_trim_the_heap(talk, monkeypatch):
    """transcribe decodes each piece of speech as it comes; greedy, that gives the words
    (and times) of decoding the whole file's log-probabilities at once, and the heap is
    trimmed after every batch."""
    from speechtl.inference import transcribe as tmod

    path, _, _ = talk
    trims = []
    monkeypatch.setattr(tmod, "trim_heap", lambda: trims.append(1) or True)
    tr = Transcriber(LocalModel(), VOCAB, torch.device("cpu"), chunk_length_s=6.0, max_batch_seconds=12.0,
                     vad=VadOptions())
    item = Item("t", str(path))
    t = next(tr.run([item]))
    lp, _ = tr.long_log_probs(item)
    whole = tr.decoder(lp, tr.frame_s)
    assert len(whole) >= 12
    assert [(w.word, w.start, w.end) for w in t.words] == [(w.word, round(w.start, 3), round(w.end, 3)) for w in whole]
    assert len(trims) >= 2 * 2  # at least two batches, in each of the two runs
