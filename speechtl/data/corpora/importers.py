"""Turn common corpus layouts into speechtl manifests.

:func:`prepare` reads a corpus in one of the formats below, probes every audio file's
header with :func:`speechtl.data.audio.audio_info` (duration without decoding), filters by
duration, splits off an optional dev set and returns a :class:`PrepareResult`;
:func:`write_prepared` writes it out as manifest(s) plus a report of skipped files.

Formats (``PrepareOptions.format``):

``folder``
    A folder searched recursively for audio files (:data:`speechtl.data.audio.AUDIO_EXTENSIONS`,
    any case), each with a transcript of the same stem and extension ``.txt`` beside it.
    The id is the path relative to the folder without extension, ``/`` replaced by
    ``-``; the speaker is the name of the parent folder for audio in a subfolder, else
    none. Hidden files and folders (names starting with ``.``, e.g. macOS ``._x.wav``)
    are ignored. An audio file without a transcript is an error, or with
    ``on_bad_audio="skip"`` a skipped file (reason ``no transcript ...``).
``csv`` / ``tsv``
    A delimited file with a header row (``,`` for csv with standard quoting, tab for
    tsv with no quoting). Columns are chosen by name (``audio_column``,
    ``text_column``, optional ``speaker_column`` and ``id_column``) or by 0-based index.
    Audio paths are absolute or relative to the file's folder. Without an id column
    the id is derived from the audio path as for ``folder``.
``librispeech``
    The LibriSpeech layout ``SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`` with lines
    ``ID TEXT`` and ``ID.flac`` beside it; found by a recursive search, so the source
    may be a split folder (``train-clean-100``) or any folder above it. The speaker
    is the name of the speaker folder.
``commonvoice``
    A Common Voice tsv (columns ``client_id``, ``path``, ``sentence``) with the clips
    in ``clips/`` beside it. The source is the tsv, or a folder holding
    ``validated.tsv`` (used if present) or else ``train.tsv``. The id is the clip's
    file name without extension; the speaker is ``client_id``.
``jsonl``
    An existing speechtl manifest, validated: every audio file's header is probed
    (honouring ``on_bad_audio``) and the same utterances are returned.

Transcripts are stored raw (normalisation happens at training time); only leading and
trailing whitespace is removed and runs of whitespace (including line breaks) become
one space.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, NamedTuple

from ...core.io import atomic_path
from ...data.audio import AUDIO_EXTENSIONS, AudioError, audio_info
from ...data.manifest import ManifestError, Utterance, read_manifest, write_manifest

logger = logging.getLogger(__name__)

FORMATS = ("folder", "csv", "tsv", "librispeech", "commonvoice", "jsonl")
BAD_AUDIO_POLICIES = ("error", "skip")


class PrepareError(ManifestError):
    """A corpus that cannot be turned into a manifest (missing transcript, column, file...).

    A subclass of :class:`speechtl.data.manifest.ManifestError`; the message names the file
    (and line, where there is one).
    """


@dataclass(frozen=True)
class PrepareOptions:
    """How :func:`prepare` reads a corpus. Durations are in seconds."""

    format: str = "folder"
    audio_column: str | int = "path"  # csv/tsv: column holding the audio path (name or 0-based index)
    text_column: str | int = "text"  # csv/tsv: column holding the transcript
    speaker_column: str | int | None = None  # csv/tsv: optional speaker column
    id_column: str | int | None = None  # csv/tsv: optional id column (else derived from the audio path)
    min_duration: float | None = None  # drop clips shorter than this
    max_duration: float | None = None  # drop clips longer than this
    max_minutes: float | None = None  # keep the first train clips (in corpus order) up to this much audio
    on_bad_audio: str = "error"  # "error": raise AudioError; "skip": record in PrepareResult.skipped
    dev_fraction: float = 0.0  # fraction of utterances split off as dev, in [0, 1)
    dev_by_speaker: bool = False  # split whole speakers into dev
    seed: int = 0  # seed of the dev split
    lang: str | None = None  # set on every utterance if given
    absolute_paths: bool = False  # write absolute audio paths in the manifests

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; expected one of {', '.join(FORMATS)}")
        if self.on_bad_audio not in BAD_AUDIO_POLICIES:
            raise ValueError(f"on_bad_audio must be 'error' or 'skip', not {self.on_bad_audio!r}")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError(f"dev_fraction must be in [0, 1), not {self.dev_fraction}")
        for name in ("min_duration", "max_duration", "max_minutes"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be non-negative, not {v}")
        if (
            self.min_duration is not None
            and self.max_duration is not None
            and self.min_duration > self.max_duration
        ):
            raise ValueError(f"min_duration ({self.min_duration}) exceeds max_duration ({self.max_duration})")


@dataclass
class PrepareResult:
    """What :func:`prepare` found. ``skipped`` holds ``(audio path, reason)`` pairs."""

    utterances: list[Utterance]  # train
    dev: list[Utterance] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    dropped_duration: int = 0  # clips outside [min_duration, max_duration]
    options: PrepareOptions | None = None


class Candidate(NamedTuple):
    """One utterance found by an importer, before its audio is probed."""

    id: str
    audio: str  # absolute path
    text: str
    speaker: str | None
    source: str  # where it came from ("file:line" or the audio path), for error messages
    utterance: Utterance | None = None  # jsonl: the utterance as read


# --------------------------------------------------------------------------- prepare


def prepare(source: str | os.PathLike, options: PrepareOptions | None = None) -> PrepareResult:
    """Read the corpus at ``source`` as described by ``options``.

    Raises :class:`PrepareError` (a :class:`~speechtl.data.manifest.ManifestError`) for a
    malformed corpus or duplicate ids, and with ``on_bad_audio="error"``
    :class:`~speechtl.data.audio.AudioError` for the first audio file that cannot be read
    (missing, empty, corrupt); its message names the file.
    """
    options = options or PrepareOptions()
    source = Path(source)
    if not source.exists():
        raise PrepareError(f"{source}: not found")
    skipped: list[tuple[str, str]] = []
    candidates = list(_IMPORTERS[options.format](source, options, skipped))
    _check_unique(candidates)

    utterances: list[Utterance] = []
    dropped = 0
    empty_text = 0
    mismatched = 0
    for c in candidates:
        try:
            info = audio_info(c.audio, samples=True)  # a float file with NaN samples is bad audio too
        except AudioError as e:
            if options.on_bad_audio == "error":
                raise
            logger.debug("skipping %s: %s", e.path, e.reason)
            skipped.append((e.path, e.reason))
            continue
        duration = round(info.duration, 4)
        if (options.min_duration is not None and duration < options.min_duration) or (
            options.max_duration is not None and duration > options.max_duration
        ):
            dropped += 1
            continue
        if not c.text:
            empty_text += 1
        if c.utterance is not None:  # jsonl: keep the utterance as it was
            u = c.utterance
            if abs(u.duration - duration) > 0.05:
                mismatched += 1
            if options.lang is not None:
                u = replace(u, lang=options.lang)
        else:
            u = Utterance(id=c.id, audio=c.audio, text=c.text, duration=duration, lang=options.lang, speaker=c.speaker)
        utterances.append(u)

    if skipped:
        logger.warning("skipped %d file(s) (see the skip report); first: %s: %s", len(skipped), *skipped[0])
    if dropped:
        logger.info(
            "dropped %d clip(s) outside the duration range [%s, %s] s",
            dropped,
            options.min_duration if options.min_duration is not None else 0,
            options.max_duration if options.max_duration is not None else "inf",
        )
    if empty_text:
        logger.warning("%d utterance(s) have an empty transcript", empty_text)
    if mismatched:
        logger.warning("%d utterance(s) have a manifest duration that differs from the file header by > 50 ms", mismatched)

    train, dev = split_dev(utterances, options.dev_fraction, by_speaker=options.dev_by_speaker, seed=options.seed)
    if options.max_minutes is not None:
        train = take_minutes(train, options.max_minutes)
    logger.info(
        "prepared %d utterance(s) (%.1f h) for train, %d for dev from %s",
        len(train),
        sum(u.duration for u in train) / 3600,
        len(dev),
        source,
    )
    return PrepareResult(utterances=train, dev=dev, skipped=skipped, dropped_duration=dropped, options=options)


def output_paths(out_path: str | os.PathLike, dev_out: str | os.PathLike | None = None,
                 skip_report: str | os.PathLike | None = None, dev: bool = True,
                 skipped: bool = True) -> dict[str, Path]:
    """The files :func:`write_prepared` writes, by the option that names them: the train
    manifest, the dev manifest (``dev``: if there is a dev set) and the skip report
    (``skipped``: if files were skipped), each at its default place unless given."""
    out_path = Path(out_path)
    paths = {"--out": out_path}
    if dev or dev_out is not None:
        paths["--dev-out"] = Path(dev_out) if dev_out is not None else out_path.with_name(f"{out_path.stem}.dev{out_path.suffix}")
    if skipped or skip_report is not None:
        paths["--skip-report"] = Path(skip_report) if skip_report is not None else out_path.with_suffix(".skipped.tsv")
    return paths


def check_output_paths(outputs: dict[str, Path], inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse, before anything is written, outputs that are the same file as each other or as
    an input (the source manifest or table, an audio file): writing one would destroy another."""
    def same(a: Path, b: Path) -> bool:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)

    named = list(outputs.items())
    for i, (opt, path) in enumerate(named):
        for other, path2 in named[:i]:
            if same(path, path2):
                raise ValueError(f"{other} and {opt} are the same file ({path}); give each its own path")
    existing = {}
    for opt, path in named:
        with contextlib.suppress(OSError):
            st = path.stat()
            existing[(st.st_dev, st.st_ino)] = (opt, path)
    if not existing:  # an input exists; outputs that do not cannot be one
        return
    for src in inputs:
        try:
            st = os.stat(src)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in existing:
            opt, path = existing[(st.st_dev, st.st_ino)]
            raise ValueError(f"{opt} {path} is an input of this command ({src}); writing it would destroy it. "
                             f"Write elsewhere")


