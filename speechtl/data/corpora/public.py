"""Public corpus releases as they are downloaded: Common Voice, FLEURS, and the Libri-light
limited-resource fine-tuning sets with the LibriSpeech dev and test sets.

The recipes in ``recipes/commonvoice``, ``recipes/fleurs`` and ``recipes/librilight`` are
built on this module. Each ``prepare_*`` function checks one language (or subset) of a
release against the layout it is published in and returns one :class:`Split` per set;
:func:`write_splits` writes them as manifests with their skip reports. A clip that is
missing or cannot be read, and a row whose transcript is empty, is skipped and listed with
its reason; a layout that does not match (no such folder, an unexpected header, a language
the release lacks) raises :class:`CorpusError` naming the file or value.

Layouts:

Common Voice
    ``<release>/<lang>/{train,dev,test,validated,other,...}.tsv`` and ``clips/*.mp3``. The
    tsv files have a header row with at least ``client_id``, ``path`` and ``sentence``;
    releases differ in the other columns (``sentence_id``, ``sentence_domain``,
    ``variant``, ``locale``, ``segment``, ``accent``/``accents``), which are ignored. Given
    a folder for them, the clips are decoded once, mixed to mono and resampled to 16 kHz
    FLAC, so training does not decode mp3 on every epoch; a clip that fails to decode is
    skipped.
FLEURS
    ``<root>/[data/]<lang>/{train,dev,test}.tsv`` and ``audio/{train,dev,test}/*.wav`` (the
    ``audio/<split>.tar.gz`` archives extracted in place). The tsv files have no header;
    every row has 7 tab-separated fields: id (shared by every reading of one sentence),
    file name, raw transcription, normalised transcription, characters, number of samples,
    gender. The manifests carry the normalised transcription, which FLEURS results are
    scored on.
Libri-light
    ``librispeech_finetuning/1h/{0..5}/{clean,other}/`` and ``9h/{clean,other}/`` in the
    LibriSpeech layout: 10 min is fold ``1h/<fold>``, 1 h is all of ``1h/``, 10 h is ``1h/``
    plus ``9h/``. The LibriSpeech dev and test sets sit in ``LibriSpeech/<set>/``, as their
    archives extract.

:func:`librilight_archives` lists the files the Libri-light recipe fetches
(:mod:`speechtl.data.corpora.archives`); :mod:`speechtl.cli.recipe_steps` holds the steps after training.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import soundfile as sf

from ...core.io import atomic_path, write_json, write_text
from ...data.audio import SAMPLE_RATE, AudioError, audio_info, load_audio
from ...data.manifest import Utterance, write_manifest
from .archives import Archive
from .importers import PrepareError, PrepareOptions, _clean, _read_table, prepare, write_skip_report

logger = logging.getLogger(__name__)


class CorpusError(PrepareError):
    """A release that does not have the layout its reader expects; the message names the
    file, folder or value."""


@dataclass
class Split:
    """One prepared set. ``skipped`` holds ``(audio path or "file:line", reason)`` pairs."""

    name: str
    utterances: list[Utterance]
    skipped: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- languages

# Unicode's default lower-casing maps I to i and İ to i + U+0307; Turkic alphabets pair
# I with ı and İ with i, so these are lowered before the normaliser sees the text
_TURKIC = {"tr", "az", "crh", "gag"}
_ARABIC_SCRIPT = {"ar", "fa", "ur", "ps", "ckb", "ug", "sd", "ks"}
_ARABIC_DIACRITICS = [chr(c) for c in range(0x064B, 0x0653)]  # fathatan ... maddah, sukun
# scripts written without spaces between words: WER counts whole sentences, CER is the measure
NO_WORD_SPACES = {"zh", "cmn", "yue", "ja", "th", "lo", "my", "km"}


def base_language(lang: str) -> str:
    """``pt`` of ``pt``, ``zh`` of ``zh-CN``, ``cmn`` of the FLEURS code ``cmn_hans_cn``."""
    return lang.replace("_", "-").split("-")[0].lower()


def normalizer_for(lang: str) -> dict:
    """The ``NormalizerConfig`` fields (the train key ``normalizer``) suited to ``lang``.

    Every language gets the standard normaliser (NFC, lower case, punctuation and symbols
    removed, apostrophes inside words kept). On top of it: Arabic-script languages drop the
    tatweel (a stretching stroke, not a letter), and Arabic its short-vowel diacritics,
    which transcripts write inconsistently; Turkic languages fold the combining dot that
    Unicode lower-casing leaves after ``İ`` (see :func:`fix_case`)."""
    base = base_language(lang)
    mappings: dict[str, str] = {}
    if base in _TURKIC:
        mappings["i\u0307"] = "i"
    if base in _ARABIC_SCRIPT:
        mappings["\u0640"] = ""
    if base == "ar":
        mappings.update({d: "" for d in _ARABIC_DIACRITICS})
    return {"mappings": mappings} if mappings else {}


def fix_case(lang: str, text: str) -> str:
    """Lower the letters Unicode lower-cases wrongly for ``lang`` (Turkic ``I`` -> ``ı``,
    ``İ`` -> ``i``); other text is returned as it is."""
    if base_language(lang) in _TURKIC:
        return text.replace("I", "ı").replace("İ", "i")
    return text


# --------------------------------------------------------------------------- Common Voice

CV_REQUIRED = ("client_id", "path", "sentence")
CV_SPLITS = ("train", "dev", "test")


def find_commonvoice(data: str | os.PathLike, lang: str) -> Path:
    """The language folder of ``lang`` in a Common Voice release: ``data`` itself when it
    holds ``clips/`` or the split tsv files, else ``data/<lang>``."""
    data = Path(data)
    if not data.is_dir():
        raise CorpusError(f"{data}: no such folder (--data: a Common Voice release, or one language folder of it)")
    if (data / "clips").is_dir() or any((data / f"{s}.tsv").is_file() for s in CV_SPLITS):
        return data
    if (data / lang).is_dir():
        return data / lang
    langs = sorted(d.name for d in data.iterdir() if d.is_dir() and ((d / "clips").is_dir() or (d / "train.tsv").is_file()))
    if langs:
        raise CorpusError(f"{data}: this release has no language {lang!r}; it has: {', '.join(langs)}")
    raise CorpusError(f"{data}: no Common Voice language folder (one with clips/ and train.tsv) found")


def read_commonvoice_tsv(tsv: Path, lang: str) -> Iterator[tuple[str, str, str, str]]:
    """``(where, client_id, clip file name, sentence)`` per row; checks the header and, where
    the release has a ``locale`` column, that each row is in ``lang``."""
    if not tsv.is_file():
        raise CorpusError(f"{tsv}: not found (a Common Voice language folder has {', '.join(f'{s}.tsv' for s in CV_SPLITS)})")
    rows = _read_table(tsv, "\t")
    try:
        header = [h.strip() for h in next(rows)[1]]
    except StopIteration:
        raise CorpusError(f"{tsv}: empty file (expected a header row with {', '.join(CV_REQUIRED)})") from None
    missing = [c for c in CV_REQUIRED if c not in header]
    if missing:
        what = ("it has no header row" if any(h.lower().endswith(".mp3") for h in header)
                else f"its columns are: {', '.join(header)}")
        raise CorpusError(f"{tsv}: unexpected header: no {', '.join(missing)} column ({what}); Common Voice tsv "
                          f"files have {', '.join(CV_REQUIRED)} among their columns")
    col = {name: i for i, name in enumerate(header)}
    locale = col.get("locale")
    needed = max(col[c] for c in CV_REQUIRED)
    for lineno, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        where = f"{tsv}:{lineno}"
        if len(row) <= needed:
            raise CorpusError(f"{where}: expected {len(header)} tab-separated fields, found {len(row)}")
        if locale is not None and locale < len(row) and row[locale].strip() and row[locale].strip() != lang:
            raise CorpusError(f"{where}: locale {row[locale].strip()!r}, but --lang is {lang!r}")
        yield where, row[col["client_id"]].strip(), row[col["path"]].strip(), row[col["sentence"]]


def _convert_clip(job: tuple[str, str]) -> tuple[float | None, str | None]:
    """Decode ``src`` (mono, 16 kHz) into FLAC at ``dst``; ``(seconds, None)`` or ``(None, reason)``.
    A ``dst`` left by an earlier run is kept."""
    src, dst = job
    if os.path.exists(dst):
        try:
            return audio_info(dst).duration, None
        except AudioError:
            pass  # an unreadable leftover: convert again
    try:
        wav = load_audio(src)
    except AudioError as e:
        return None, e.reason
    if wav.size == 0:
        return None, "no audio frames in file"
    with atomic_path(dst) as tmp:
        sf.write(str(tmp), wav, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return wav.size / SAMPLE_RATE, None


def _map(fn, jobs: list, workers: int, what: str) -> list:
    if workers <= 1 or len(jobs) < 2:
        results = []
        for i, job in enumerate(jobs, 1):
            results.append(fn(job))
            if i % 2000 == 0:
                logger.info("%s: %d/%d", what, i, len(jobs))
        return results
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, jobs, chunksize=max(1, min(64, len(jobs) // (workers * 4)))))


def prepare_commonvoice(data: str | os.PathLike, lang: str, audio_dir: str | os.PathLike | None,
                        splits: Iterable[str] = CV_SPLITS, jobs: int = 1) -> list[Split]:
    """Read ``train``/``dev``/``test`` of language ``lang`` of the release at ``data``.

    With ``audio_dir``, every clip is decoded and written as 16 kHz FLAC to
    ``audio_dir/<split>/<id>.flac`` (``jobs`` processes; files already there are kept, so an
    interrupted run resumes), and the manifests point at those files. Without it the
    manifests point at the mp3 clips, whose headers are read. Transcripts are kept as
    written except for :func:`fix_case`."""
    lang_dir = find_commonvoice(data, lang)
    clips = lang_dir / "clips"
    if not clips.is_dir():
        raise CorpusError(f"{lang_dir}: no clips/ folder (Common Voice keeps the mp3 clips in <lang>/clips/)")
    out = []
    for split in splits:
        tsv = lang_dir / f"{split}.tsv"
        skipped: list[tuple[str, str]] = []
        rows = []
        seen: dict[str, str] = {}
        for where, client, name, sentence in read_commonvoice_tsv(tsv, lang):
            if not name:
                raise CorpusError(f"{where}: empty path")
            uid = Path(name).stem if Path(name).suffix else name
            audio = clips / name
            if not Path(name).suffix and not audio.exists():  # early releases leave out ".mp3"
                audio = clips / f"{name}.mp3"
            text = _clean(fix_case(lang, sentence))
            if uid in seen:
                skipped.append((where, f"clip {name} is also listed at {seen[uid]}"))
                continue
            seen[uid] = where
            if not text:
                skipped.append((where, "empty sentence"))
                continue
            rows.append((uid, str(audio.resolve()), text, client or None))
        if audio_dir is None:
            results = []
            for _, audio, _, _ in rows:
                try:
                    results.append((audio_info(audio).duration, None))
                except AudioError as e:
                    results.append((None, e.reason))
            targets = [r[1] for r in rows]
        else:
            targets = [str((Path(audio_dir) / split / f"{uid}.flac").resolve()) for uid, *_ in rows]
            results = _map(_convert_clip, [(r[1], t) for r, t in zip(rows, targets)], jobs, f"decoding {split} clips")
        utts = []
        for (uid, audio, text, speaker), target, (seconds, reason) in zip(rows, targets, results):
            if seconds is None:
                skipped.append((audio, reason))
                continue
            utts.append(Utterance(uid, target, text, round(seconds, 4), lang=lang, speaker=speaker))
        _log_split("Common Voice", split, utts, skipped)
        out.append(Split(split, utts, skipped))
    return out


# --------------------------------------------------------------------------- FLEURS

FLEURS_COLUMNS = ("id", "file_name", "raw_transcription", "transcription", "characters", "num_samples", "gender")
FLEURS_SPLITS = ("train", "dev", "test")


def find_fleurs(data: str | os.PathLike, lang: str) -> Path:
    """The folder of FLEURS language ``lang`` (a full code such as ``cs_cz``, or ``cs`` when
    one folder starts with it) under ``data``, ``data/data`` (the dataset repository's
    layout), or ``data`` itself when it is a language folder."""
    data = Path(data)
    if not data.is_dir():
        raise CorpusError(f"{data}: no such folder (--data: the FLEURS folder holding data/<lang>/ or <lang>/)")
    if any((data / f"{s}.tsv").is_file() for s in FLEURS_SPLITS):  # a language folder itself
        if data.name == lang or base_language(data.name) == lang:
            return data
        raise CorpusError(f"{data}: holds FLEURS language {data.name!r}, not {lang!r}")
    langs: dict[str, Path] = {}
    for root in (data / "data", data):
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if d.is_dir() and any((d / f"{s}.tsv").is_file() for s in FLEURS_SPLITS):
                    langs.setdefault(d.name, d)
    if lang in langs:
        return langs[lang]
    prefixed = [name for name in langs if base_language(name) == lang]
    if len(prefixed) == 1:
        return langs[prefixed[0]]
    if prefixed:
        raise CorpusError(f"{data}: --lang {lang!r} matches {', '.join(prefixed)}; give the full FLEURS code")
    if langs:
        raise CorpusError(f"{data}: FLEURS has no language {lang!r} here; it has: {', '.join(langs)}")
    raise CorpusError(f"{data}: no FLEURS language folder (<lang>/train.tsv, dev.tsv, test.tsv) found")


def read_fleurs_tsv(tsv: Path) -> Iterator[tuple[str, list[str]]]:
    """``(where, fields)`` per row, each checked to have FLEURS's 7 fields."""
    if not tsv.is_file():
        raise CorpusError(f"{tsv}: not found (a FLEURS language folder has {', '.join(f'{s}.tsv' for s in FLEURS_SPLITS)})")
    for lineno, row in _read_table(tsv, "\t"):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{tsv}:{lineno}"
        numeric = len(row) == len(FLEURS_COLUMNS) and row[5].strip().isdigit()
        if lineno == 1 and not numeric and not any(cell.strip().lower().endswith(".wav") for cell in row):
            raise CorpusError(f"{where}: unexpected header ({' | '.join(c.strip() for c in row)}); FLEURS tsv files "
                              f"have no header, only rows of {len(FLEURS_COLUMNS)} tab-separated fields: "
                              f"{', '.join(FLEURS_COLUMNS)}")
        if len(row) != len(FLEURS_COLUMNS):
            raise CorpusError(f"{where}: expected {len(FLEURS_COLUMNS)} tab-separated fields "
                              f"({', '.join(FLEURS_COLUMNS)}), found {len(row)}")
        if not numeric:
            raise CorpusError(f"{where}: num_samples is {row[5]!r}, not a number")
        yield where, row


