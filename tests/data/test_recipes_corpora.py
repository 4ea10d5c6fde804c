"""The Common Voice, FLEURS and Libri-light recipes, run stage by stage on miniature copies of
each corpus's published layout (a few synthetic clips, mp3 where the corpus uses mp3, the real
tsv/trans formats, and awkward rows: a missing clip, an empty transcript, an unreadable file,
punctuation and casing). Every stage runs, with a tiny random encoder and two updates; nothing
touches the network (Libri-light's download stage reads a file:// mirror).

The three full runs are made side by side by the ``runs`` fixture (each recipe spends most of
its time starting Python processes); each test then checks its own corpus's outputs.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import soundfile as sf

from conftest import make_corrupt, make_wav, write_text

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
# two updates of a tiny encoder; masks off (the tiny encoder is narrower than a 64-channel mask)
TINY = ["max_steps=2", "eval_every=2", "num_workers=0", "max_batch_seconds=20", "mask_time_prob=0.0",
        "mask_feature_prob=0.0", "layerdrop=0.0", "freeze_encoder_steps=0", "patience=0", "bilstm_hidden=8",
        "bilstm_layers=1", "--beam-width", "4"]


def run_recipe(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(RECIPES / name / "run.sh"), *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300)
    if check:
        ok(r)
    return r


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"{' '.join(r.args)}\nexit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def stages(name: str, *phases: list) -> list[subprocess.CompletedProcess]:
    """Run the recipe once per argument list, stopping at the first that fails."""
    done = []
    for args in phases:
        done.append(run_recipe(name, *args, check=False))
        if done[-1].returncode != 0:
            break
    return done


def manifest(path: Path) -> dict[str, dict]:
    return {d["id"]: d for d in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def skipped(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


def mp3_ok() -> bool:
    return "MP3" in sf.available_formats()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_encoder, librilight_mirror) -> dict:
    """Every corpus's recipe run stage by stage (``*_runs`` below), two recipes at a time."""
    cv, fl, ll = (tmp_path_factory.mktemp(name) for name in ("cv", "fleurs", "ll"))
    jobs = {"commonvoice": lambda: commonvoice_runs(cv, tiny_encoder),
            "fleurs": lambda: fleurs_runs(fl, tiny_encoder),
            "librilight": lambda: librilight_runs(ll, tiny_encoder, librilight_mirror)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


# --------------------------------------------------------------------------- Common Voice

CV_HEADER = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
             "gender", "accents", "variant", "locale", "segment"]  # releases since 2024
CV_HEADER_OLD = ["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accent", "locale",
                 "segment"]  # releases of 2019-2020: no sentence_id, sentence_domain or variant

# (split, clip number, speaker, sentence, what the clip is: "ok" | "missing" | "corrupt")
CV_ROWS = [
    ("train", 1, "spk_a", "Dobrý den, SVĚTE!", "ok"),
    ("train", 2, "spk_a", "„Ahoj,“ řekla — a šla.", "ok"),
    ("train", 3, "spk_b", "", "ok"),                       # empty sentence
    ("train", 4, "spk_b", "Tahle nahrávka chybí.", "missing"),
    ("train", 5, "spk_c", "Tahle se nedá přečíst.", "corrupt"),
    ("train", 6, "spk_c", "Jedna, dvě; TŘI?", "ok"),
    ("dev", 7, "spk_d", "Dobrý den.", "ok"),
    ("dev", 8, "spk_d", "Ahoj světe!", "ok"),
    ("test", 9, "spk_e", "Jedna dvě.", "ok"),
    ("test", 10, "spk_e", "Tři, ČTYŘI!", "ok"),
]


def make_commonvoice(root: Path, header: list[str] = CV_HEADER, lang: str = "cs") -> Path:
    """A Common Voice release folder holding one language, with mp3 clips at 48 kHz."""
    lang_dir = root / lang
    tables: dict[str, list[str]] = {s: ["\t".join(header)] for s in ("train", "dev", "test", "validated", "other", "invalidated")}
    for split, n, spk, sentence, kind in CV_ROWS:
        name = f"common_voice_{lang}_{n}.mp3"
        if kind == "ok":
            make_wav(lang_dir / "clips" / name, 0.8 + 0.1 * n, sr=48000, freq=150 + 40 * n, seed=n)
        elif kind == "corrupt":
            make_corrupt(lang_dir / "clips" / name)
        values = {"client_id": spk, "path": name, "sentence_id": f"s{n}", "sentence": sentence,
                  "sentence_domain": "", "up_votes": "2", "down_votes": "0", "age": "", "gender": "",
                  "accents": "", "accent": "", "variant": "", "locale": lang, "segment": ""}
        line = "\t".join(values[h] for h in header)
        tables[split].append(line)
        tables["validated"].append(line)
    for name, lines in tables.items():
        write_text(lang_dir / f"{name}.tsv", "\n".join(lines) + "\n")
    return root


