"""The bad-input matrix: every case, through prepare, train, evaluate and transcribe.

Each command runs once per kind of input (the readable cases together, the unreadable
ones together, each broken manifest alone) from one shared corpus, and each case then
has its own test of the documented outcome (README, "Behaviour on bad input").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import make_corrupt, make_wav, tiny_encoder_dir
from speechtl.cli.app import main
from speechtl.data.manifest import Utterance, read_manifest, write_manifest

GOOD_TEXTS = ["ab ba", "cab abc", "bad cc", "abc ab", "ba cab", "cc bad", "ab cc", "bad ba"]
READABLE = {  # name: (file name, make_wav keyword arguments)
    "8khz": ("r8k.wav", dict(sr=8000)),
    "44khz": ("r44.wav", dict(sr=44100)),
    "48khz": ("r48.wav", dict(sr=48000)),
    "stereo": ("stereo.wav", dict(channels=2)),
    "pcm24": ("pcm24.wav", dict(subtype="PCM_24")),
    "float": ("float.wav", dict(subtype="FLOAT")),
    "flac": ("flac.flac", {}),  # own stems: transcribe --out refuses inputs that would share an output
    "ogg": ("ogg.ogg", {}),
    "mp3": ("mp3.mp3", {}),
}
UNREADABLE = ["corrupt", "empty_file", "text_file", "missing"]
TRANSCRIPT_CASES = ["too_short", "empty_transcript", "oov"]
MANIFEST_CASES = ["not_json", "duplicate_id"]
LONG_SECONDS = 2 * 3600


def _write_long(path: Path, seconds: int) -> Path:
    """A 2-hour 16 kHz recording (quiet noise), written a minute at a time."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", samplerate=16000, channels=1, subtype="PCM_16") as f:
        for _ in range(seconds // 60):
            f.write((0.01 * rng.standard_normal(16000 * 60)).astype(np.float32))
    return path


class Matrix:
    """The corpus, plus each command's outputs, computed once."""

    def __init__(self, root: Path):
        self.root = root
        # smaller than the usual tiny encoder: the 2-hour recording is decoded twice
        self.enc = tiny_encoder_dir(root, conv_dim=(8,) * 7, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    feat_extract_norm="group")
        a = root / "audio"
        self.good = [Utterance(f"good{i}", str(make_wav(a / f"good{i}.wav", 1.0 + 0.1 * i, freq=200 + 40 * i, seed=i)),
                               GOOD_TEXTS[i], round(1.0 + 0.1 * i, 4)) for i in range(8)]
        self.case: dict[str, Utterance] = {}
        for name, (fname, kw) in READABLE.items():
            p = make_wav(a / fname, 1.5, **kw)
            self.case[name] = Utterance(name, str(p), "ab ba", 1.5)
        make_corrupt(a / "corrupt.wav")
        (a / "empty.wav").write_bytes(b"")
        (a / "notes.wav").write_text("this is a text file, not audio\n", encoding="utf-8")
        for name, fname in (("corrupt", "corrupt.wav"), ("empty_file", "empty.wav"), ("text_file", "notes.wav"),
                            ("missing", "missing.wav")):
            self.case[name] = Utterance(name, str(a / fname), "ab ba", 1.0)
        short = make_wav(a / "short.wav", 0.1)  # 4 frames; the transcript needs 25
        self.case["too_short"] = Utterance("too_short", str(short), "abc abc abc abc abc abc", 0.1)
        self.case["empty_transcript"] = Utterance("empty_transcript", str(make_wav(a / "silent_text.wav", 1.2)), "", 1.2)
        self.case["oov"] = Utterance("oov", str(make_wav(a / "oov.wav", 1.2)), "ab žx ba", 1.2)
        self.case["long"] = Utterance("long", str(_write_long(a / "long.wav", LONG_SECONDS)), "ab ba", float(LONG_SECONDS))
        m = root / "manifests"
        self.readable = write_manifest(m / "readable.jsonl",
                                       self.good + [self.case[k] for k in [*READABLE, *TRANSCRIPT_CASES, "long"]],
                                       absolute=True)
        # characters outside the vocabulary only exist where the vocabulary is not built: dev
        self.train_readable = write_manifest(m / "train_readable.jsonl",
                                             [u for u in read_manifest(self.readable) if u.id != "oov"], absolute=True)
        self.unreadable = m / "unreadable.jsonl"
        good_lines = [json.dumps({"id": u.id, "audio": u.audio, "text": u.text, "duration": u.duration}) for u in self.good]
        self.unreadable.write_text("\n".join(good_lines + [
            json.dumps({"id": k, "audio": self.case[k].audio, "text": "ab ba", "duration": 1.0}) for k in UNREADABLE]) + "\n")
        self.broken = {
            "not_json": m / "not_json.jsonl",
            "duplicate_id": m / "duplicate_id.jsonl",
        }
        self.broken["not_json"].write_text("\n".join(good_lines[:3] + ['{"id": "x", "audio": oops}'] + good_lines[3:]) + "\n")
        self.broken["duplicate_id"].write_text("\n".join(good_lines + [good_lines[2]]) + "\n")
        self.dev = write_manifest(m / "dev.jsonl", self.good[:4] + [self.case["oov"], self.case["long"]], absolute=True)
        self.dev_short = write_manifest(m / "dev_short.jsonl", self.good[:4], absolute=True)
        self.outputs: dict[str, object] = {}

    def run(self, key: str, argv: list[str], capsys) -> tuple[int, str, str]:
        """``speechtl ARGV`` once per key; its exit status, stdout, and stderr with the log's warnings."""
        if key not in self.outputs:
            records: list[str] = []
            handler = logging.Handler(logging.WARNING)
            handler.emit = lambda r: records.append(r.getMessage())
            log = logging.getLogger("speechtl")
            log.addHandler(handler)
            capsys.readouterr()
            try:
                code = main(argv)
            finally:
                log.removeHandler(handler)
            out, err = capsys.readouterr()
            self.outputs[key] = (code, out, err + "\n".join(records))
        return self.outputs[key]

    # the commands -------------------------------------------------------------------

    def prepare(self, capsys, which: str, skip: bool = False):
        src = {"readable": self.readable, "unreadable": self.unreadable, **self.broken}[which]
        out = self.root / "prepared" / f"{which}{'-skip' if skip else ''}.jsonl"
        argv = ["prepare", str(src), "--format", "jsonl", "--out", str(out), "-q"] + (["--on-bad-audio", "skip"] if skip else [])
        return (*self.run(f"prepare-{which}-{skip}", argv, capsys), out)

    def prepare_one_bad(self, capsys, case: str):
        m = write_manifest(self.root / "manifests" / f"one-{case}.jsonl", self.good + [self.case[case]], absolute=True) \
            if case != "missing" else self._missing_manifest()
        return self.run(f"prepare-one-{case}", ["prepare", str(m), "--format", "jsonl", "--out",
                                                str(self.root / "prepared" / f"one-{case}.jsonl"), "-q"], capsys)

    def _missing_manifest(self) -> Path:
        p = self.root / "manifests" / "one-missing.jsonl"
        p.write_text("".join(json.dumps({"id": u.id, "audio": u.audio, "text": u.text, "duration": u.duration}) + "\n"
                             for u in [*self.good, self.case["missing"]]))
        return p

    def train(self, capsys, which: str, *extra: str):
        out = self.root / "train" / "-".join([which, *extra]).replace("=", "_")
        src = {"readable": self.train_readable, "unreadable": self.unreadable, **self.broken}[which]
        dev = self.dev if which == "readable" else self.dev_short  # the 2-hour dev recording is decoded once
        argv = ["train", f"encoder={self.enc}", f"train={src}", f"dev={dev}", "mode=frozen", "head=linear",
                "max_steps=4", "eval_every=4", "max_batch_seconds=6", "num_workers=0", "lm=none", f"out={out}", "-q", *extra]
        return (*self.run(f"train-{which}-{extra}", argv, capsys), out)

    def model(self, capsys) -> Path:
        code, _, err, out = self.train(capsys, "readable")
        assert code == 0, err
        return out / "model"

    def evaluate(self, capsys, which: str, *extra: str):
        src = {"readable": self.readable, "unreadable": self.unreadable, **self.broken}[which]
        out = self.root / "eval" / "-".join([which, *extra])
        argv = ["evaluate", str(self.model(capsys)), str(src), "--out-dir", str(out), "-q", *extra]
        return (*self.run(f"evaluate-{which}-{extra}", argv, capsys), out)

    def transcribe(self, capsys, which: str):
        """``files``: every audio case file by path (the missing one too); otherwise a manifest."""
        out = self.root / "transcripts" / which
        if which == "files":
            inputs = [u.audio for u in self.good[:2]] + [self.case[k].audio for k in [*READABLE, *UNREADABLE, "long"]]
        elif which == "transcripts":
            inputs = [str(write_manifest(self.root / "manifests" / "tr.jsonl",
                                         [self.case[k] for k in TRANSCRIPT_CASES], absolute=True))]
        else:
            inputs = [str(self.broken[which])]
        argv = ["transcribe", str(self.model(capsys)), *inputs, "--out", str(out), "--format", "json", "-q"]
        return (*self.run(f"transcribe-{which}", argv, capsys), out)


@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    return Matrix(tmp_path_factory.mktemp("bad_input"))


def _strict_json(path: Path):
    def no_constant(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line, parse_constant=no_constant) for line in text.splitlines() if line.strip()]
    return json.loads(text, parse_constant=no_constant)