def prepare_fleurs(data: str | os.PathLike, lang: str, splits: Iterable[str] = FLEURS_SPLITS,
                   text: str = "transcription") -> list[Split]:
    """Read the splits of FLEURS language ``lang`` under ``data``. ``text`` picks the
    ``transcription`` (normalised; what FLEURS results are scored on) or the
    ``raw_transcription``."""
    if text not in ("transcription", "raw_transcription"):
        raise ValueError(f"text must be 'transcription' or 'raw_transcription', not {text!r}")
    lang_dir = find_fleurs(data, lang)
    code = lang_dir.name
    text_i = FLEURS_COLUMNS.index(text)
    out = []
    for split in splits:
        audio_root = next((p for p in (lang_dir / "audio" / split, lang_dir / split) if p.is_dir()), None)
        if audio_root is None:
            raise CorpusError(f"{lang_dir / 'audio' / split}: no such folder (extract audio/{split}.tar.gz "
                              f"in {lang_dir / 'audio'})")
        skipped: list[tuple[str, str]] = []
        utts = []
        seen: dict[str, str] = {}
        for where, row in read_fleurs_tsv(lang_dir / f"{split}.tsv"):
            name = row[1].strip()
            uid = Path(name).stem
            if uid in seen:
                skipped.append((where, f"{name} is also listed at {seen[uid]}"))
                continue
            seen[uid] = where
            transcript = _clean(fix_case(lang, row[text_i]))
            if not transcript:
                skipped.append((where, f"empty {text}"))
                continue
            audio = (audio_root / name).resolve()
            try:
                seconds = audio_info(audio).duration
            except AudioError as e:
                skipped.append((str(audio), e.reason))
                continue
            utts.append(Utterance(uid, str(audio), transcript, round(seconds, 4), lang=code))
        _log_split("FLEURS", split, utts, skipped)
        out.append(Split(split, utts, skipped))
    return out