def commonvoice_runs(root: Path, encoder: Path) -> dict:
    """Stages 1-2, then 3-5, then everything again (all skipped)."""
    if not mp3_ok():
        return {"skip": "this libsndfile cannot write MP3 (needs libsndfile >= 1.1)"}
    data, out = make_commonvoice(root / "cv-corpus-fake"), root / "exp"
    common = ["--lang", "cs", "--data", data, "--encoder", encoder, "--mode", "frozen", "--out", out, "--jobs", 1, *TINY]
    return {"out": out, "run": out / f"{encoder.name}-frozen",
            "runs": stages("commonvoice", [*common, "--stop-stage", 2], [*common, "--stage", 3], common)}


def test_commonvoice_recipe_every_stage(runs):
    res = runs["commonvoice"]
    if "skip" in res:
        pytest.skip(res["skip"])
    first, rest, again = map(ok, res["runs"])
    d, run = res["out"] / "data", res["run"]
    train = manifest(d / "train.jsonl")
    assert sorted(train) == ["common_voice_cs_1", "common_voice_cs_2", "common_voice_cs_6"]
    assert train["common_voice_cs_1"]["text"] == "Dobrý den, SVĚTE!"  # stored as written; normalised in training
    assert train["common_voice_cs_1"]["speaker"] == "spk_a" and train["common_voice_cs_1"]["lang"] == "cs"
    audio = Path(train["common_voice_cs_1"]["audio"])
    assert audio.suffix == ".flac" and sf.info(str(audio)).samplerate == 16000  # mp3 decoded and resampled once
    report = skipped(d / "train.skipped.tsv")
    assert "empty sentence" in report and "common_voice_cs_4.mp3\tfile not found" in report
    assert "common_voice_cs_5.mp3\tcannot decode" in report
    assert sorted(manifest(d / "dev.jsonl")) == ["common_voice_cs_7", "common_voice_cs_8"]
    assert sorted(manifest(d / "test.jsonl")) == ["common_voice_cs_10", "common_voice_cs_9"]
    counts = json.loads((d / "prepared.json").read_text())["splits"]["train"]
    assert counts["utterances"] == 3 and counts["skipped"] == 3 and 0 < counts["hours"] < 0.002
    vocab = json.loads((run / "model" / "vocab.json").read_text())
    letters = [t for t in vocab if len(t) == 1 and t != "|"]
    assert letters and all(t.islower() for t in letters) and "ý" in letters  # lower case, no punctuation, accents kept
    assert "stage 2: training" in first.stdout and "stage 3" not in first.stdout  # --stop-stage 2
    assert "stage 2" not in rest.stdout and "stage 3: 3-gram LM" in rest.stdout  # --stage 3

    for folder in ("dev", "test", "dev-lm", "test-lm"):
        assert (run / "decode" / folder / "summary.json").is_file()
    assert (run / "lm" / "train-3gram.arpa").is_file() and (run / "decode" / "lm_tune.json").is_file()
    results = json.loads((run / "results.json").read_text())
    assert [(r["set"], r["decoder"]) for r in results["rows"]] == [
        ("dev", "greedy"), ("dev", "lm"), ("test", "greedy"), ("test", "lm")]
    assert results["prepared"]["splits"]["train"]["skipped"] == 3 and results["lm_weights"] is not None
    assert "| set | decoder |" in rest.stdout and "| test | beam + LM | 2 |" in rest.stdout

    assert again.stdout.count("already done") == 3 and "already scored" in again.stderr
    assert "| test | greedy | 2 |" in again.stdout