# ---------------------------------------------------------------------------- prepare

@pytest.mark.parametrize("case", [*READABLE, "long"])
def test_prepare_reads_every_format_and_the_long_file(mx, capsys, case):
    code, _, err, out = mx.prepare(capsys, "readable")
    assert code == 0, err
    got = {u.id: u for u in read_manifest(out)}
    assert got[case].duration == pytest.approx(mx.case[case].duration, abs=0.06)  # mp3 may pad a frame


@pytest.mark.parametrize("case", TRANSCRIPT_CASES)
def test_prepare_keeps_transcript_cases_for_train_to_judge(mx, capsys, case):
    code, _, err, out = mx.prepare(capsys, "readable")
    assert code == 0, err
    assert {u.id: u.text for u in read_manifest(out)}[case] == mx.case[case].text


@pytest.mark.parametrize("case", UNREADABLE)
def test_prepare_stops_naming_an_unreadable_file(mx, capsys, case):
    code, _, err = mx.prepare_one_bad(capsys, case)
    assert code == 1 and Path(mx.case[case].audio).name in err


@pytest.mark.parametrize("case", UNREADABLE)
def test_prepare_skip_leaves_out_and_reports_an_unreadable_file(mx, capsys, case):
    code, out_text, err, out = mx.prepare(capsys, "unreadable", skip=True)
    assert code == 0, err
    assert case not in {u.id for u in read_manifest(out)} and len(read_manifest(out)) == 8
    report = out.with_suffix(".skipped.tsv").read_text()
    assert mx.case[case].audio in report and "skipped 4" in out_text


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_prepare_names_the_broken_manifest_line(mx, capsys, case):
    code, _, err, _ = mx.prepare(capsys, case)
    assert code == 1
    assert f"{mx.broken[case]}:" in err and ("not valid JSON" in err if case == "not_json" else "duplicate id 'good2'" in err)