# --------------------------------------------------------------------------- Libri-light

LIBRILIGHT_SUBSETS = ("10min", "1h", "10h")
LIBRISPEECH_EVAL = ("dev-clean", "dev-other", "test-clean", "test-other")
LIBRILIGHT_URL = "https://dl.fbaipublicfiles.com/librilight/data/librispeech_finetuning.tgz"
LIBRISPEECH_URL = "https://www.openslr.org/resources/12"
LIBRISPEECH_LM_URL = "https://www.openslr.org/resources/11/4-gram.arpa.gz"


def librilight_archives(with_lm: bool = False) -> list[Archive]:
    """The Libri-light fine-tuning sets, the four LibriSpeech evaluation sets and, with
    ``with_lm``, LibriSpeech's official 4-gram LM."""
    out = [Archive("librispeech_finetuning.tgz", LIBRILIGHT_URL, "librispeech_finetuning")]
    out += [Archive(f"{s}.tar.gz", f"{LIBRISPEECH_URL}/{s}.tar.gz", f"LibriSpeech/{s}") for s in LIBRISPEECH_EVAL]
    if with_lm:
        out.append(Archive("4-gram.arpa.gz", LIBRISPEECH_LM_URL, None))
    return out


def librilight_train_dirs(data: str | os.PathLike, subset: str, fold: int = 0) -> list[Path]:
    """The folders of a Libri-light fine-tuning subset under ``data`` (or
    ``data/librispeech_finetuning``)."""
    if subset not in LIBRILIGHT_SUBSETS:
        raise CorpusError(f"unknown Libri-light subset {subset!r}; expected one of {', '.join(LIBRILIGHT_SUBSETS)}")
    if not 0 <= fold <= 5:
        raise CorpusError(f"Libri-light has 10-minute folds 0 to 5, not {fold}")
    data = Path(data)
    root = data / "librispeech_finetuning" if (data / "librispeech_finetuning").is_dir() else data
    dirs = {"10min": [root / "1h" / str(fold)], "1h": [root / "1h"], "10h": [root / "1h", root / "9h"]}[subset]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise CorpusError(f"{', '.join(missing)}: no such folder (extract librispeech_finetuning.tgz in {data})")
    return dirs