def write_prepared(
    result: PrepareResult,
    out_path: str | os.PathLike,
    dev_out: str | os.PathLike | None = None,
    skip_report: str | os.PathLike | None = None,
    absolute: bool | None = None,
    source: str | os.PathLike | None = None,
) -> list[Path]:
    """Write the train manifest to ``out_path`` and return the paths written.

    The dev manifest (if there is a dev set) goes to ``dev_out``, by default
    ``<out stem>.dev<out suffix>`` beside ``out_path``. If files were skipped, a report
    goes to ``skip_report``, by default ``out_path`` with the suffix ``.skipped.tsv``;
    it is JSONL (``{"path", "reason"}`` per line) if its name ends in ``.jsonl``, else
    TSV with a ``path<TAB>reason`` header. ``absolute`` defaults to the options'
    ``absolute_paths``. Before anything is written, every path is checked against the others
    and against the inputs (``source``, the audio files): ValueError names a clash. Every file
    is written atomically.
    """
    out_path = Path(out_path)
    if absolute is None:
        absolute = bool(result.options and result.options.absolute_paths)
    paths = output_paths(out_path, dev_out, skip_report, dev=bool(result.dev), skipped=bool(result.skipped))
    inputs = [*([source] if source is not None else []), *(u.audio for u in (*result.utterances, *result.dev)),
              *(p for p, _ in result.skipped)]
    check_output_paths(paths, inputs)
    written = [write_manifest(out_path, result.utterances, absolute=absolute)]
    if "--dev-out" in paths:
        written.append(write_manifest(paths["--dev-out"], result.dev, absolute=absolute))
    if result.skipped:
        write_skip_report(paths["--skip-report"], result.skipped)
        written.append(paths["--skip-report"])
    return written