# ------------------------------------------------------------------------------ train

@pytest.mark.parametrize("case", [*READABLE])
def test_train_uses_every_readable_format(mx, capsys, case):
    code, _, err, out = mx.train(capsys, "readable")
    assert code == 0, err
    s = json.loads((out / "train_summary.json").read_text())
    assert all(case not in ids for ids in s["dropped_ids"].values())
    assert s["train_utterances"] == 8 + len(READABLE)  # the good clips and every format; features were computed for all


@pytest.mark.parametrize("case,reason", [("too_short", "too_short_for_transcript"), ("empty_transcript", "empty_transcript"),
                                         ("long", "too_long")])
def test_train_drops_clips_it_cannot_use_with_a_count(mx, capsys, case, reason):
    code, _, err, out = mx.train(capsys, "readable")
    assert code == 0, err
    s = json.loads((out / "train_summary.json").read_text())
    assert s["dropped_ids"][reason] == [case] and s["dropped"][reason] == 1


def test_train_reports_characters_outside_the_vocabulary(mx, capsys):
    code, _, err, out = mx.train(capsys, "readable")
    assert code == 0, err
    assert "dev set" in err and "'ž'" in err and "'x'" in err
    hyps = _strict_json(out / "dev" / "hyps.jsonl")
    assert "oov" in {h["id"] for h in hyps}  # scored, with the unknown characters counted as errors