@pytest.mark.skipif(not mp3_ok(), reason="this libsndfile cannot write MP3 (needs libsndfile >= 1.1)")
def test_commonvoice_older_header_and_bad_input(tmp_path):
    data = make_commonvoice(tmp_path / "cv-old", header=CV_HEADER_OLD)
    out = tmp_path / "exp"
    base = ["--encoder", "unused", "--out", out, "--jobs", 1, "--stop-stage", 1]
    run_recipe("commonvoice", "--lang", "cs", "--data", data / "cs", "--keep-mp3", "true", *base)
    train = manifest(out / "data" / "train.jsonl")
    assert sorted(train) == ["common_voice_cs_1", "common_voice_cs_2", "common_voice_cs_6"]
    assert train["common_voice_cs_6"]["audio"].endswith("clips/common_voice_cs_6.mp3")
    assert "common_voice_cs_5.mp3\tcannot decode" in skipped(out / "data" / "train.skipped.tsv")

    r = run_recipe("commonvoice", "--lang", "cs", "--data", tmp_path / "nowhere", *base, check=False)
    assert r.returncode == 1 and "nowhere: no such folder" in r.stderr
    r = run_recipe("commonvoice", "--lang", "de", "--data", data, *base, "--out", tmp_path / "de", check=False)
    assert r.returncode == 1 and "no language 'de'" in r.stderr and "it has: cs" in r.stderr
    bad = data / "cs" / "dev.tsv"
    bad.write_text("client_id\tfilename\ttext\nspk\tx.mp3\thello\n", encoding="utf-8")
    r = run_recipe("commonvoice", "--lang", "cs", "--data", data, *base, "--out", tmp_path / "bad", check=False)
    assert r.returncode == 1 and f"{bad}: unexpected header: no path, sentence column" in r.stderr
    assert "its columns are: client_id, filename, text" in r.stderr


# --------------------------------------------------------------------------- FLEURS

# (split, file number, sentence id, raw transcription, normalised transcription, "ok" | "missing" | "corrupt")
FLEURS_ROWS = [
    ("train", 1001, 7, "Dobrý den, Světe!", "dobrý den světe", "ok"),
    ("train", 1002, 7, "Dobrý den, Světe!", "dobrý den světe", "ok"),  # a second reader of sentence 7
    ("train", 1003, 8, "…", "", "ok"),                                   # empty normalised transcription
    ("train", 1004, 9, "Chybí.", "chybí", "missing"),
    ("train", 1005, 10, "Nečitelné.", "nečitelné", "corrupt"),
    ("train", 1006, 11, "Jedna, DVĚ; tři?", "jedna dvě tři", "ok"),
    ("dev", 2001, 12, "Ahoj, světe.", "ahoj světe", "ok"),
    ("dev", 2002, 13, "Dobrý den!", "dobrý den", "ok"),
    ("test", 3001, 14, "„Tři,“ řekla.", "tři řekla", "ok"),
    ("test", 3002, 15, "Jedna dvě.", "jedna dvě", "ok"),
]


def make_fleurs(root: Path, lang: str = "cs_cz") -> Path:
    """The FLEURS dataset repository's layout for one language, audio archives extracted."""
    lang_dir = root / "data" / lang
    tables: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for split, n, sid, raw, norm, kind in FLEURS_ROWS:
        wav = lang_dir / "audio" / split / f"{n}.wav"
        if kind == "ok":
            make_wav(wav, 0.6 + (n % 10) * 0.15, freq=120 + n % 50 * 9, seed=n)
        elif kind == "corrupt":
            make_corrupt(wav)
        chars = " ".join("|" if c == " " else c for c in norm) + " |"
        tables[split].append("\t".join([str(sid), wav.name, raw, norm, chars, str(16000 * (n % 10 + 1)), "FEMALE"]))
    for split, lines in tables.items():
        write_text(lang_dir / f"{split}.tsv", "\n".join(lines) + "\n")
    return root


def fleurs_runs(root: Path, encoder: Path) -> dict:
    """Stage 1, then 2-5 (LM weights not tuned), then everything again (all skipped)."""
    data, out = make_fleurs(root / "fleurs"), root / "exp"
    common = ["--lang", "cs", "--data", data, "--encoder", encoder, "--out", out, "--tune-lm", "false", *TINY]
    return {"out": out, "run": out / f"{encoder.name}-finetune",
            "runs": stages("fleurs", [*common, "--stop-stage", 1], [*common, "--stage", 2], common)}


