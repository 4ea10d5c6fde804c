"""The JSONL manifest: the contract between preparation, training and evaluation.

One utterance per line::

    {"id": "spk1-0001", "audio": "wavs/spk1-0001.wav", "text": "hello world",
     "duration": 1.83, "lang": "en", "speaker": "spk1"}

``audio`` is relative to the manifest's folder, or absolute. ``duration`` is in
seconds. ``lang`` and ``speaker`` are optional. This module is the only place that
reads or writes manifests.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from ..core.io import atomic_path

REQUIRED_FIELDS = ("id", "audio", "text", "duration")


class ManifestError(ValueError):
    """A manifest that fails validation; the message names the file and line."""


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: str  # absolute path once loaded
    text: str
    duration: float  # seconds
    lang: str | None = None
    speaker: str | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    # a speed-perturbed training copy plays its audio this many times as fast (see
    # loader.speed_copies); never read from a manifest, and written only when not 1
    speed: float = 1.0

    def to_json(self, relative_to: Path | None = None) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        if d["speed"] == 1:
            del d["speed"]
        if relative_to is not None:
            try:
                d["audio"] = os.path.relpath(self.audio, relative_to)
            except ValueError:  # different drive
                pass
        for k in ("lang", "speaker"):
            if d[k] is None:
                del d[k]
        d.update(extra)
        return d


def read_manifest(path: str | os.PathLike, check_files: bool = True, unlabelled: bool = False) -> list[Utterance]:
    """Read and validate a manifest. Audio paths come back absolute.

    Raises :class:`ManifestError` naming the line for a line that is not JSON, a
    missing or mistyped field, a duplicate id, or (with ``check_files``) a missing
    audio file. ``unlabelled``: a manifest of audio without transcripts, where a
    ``text`` field is an error (so that labelled data is not mistaken for unlabelled);
    texts come back empty.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    base = path.resolve().parent
    utts: list[Utterance] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark, as some editors write, is no part of line 1
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ManifestError(f"{where}: expected a JSON object")
            if unlabelled:
                if "text" in obj:
                    raise ManifestError(f"{where}: an unlabelled manifest has no 'text' field (this line has one: "
                                        "labelled clips belong in the training manifest)")
                obj["text"] = ""
            missing = [k for k in REQUIRED_FIELDS if k not in obj]
            if missing:
                raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
            uid, audio, text, duration = (obj.pop(k) for k in REQUIRED_FIELDS)
            if not isinstance(uid, str) or not uid:
                raise ManifestError(f"{where}: 'id' must be a non-empty string")
            if not isinstance(audio, str) or not audio:
                raise ManifestError(f"{where}: 'audio' must be a non-empty string")
            if not isinstance(text, str):
                raise ManifestError(f"{where}: 'text' must be a string")
            if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0 <= duration < math.inf:
                raise ManifestError(f"{where}: 'duration' must be a non-negative number of seconds")
            if uid in seen:
                raise ManifestError(f"{where}: duplicate id {uid!r} (first on line {seen[uid]})")
            seen[uid] = lineno
            audio_path = Path(audio) if os.path.isabs(audio) else Path(os.path.normpath(base / audio))
            if check_files and not audio_path.is_file():
                raise ManifestError(f"{where}: audio file not found: {audio_path}")
            lang = obj.pop("lang", None)
            speaker = obj.pop("speaker", None)
            utts.append(
                Utterance(
                    id=uid,
                    audio=str(audio_path),
                    text=text,
                    duration=float(duration),
                    lang=None if lang is None else str(lang),
                    speaker=None if speaker is None else str(speaker),
                    extra=obj,
                )
            )
    return utts


def write_manifest(path: str | os.PathLike, utterances: Iterable[Utterance], absolute: bool = False) -> Path:
    """Write ``utterances`` atomically; audio paths are made relative unless ``absolute``."""
    path = Path(path)
    base = None if absolute else path.resolve().parent
    seen: set[str] = set()
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for u in utterances:
            if u.id in seen:
                raise ManifestError(f"{path}: duplicate id {u.id!r}")
            seen.add(u.id)
            audio = str(Path(u.audio).absolute()) if absolute else str(Path(u.audio).resolve())
            f.write(json.dumps(Utterance(**{**asdict(u), "audio": audio}).to_json(base), ensure_ascii=False) + "\n")
    return path


def total_duration(utterances: Iterable[Utterance]) -> float:
    return float(sum(u.duration for u in utterances))