def write_skip_report(path: str | os.PathLike, skipped: Iterable[tuple[str, str]]) -> Path:
    """Write ``(path, reason)`` pairs atomically as JSONL (``.jsonl``) or TSV (otherwise)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        if path.suffix.lower() == ".jsonl":
            for p, reason in skipped:
                f.write(json.dumps({"path": str(p), "reason": reason}, ensure_ascii=False) + "\n")
        else:
            f.write("path\treason\n")
            for p, reason in skipped:
                f.write(f"{_one_line(str(p))}\t{_one_line(reason)}\n")
    return path


def take_minutes(utterances: list[Utterance], minutes: float) -> list[Utterance]:
    """The leading utterances whose durations first reach ``minutes`` of audio.

    Budgets taken this way from one corpus are nested: the 1-minute set is a prefix
    of the 10-minute set, which is a prefix of the 60-minute set.
    """
    kept: list[Utterance] = []
    total = 0.0
    for u in utterances:
        if total >= minutes * 60:
            break
        kept.append(u)
        total += u.duration
    if total < minutes * 60:
        logger.warning("asked for %.1f min of audio but the corpus holds only %.1f min", minutes, total / 60)
    return kept


def split_dev(
    utterances: list[Utterance], fraction: float, by_speaker: bool = False, seed: int = 0
) -> tuple[list[Utterance], list[Utterance]]:
    """Split ``utterances`` into (train, dev), deterministically for a given ``seed``.

    By utterance: ``round(fraction * n)`` random utterances (at least one, and never
    all). By speaker: whole speakers, taken in seeded random order until dev holds at
    least ``fraction`` of the utterances, never every speaker; utterances without a
    speaker always stay in train. Both lists keep the input order.
    """
    n = len(utterances)
    if fraction <= 0 or n == 0:
        return list(utterances), []
    rng = random.Random(seed)
    if not by_speaker:
        if n < 2:
            logger.warning("only %d utterance(s): no dev split", n)
            return list(utterances), []
        k = min(n - 1, max(1, round(fraction * n)))
        dev_idx = set(rng.sample(range(n), k))
    else:
        by_spk: dict[str, list[int]] = {}
        no_speaker = 0
        for i, u in enumerate(utterances):
            if u.speaker is None:
                no_speaker += 1
            else:
                by_spk.setdefault(u.speaker, []).append(i)
        if no_speaker:
            logger.warning("%d utterance(s) have no speaker and stay in train", no_speaker)
        speakers = sorted(by_spk)
        if len(speakers) < 2:
            logger.warning("%d speaker(s): cannot split dev by speaker", len(speakers))
            return list(utterances), []
        rng.shuffle(speakers)
        target = fraction * n
        dev_idx = set()
        for spk in speakers[:-1]:  # leave at least one speaker for train
            if len(dev_idx) >= target:
                break
            dev_idx.update(by_spk[spk])
        if len(dev_idx) < target:
            logger.warning("dev split by speaker reached only %d of %.0f utterance(s)", len(dev_idx), target)
    train = [u for i, u in enumerate(utterances) if i not in dev_idx]
    dev = [u for i, u in enumerate(utterances) if i in dev_idx]
    return train, dev


# --------------------------------------------------------------------------- importers


def _import_folder(root: Path, options: PrepareOptions, skipped: list) -> Iterable[Candidate]:
    if not root.is_dir():
        raise PrepareError(f"{root}: not a folder (format 'folder' needs a folder of audio and .txt files)")
    n_audio = 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() not in AUDIO_EXTENSIONS or not path.is_file():
            continue
        n_audio += 1
        audio = os.path.abspath(path)
        transcript = path.with_suffix(".txt")
        if not transcript.is_file():
            reason = f"no transcript: expected {transcript.name} beside the audio"
            if options.on_bad_audio == "error":
                raise PrepareError(f"{path}: {reason}")
            skipped.append((audio, reason))
            continue
        text = _clean(_read_text(transcript))
        speaker = rel.parent.name if len(rel.parts) > 1 else None
        yield Candidate(_id_from_path(rel), audio, text, speaker, audio)
    if n_audio == 0:
        raise PrepareError(f"{root}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found")


def _import_csv(path: Path, options: PrepareOptions, skipped: list) -> Iterable[Candidate]:
    return _import_delimited(path, options, "\t" if options.format == "tsv" else ",")


def _import_delimited(path: Path, options: PrepareOptions, delimiter: str) -> Iterable[Candidate]:
    if not path.is_file():
        raise PrepareError(f"{path}: not a file (format {options.format!r} needs a {options.format} file)")
    base = Path(os.path.abspath(path.parent))
    rows = _read_table(path, delimiter)
    try:
        header = next(rows)[1]
    except StopIteration:
        raise PrepareError(f"{path}: empty file (expected a header row)") from None
    audio_i = _column(header, options.audio_column, "audio", path)
    text_i = _column(header, options.text_column, "text", path)
    spk_i = None if options.speaker_column is None else _column(header, options.speaker_column, "speaker", path)
    id_i = None if options.id_column is None else _column(header, options.id_column, "id", path)
    needed = max(i for i in (audio_i, text_i, spk_i, id_i) if i is not None)
    for where, row in _data_rows(rows, path, needed):
        audio_rel = row[audio_i].strip()
        if not audio_rel:
            raise PrepareError(f"{where}: empty audio path")
        audio_path = Path(audio_rel) if os.path.isabs(audio_rel) else base / audio_rel
        audio = os.path.abspath(audio_path)
        if id_i is not None:
            uid = row[id_i].strip()
            if not uid:
                raise PrepareError(f"{where}: empty id")
        else:
            uid = _id_from_path(_relative_or_name(Path(audio), base))
        speaker = (row[spk_i].strip() or None) if spk_i is not None else None
        yield Candidate(uid, audio, _clean(row[text_i]), speaker, where)


def _import_librispeech(root: Path, options: PrepareOptions, skipped: list) -> Iterable[Candidate]:
    if not root.is_dir():
        raise PrepareError(f"{root}: not a folder (format 'librispeech' needs the corpus folder)")
    trans_files = sorted(p for p in root.rglob("*.trans.txt") if p.is_file())
    if not trans_files:
        raise PrepareError(f"{root}: no *.trans.txt files found (is this a LibriSpeech folder?)")
    for trans in trans_files:
        folder = Path(os.path.abspath(trans.parent))
        speaker = folder.parent.name
        with open(trans, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                uid, _, text = line.partition(" ")
                audio = os.path.abspath(folder / f"{uid}.flac")
                yield Candidate(uid, audio, _clean(text), speaker, f"{trans}:{lineno}")


def _import_commonvoice(source: Path, options: PrepareOptions, skipped: list) -> Iterable[Candidate]:
    if source.is_dir():
        for name in ("validated.tsv", "train.tsv"):
            if (source / name).is_file():
                tsv = source / name
                break
        else:
            raise PrepareError(f"{source}: neither validated.tsv nor train.tsv found")
        if tsv.name == "validated.tsv":
            logger.warning(
                "%s: using validated.tsv, which includes Common Voice's dev and test clips; "
                "pass train.tsv instead to keep them out of training",
                source,
            )
    else:
        tsv = source
    clips = Path(os.path.abspath(tsv.parent)) / "clips"
    rows = _read_table(tsv, "\t")
    try:
        header = next(rows)[1]
    except StopIteration:
        raise PrepareError(f"{tsv}: empty file (expected a header row)") from None
    spk_i = _column(header, "client_id", "speaker", tsv)
    path_i = _column(header, "path", "audio", tsv)
    text_i = _column(header, "sentence", "text", tsv)
    needed = max(spk_i, path_i, text_i)
    for where, row in _data_rows(rows, tsv, needed):
        name = row[path_i].strip()
        if not name:
            raise PrepareError(f"{where}: empty path")
        audio = clips / name
        if not Path(name).suffix and not audio.exists():  # very old releases omit ".mp3"
            audio = clips / f"{name}.mp3"
        uid = Path(name).stem if Path(name).suffix else name
        yield Candidate(uid, os.path.abspath(audio), _clean(row[text_i]), row[spk_i].strip() or None, where)


def _import_jsonl(path: Path, options: PrepareOptions, skipped: list) -> Iterable[Candidate]:
    if not path.is_file():
        raise PrepareError(f"{path}: not a file (format 'jsonl' needs a manifest)")
    # files are checked below with audio_info, which honours on_bad_audio
    for u in read_manifest(path, check_files=False):
        yield Candidate(u.id, u.audio, u.text, u.speaker, f"{path} (id {u.id})", u)


_IMPORTERS = {
    "folder": _import_folder,
    "csv": _import_csv,
    "tsv": _import_csv,
    "librispeech": _import_librispeech,
    "commonvoice": _import_commonvoice,
    "jsonl": _import_jsonl,
}


# --------------------------------------------------------------------------- helpers


def _check_unique(candidates: list[Candidate]) -> None:
    first: dict[str, Candidate] = {}
    for c in candidates:
        prev = first.setdefault(c.id, c)
        if prev is not c:
            raise PrepareError(f"duplicate id {c.id!r}: {prev.source} and {c.source}")


def _read_table(path: Path, delimiter: str):
    """Yield (line number, fields) for each record; tsv is read without quoting."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            start = 1
            for row in reader:
                yield start, row
                start = reader.line_num + 1
    except csv.Error as e:
        raise PrepareError(f"{path}: malformed {'tsv' if delimiter == chr(9) else 'csv'} ({e})") from None
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None



def _data_rows(rows, path, needed: int):
    """Non-blank rows as ``("file:line", row)``; a row too short for column ``needed`` is an error."""
    for lineno, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}:{lineno}"
        if len(row) <= needed:
            raise PrepareError(f"{where}: expected at least {needed + 1} field(s), found {len(row)}")
        yield where, row

def _column(header: list[str], col: str | int, what: str, path: Path) -> int:
    names = [h.strip() for h in header]
    if isinstance(col, str) and col in names:
        return names.index(col)
    if isinstance(col, int) and not isinstance(col, bool) and 0 <= col < len(names):
        return col
    if isinstance(col, str) and col.isdigit() and int(col) < len(names):
        return int(col)
    raise PrepareError(f"{path}: no {what} column {col!r}; columns are: {', '.join(names)}")


def _id_from_path(rel: Path) -> str:
    return rel.with_suffix("").as_posix().replace("/", "-")


def _relative_or_name(path: Path, base: Path) -> Path:
    """``path`` relative to ``base`` if it lies under it, else just its name."""
    try:
        return path.relative_to(base)
    except ValueError:
        return Path(path.name)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: transcript is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _clean(text: str) -> str:
    return " ".join(text.split())


def _one_line(s: str) -> str:
    return " ".join(s.split())