def test_fleurs_recipe_every_stage(runs):
    res = runs["fleurs"]
    first, rest, again = map(ok, res["runs"])
    d, run = res["out"] / "data", res["run"]
    train = manifest(d / "train.jsonl")
    assert sorted(train) == ["1001", "1002", "1006"]  # two readings of one sentence are two utterances
    assert train["1006"]["text"] == "jedna dvě tři" and train["1006"]["lang"] == "cs_cz"  # the normalised column
    report = skipped(d / "train.skipped.tsv")
    assert "train.tsv:3\tempty transcription" in report and "1004.wav\tfile not found" in report
    assert "1005.wav\tcannot decode" in report
    assert manifest(d / "test.jsonl")["3001"]["text"] == "tři řekla"
    assert "stage 2" not in first.stdout

    summary = json.loads((run / "decode" / "test-lm" / "summary.json").read_text())
    assert summary["decoder"] == "beam" and summary["alpha"] == 0.5 and summary["utterances"] == 2
    assert not (run / "decode" / "lm_tune.json").exists()  # --tune-lm false
    results = json.loads((run / "results.json").read_text())
    assert len(results["rows"]) == 4 and results["mode"] == "finetune" and results["steps"] == 2
    assert "| test | beam + LM | 2 |" in rest.stdout

    assert again.stdout.count("already done") == 3 and "| dev | beam + LM | 2 |" in again.stdout


def test_fleurs_bad_input(tmp_path):
    data = make_fleurs(tmp_path / "fleurs")
    base = ["--encoder", "unused", "--stop-stage", 1]
    r = run_recipe("fleurs", "--lang", "cs_cz", "--data", tmp_path / "absent", *base, "--out", tmp_path / "a", check=False)
    assert r.returncode == 1 and "absent: no such folder" in r.stderr
    r = run_recipe("fleurs", "--lang", "de", "--data", data, *base, "--out", tmp_path / "b", check=False)
    assert r.returncode == 1 and "no language 'de'" in r.stderr and "it has: cs_cz" in r.stderr
    dev = data / "data" / "cs_cz" / "dev.tsv"
    dev.write_text("\t".join(["id", "file_name", "raw_transcription", "transcription", "characters", "num_samples",
                              "gender"]) + "\n" + dev.read_text(encoding="utf-8"), encoding="utf-8")
    r = run_recipe("fleurs", "--lang", "cs_cz", "--data", data, *base, "--out", tmp_path / "c", check=False)
    assert r.returncode == 1 and f"{dev}:1: unexpected header" in r.stderr and "have no header" in r.stderr
    dev.write_text("12\t2001.wav\tAhoj.\tahoj\n", encoding="utf-8")
    r = run_recipe("fleurs", "--lang", "cs_cz", "--data", data, *base, "--out", tmp_path / "d", check=False)
    assert r.returncode == 1 and f"{dev}:1: expected 7 tab-separated fields" in r.stderr


# --------------------------------------------------------------------------- Libri-light

def _librispeech_chapter(folder: Path, spk: int, chapter: int, rows: list[tuple[str, str]]) -> None:
    """LibriSpeech's SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt with flac files; rows are
    (transcript, "ok" | "missing" | "corrupt")."""
    d = folder / str(spk) / str(chapter)
    lines = []
    for i, (text, kind) in enumerate(rows):
        uid = f"{spk}-{chapter}-{i:04d}"
        if kind == "ok":
            make_wav(d / f"{uid}.flac", 0.7 + 0.2 * i, freq=100 + spk % 97 + 30 * i, seed=spk + i)
        elif kind == "corrupt":
            make_corrupt(d / f"{uid}.flac")
        lines.append(f"{uid} {text}".rstrip())
    write_text(d / f"{spk}-{chapter}.trans.txt", "\n".join(lines) + "\n")


def _tar(src_root: Path, member: str, archive: Path) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_root / member, arcname=member)