def librispeech_eval_dir(data: str | os.PathLike, name: str) -> Path:
    data = Path(data)
    for d in (data / "LibriSpeech" / name, data / name):
        if d.is_dir():
            return d
    raise CorpusError(f"{data / 'LibriSpeech' / name}: no such folder (extract {name}.tar.gz in {data})")


def _librispeech_split(name: str, dirs: list[Path]) -> Split:
    utts: list[Utterance] = []
    skipped: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for d in dirs:
        res = prepare(d, PrepareOptions(format="librispeech", on_bad_audio="skip", lang="en"))
        skipped += res.skipped
        for u in res.utterances:
            if u.id in seen:
                raise CorpusError(f"utterance {u.id} is in both {seen[u.id]} and {d}")
            seen[u.id] = str(d)
            if u.text:
                utts.append(u)
            else:
                skipped.append((u.audio, "empty transcript"))
    _log_split("LibriSpeech", name, utts, skipped)
    return Split(name, utts, skipped)


def prepare_librilight(data: str | os.PathLike, subset: str, fold: int = 0) -> list[Split]:
    """The ``train`` split of a Libri-light subset and the four LibriSpeech evaluation sets."""
    train_dirs = librilight_train_dirs(data, subset, fold)
    eval_dirs = {name: librispeech_eval_dir(data, name) for name in LIBRISPEECH_EVAL}
    return [_librispeech_split("train", train_dirs)] + [_librispeech_split(n, [d]) for n, d in eval_dirs.items()]