def test_train_scores_a_long_dev_recording_in_windows(mx, capsys):
    code, _, err, out = mx.train(capsys, "readable")  # frozen mode: features are precomputed for the short dev clips only
    assert code == 0, err
    hyps = {h["id"]: h for h in _strict_json(out / "dev" / "hyps.jsonl")}
    assert set(hyps) == {"good0", "good1", "good2", "good3", "oov", "long"}


@pytest.mark.parametrize("case", UNREADABLE)
def test_train_stops_before_the_first_update_naming_every_bad_file(mx, capsys, case):
    code, _, err, out = mx.train(capsys, "unreadable")
    assert code == 1 and "4 unreadable audio file(s)" in err and f"{case}: {mx.case[case].audio}" in err
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("case", UNREADABLE)
def test_train_skip_leaves_out_and_reports_bad_files(mx, capsys, case):
    code, _, err, out = mx.train(capsys, "unreadable", "on_bad_audio=skip")
    assert code == 0, err
    s = json.loads((out / "train_summary.json").read_text())
    assert case in {b["id"] for b in s["skipped_audio"]} and s["train_utterances"] == 8


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_train_names_the_broken_manifest_line(mx, capsys, case):
    code, _, err, _ = mx.train(capsys, case)
    assert code == 1 and f"{mx.broken[case]}:" in err


# --------------------------------------------------------------------------- evaluate

@pytest.mark.parametrize("case", [*READABLE, *TRANSCRIPT_CASES, "long"])
def test_evaluate_scores_every_readable_case(mx, capsys, case):
    code, _, err, out = mx.evaluate(capsys, "readable")
    assert code == 0, err
    hyps = {h["id"]: h for h in _strict_json(out / "hyps.jsonl")}  # strict: an empty reference must not write Infinity
    assert case in hyps and hyps[case]["ref"] == " ".join(mx.case[case].text.split())
    summary = _strict_json(out / "summary.json")
    assert summary["utterances"] == 8 + len(READABLE) + len(TRANSCRIPT_CASES) + 1


@pytest.mark.parametrize("case", UNREADABLE)
def test_evaluate_stops_naming_every_bad_file(mx, capsys, case):
    code, _, err, _ = mx.evaluate(capsys, "unreadable")
    assert code == 1 and "4 unreadable audio file(s)" in err and f"{case}: {mx.case[case].audio}" in err


@pytest.mark.parametrize("case", UNREADABLE)
def test_evaluate_skip_scores_the_rest_and_lists_bad_files(mx, capsys, case):
    code, out_text, err, out = mx.evaluate(capsys, "unreadable", "--on-bad-audio", "skip")
    assert code == 0, err
    summary = _strict_json(out / "summary.json")
    assert summary["utterances"] == 8 and case in {s["id"] for s in summary["skipped"]}
    assert json.loads(out_text)["skipped"] == 4


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_evaluate_names_the_broken_manifest_line(mx, capsys, case):
    code, _, err, _ = mx.evaluate(capsys, case)
    assert code == 1 and f"{mx.broken[case]}:" in err


# ------------------------------------------------------------------------- transcribe

@pytest.mark.parametrize("case", [*READABLE, "long"])
def test_transcribe_reads_every_format_and_the_long_file(mx, capsys, case):
    code, _, err, out = mx.transcribe(capsys, "files")
    assert code == 1  # the unreadable inputs fail; these still get their transcript
    doc = _strict_json(out / Path(mx.case[case].audio).with_suffix(".json").name)
    assert doc["duration"] == pytest.approx(mx.case[case].duration, abs=0.06)


@pytest.mark.parametrize("case", UNREADABLE)
def test_transcribe_reports_a_bad_file_and_carries_on(mx, capsys, case):
    code, _, err, out = mx.transcribe(capsys, "files")
    assert code == 1
    assert f"error: {mx.case[case].audio}:" in err and "transcribed 12 of 16 file(s); 4 failed" in err
    assert not (out / Path(mx.case[case].audio).with_suffix(".json").name).exists()


@pytest.mark.parametrize("case", TRANSCRIPT_CASES)
def test_transcribe_ignores_transcripts(mx, capsys, case):
    code, _, err, out = mx.transcribe(capsys, "transcripts")
    assert code == 0, err
    assert "text" in _strict_json(out / f"{case}.json")


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_transcribe_names_the_broken_manifest_line(mx, capsys, case):
    code, _, err, _ = mx.transcribe(capsys, case)
    assert code == 1 and f"{mx.broken[case]}:" in err