def make_librilight_mirror(root: Path) -> Path:
    """Miniature copies of librispeech_finetuning.tgz, the four LibriSpeech dev/test archives and
    LibriSpeech's (upper-case) 4-gram LM, in a folder that stands in for their publishers."""
    from speechtl.decoding.lm import build_arpa

    src, mirror = root / "src", root / "mirror"
    ft = src / "librispeech_finetuning"
    _librispeech_chapter(ft / "1h" / "0" / "clean", 100, 10, [
        ("HELLO WORLD", "ok"), ("It's a Test, isn't it?", "ok"), ("MISSING FILE", "missing"),
        ("UNREADABLE FILE", "corrupt"), ("", "ok")])
    _librispeech_chapter(ft / "1h" / "0" / "other", 200, 20, [("THE OTHER SPEAKER", "ok")])
    for fold in range(1, 6):
        _librispeech_chapter(ft / "1h" / str(fold) / "clean", 300 + fold, 30, [("ANOTHER FOLD", "ok")])
    _librispeech_chapter(ft / "9h" / "clean", 400, 40, [("NINE HOURS MORE", "ok")])
    _librispeech_chapter(ft / "9h" / "other", 401, 40, [("AND OTHER ONES", "ok")])
    write_text(ft / "phones" / "phone_mapping.json", "{}\n")
    _tar(src, "librispeech_finetuning", mirror / "librispeech_finetuning.tgz")
    write_text(src / "LibriSpeech" / "README.TXT", "LibriSpeech\n")
    for i, name in enumerate(("dev-clean", "dev-other", "test-clean", "test-other")):
        _librispeech_chapter(src / "LibriSpeech" / name, 500 + i, 50, [("HELLO THE WORLD", "ok"), ("A TEST WORLD", "ok")])
        with tarfile.open(mirror / f"{name}.tar.gz", "w:gz") as tar:  # as published: LibriSpeech/README.TXT, LibriSpeech/<set>/
            tar.add(src / "LibriSpeech" / "README.TXT", arcname="LibriSpeech/README.TXT")
            tar.add(src / "LibriSpeech" / name, arcname=f"LibriSpeech/{name}")
    with gzip.open(mirror / "4-gram.arpa.gz", "wt", encoding="utf-8") as f:
        f.write(build_arpa(["HELLO WORLD", "IT'S A TEST ISN'T IT", "THE OTHER SPEAKER", "HELLO THE WORLD"], order=4))
    return mirror


@pytest.fixture(scope="module")
def librilight_mirror(tmp_path_factory) -> Path:
    return make_librilight_mirror(tmp_path_factory.mktemp("librilight"))


def librilight_runs(root: Path, encoder: Path, mirror: Path) -> dict:
    """Stages 0-1 (downloading from the mirror), then 2-5 (LibriSpeech's LM), then everything
    again (all skipped)."""
    data, out = root / "corpora", root / "exp"
    common = ["--subset", "10min", "--data", data, "--encoder", encoder, "--out", out, *TINY]
    return {"data": data, "out": out, "run": out / "10min" / f"{encoder.name}-finetune",
            "runs": stages("librilight", [*common, "--download", "--mirror", f"file://{mirror}", "--stop-stage", 1],
                           [*common, "--stage", 2], common)}


def test_librilight_recipe_every_stage(runs):
    res = runs["librilight"]
    first, rest, again = map(ok, res["runs"])
    data, d, run = res["data"], res["out"] / "10min" / "data", res["run"]
    sums = (data / "SHA256SUMS").read_text()
    assert all(f"  {n}\n" in sums for n in ("librispeech_finetuning.tgz", "dev-other.tar.gz", "4-gram.arpa.gz"))
    assert "no published checksum given" in first.stdout
    assert (data / "LibriSpeech" / "test-other" / "503" / "50").is_dir() and (data / "librispeech_finetuning" / "9h").is_dir()
    train = manifest(d / "train.jsonl")
    assert sorted(train) == ["100-10-0000", "100-10-0001", "200-20-0000"]  # fold 0 only
    assert train["100-10-0001"]["text"] == "It's a Test, isn't it?" and train["100-10-0000"]["speaker"] == "100"
    report = skipped(d / "train.skipped.tsv")
    assert "100-10-0002.flac\tfile not found" in report and "100-10-0003.flac\tcannot decode" in report
    assert "100-10-0004.flac\tempty transcript" in report
    assert all(len(manifest(d / f"{s}.jsonl")) == 2 for s in ("dev-clean", "dev-other", "test-clean", "test-other"))

    lm = (run / "lm" / "librispeech-4gram.arpa").read_text()
    assert "hello the world" in lm and "HELLO" not in lm  # cased like the model's transcripts
    vocab = json.loads((run / "model" / "vocab.json").read_text())
    assert "'" in vocab and "," not in vocab and "T" not in vocab
    results = json.loads((run / "results.json").read_text())
    assert len(results["rows"]) == 8 and results["lm_weights"] is not None
    row = {(r["set"], r["decoder"]): r for r in results["rows"]}
    assert row[("test-other", "lm")]["published_wer"] == 15.6 and row[("test-other", "greedy")]["published_wer"] is None
    assert "published WER %" in rest.stdout and "Baevski et al., 2020" in rest.stdout

    assert "every file is in place" in again.stdout and again.stdout.count("already done") == 3