# --------------------------------------------------------------------------- writing

def _log_split(corpus: str, name: str, utts: list[Utterance], skipped: list) -> None:
    logger.info("%s %s: %d utterance(s), %.2f h; %d skipped", corpus, name, len(utts),
                sum(u.duration for u in utts) / 3600, len(skipped))


def write_splits(out_dir: str | os.PathLike, splits: list[Split], info: dict) -> dict:
    """Write ``<name>.jsonl`` (absolute audio paths) and, if anything was skipped,
    ``<name>.skipped.tsv`` per split, then ``prepared.json`` (``info`` plus counts), last, so
    that its presence means the step finished. Returns what ``prepared.json`` holds."""
    out = Path(out_dir)
    summary = dict(info)
    summary["splits"] = {}
    for s in splits:
        if not s.utterances:
            reasons = "; ".join(f"{where}: {why}" for where, why in s.skipped[:3])
            raise CorpusError(f"the {s.name} set has no usable utterances"
                              + (f" ({len(s.skipped)} skipped, e.g. {reasons})" if s.skipped else ""))
        write_manifest(out / f"{s.name}.jsonl", s.utterances, absolute=True)
        report = out / f"{s.name}.skipped.tsv"
        if s.skipped:
            write_skip_report(report, s.skipped)
        else:
            report.unlink(missing_ok=True)
        summary["splits"][s.name] = {"utterances": len(s.utterances),
                                     "hours": round(sum(u.duration for u in s.utterances) / 3600, 4),
                                     "skipped": len(s.skipped)}
    write_json(out / "prepared.json", summary)
    return summary


def write_normalizer(out_dir: str | os.PathLike, lang: str) -> Path:
    """``normalizer.json``: :func:`normalizer_for` as one line of JSON (ASCII), ready to pass
    as ``normalizer=...`` to ``speechtl train``."""
    path = Path(out_dir) / "normalizer.json"
    write_text(path, json.dumps(normalizer_for(lang), ensure_ascii=True) + "\n")
    return path