def test_librilight_subsets_and_bad_input(tmp_path, librilight_mirror):
    data = tmp_path / "corpora"
    data.mkdir()
    r = run_recipe("librilight", "--subset", "1h", "--data", data, "--out", tmp_path / "x", check=False)
    assert r.returncode == 1 and "missing 6 file(s)" in r.stderr
    assert "https://dl.fbaipublicfiles.com/librilight/data/librispeech_finetuning.tgz" in r.stderr
    assert f"-> {data / 'test-other.tar.gz'}" in r.stderr and "https://www.openslr.org/resources/11/4-gram.arpa.gz" in r.stderr
    r = run_recipe("librilight", "--subset", "2h", "--data", data, check=False)
    assert r.returncode == 1 and "--subset 2h: expected 10min, 1h or 10h" in r.stderr
    r = run_recipe("librilight", "--subset", "1h", "--data", tmp_path / "absent", check=False)
    assert r.returncode == 1 and "absent: no such folder" in r.stderr

    sums = tmp_path / "sums.txt"
    sums.write_text(f"{'0' * 64}  dev-clean.tar.gz\n")
    r = run_recipe("librilight", "--subset", "1h", "--data", data, "--download", "--mirror", f"file://{librilight_mirror}",
                   "--checksums", sums, "--lm", "none", "--stop-stage", 0, check=False)
    assert r.returncode == 1 and f"{data / 'dev-clean.tar.gz'}: checksum mismatch: expected {'0' * 64}" in r.stderr

    out = tmp_path / "exp"  # 10 hours: the six folds of 1h/ and 9h/ (the rest of the download)
    run_recipe("librilight", "--subset", "10h", "--data", data, "--download", "--mirror", f"file://{librilight_mirror}",
               "--lm", "none", "--out", out, "--stop-stage", 1)
    train = manifest(out / "10h" / "data" / "train.jsonl")
    assert len(train) == 10 and {"305-30-0000", "400-40-0000", "401-40-0000"} <= set(train)


# --------------------------------------------------------------------------- pieces

def test_language_normalisers():
    from speechtl.data.corpora.public import fix_case, normalizer_for
    from speechtl.data.text import Normalizer, NormalizerConfig

    tr = Normalizer(NormalizerConfig(**normalizer_for("tr")))
    assert tr(fix_case("tr", "IĞDIR, İstanbul!")) == "ığdır istanbul"
    assert tr("İstanbul") == "istanbul"  # without fix_case, Unicode's i + U+0307 is folded too
    assert Normalizer(NormalizerConfig(**normalizer_for("ar")))("مَرْحَبـــا") == "مرحبا"  # tatweel, short vowels
    assert normalizer_for("cs") == {} and normalizer_for("zh-CN") == {} and fix_case("cs", "Ivan") == "Ivan"
    assert normalizer_for("tr_tr") == normalizer_for("tr")  # FLEURS codes too


def test_recorded_checksum_catches_a_changed_archive(tmp_path):
    from speechtl.data.corpora.archives import ArchiveError, verify_archive

    archive, record = tmp_path / "a.tar.gz", tmp_path / "SHA256SUMS"
    archive.write_bytes(b"first")
    assert "is recorded in" in verify_archive(archive, {}, record)
    assert "matches" in verify_archive(archive, {}, record)
    archive.write_bytes(b"second")
    with pytest.raises(ArchiveError, match=r"a\.tar\.gz: sha256 .* differs from .* recorded in"):
        verify_archive(archive, {}, record)
    md5 = "0" * 32
    with pytest.raises(ArchiveError, match=f"checksum mismatch: expected {md5}"):
        verify_archive(archive, {"a.tar.gz": md5}, record)


def test_librilight_subset_folders(tmp_path):
    from speechtl.data.corpora.public import CorpusError, librilight_train_dirs

    ft = tmp_path / "librispeech_finetuning"
    (ft / "1h" / "3").mkdir(parents=True)
    assert librilight_train_dirs(tmp_path, "10min", fold=3) == [ft / "1h" / "3"]
    assert librilight_train_dirs(tmp_path, "1h") == [ft / "1h"]
    with pytest.raises(CorpusError, match=r"9h: no such folder \(extract librispeech_finetuning\.tgz"):
        librilight_train_dirs(tmp_path, "10h")
    with pytest.raises(CorpusError, match="folds 0 to 5, not 6"):
        librilight_train_dirs(tmp_path, "10min", fold=6)
