"""Downloading, checking and extracting the archives a recipe needs.

:func:`fetch_archives` makes each :class:`Archive`'s contents present in a data folder: an
archive already there is checked and extracted, a missing one is downloaded when asked (from
its publisher, or a mirror), and otherwise reported with its address and the path to put it
at. Checksums come from a file the user gives (``md5sum``/``sha256sum`` output); without
one, the sha256 of each archive is recorded in ``DATA/SHA256SUMS`` the first time it is used
and later uses are checked against it. Downloads and extractions go through temporary names,
so an interrupted one never looks complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .importers import PrepareError

logger = logging.getLogger(__name__)


class ArchiveError(PrepareError):
    """An archive that is missing, fails its checksum or cannot be extracted; the message
    names the file (and, for a missing one, where to get it)."""


@dataclass(frozen=True)
class Archive:
    """A file a recipe needs: where it is published, and the folder inside it that it
    extracts to (None: the file is used as it is)."""

    name: str
    url: str
    extracts_to: str | None


def file_hash(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_checksums(path: str | os.PathLike) -> dict[str, str]:
    """``{file name: hex digest}`` from ``sha256sum``/``md5sum`` output (``HASH  NAME``)."""
    out = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) not in (32, 64):
            raise ArchiveError(f"{path}:{lineno}: expected 'HASH  FILE' (an md5 or sha256 digest and a file name)")
        out[Path(parts[1].lstrip("*")).name] = parts[0].lower()
    return out


def verify_archive(path: Path, expected: dict[str, str], record: Path) -> str:
    """Check ``path`` against ``expected[name]`` (md5 or sha256 by length), else against the
    sha256 recorded in ``record`` by an earlier run; with neither, record it there. Returns
    what was done, for the log."""
    name = path.name
    if name in expected:
        want = expected[name]
        got = file_hash(path, "md5" if len(want) == 32 else "sha256")
        if got != want:
            raise ArchiveError(f"{path}: checksum mismatch: expected {want}, got {got} (delete the file to fetch it again)")
        return f"{name}: checksum matches"
    recorded = read_checksums(record) if record.is_file() else {}
    got = file_hash(path)
    if name in recorded:
        if got != recorded[name]:
            raise ArchiveError(f"{path}: sha256 {got} differs from {recorded[name]}, recorded in {record} when it "
                               f"was first used (delete the file to fetch it again)")
        return f"{name}: sha256 matches {record}"
    with open(record, "a", encoding="utf-8") as f:
        f.write(f"{got}  {name}\n")
    return (f"{name}: no published checksum given; its sha256 {got} is recorded in {record}, and later runs "
            f"check against it (compare it with the publisher's, or give a checksum file)")


def download(url: str, dest: Path) -> None:
    """Fetch ``url`` to ``dest`` through a temporary name, so that an interrupted download never
    looks complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    logger.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            total, done, step = int(r.headers.get("Content-Length") or 0), 0, 1 << 27
            while block := r.read(1 << 20):
                f.write(block)
                done += len(block)
                if done // step > (done - len(block)) // step:  # every 128 MiB
                    logger.info("%s: %d MiB%s", dest.name, done >> 20, f" of {total >> 20}" if total else "")
    except OSError as e:
        part.unlink(missing_ok=True)
        raise ArchiveError(f"{url}: {e}") from None
    os.replace(part, dest)


def extract(archive: Path, member: str, into: Path) -> None:
    """Extract ``archive`` and move its ``member`` folder to ``into/member`` in one rename."""
    tmp = into / f".extract-{archive.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    logger.info("extracting %s", archive)
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # Python before 3.11.4
                tar.extractall(tmp)
        if not (tmp / member).is_dir():
            raise ArchiveError(f"{archive}: holds no {member}/ folder")
        (into / member).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / member, into / member)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"{archive}: cannot extract ({e}); delete it to fetch it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_archives(data: str | os.PathLike, archives: list[Archive], download_missing: bool = False,
                   mirror: str | None = None, checksums: str | os.PathLike | None = None) -> list[str]:
    """Make every archive's contents present under ``data``: extract archives already there,
    download missing ones when ``download_missing`` (from ``mirror/NAME`` when given), and
    check each archive used (:func:`verify_archive`). Without ``download_missing``, a missing
    file is an error that says what to fetch and where to put it. Returns log lines."""
    data = Path(data)
    expected = read_checksums(checksums) if checksums else {}
    record = data / "SHA256SUMS"
    notes, missing = [], []
    failed = None  # after one failed download, the rest are listed rather than tried
    for a in archives:
        path = data / a.name
        if a.extracts_to and (data / a.extracts_to).is_dir():
            continue
        fresh = False
        if not path.is_file():
            if not download_missing or failed:
                missing.append(a)
                continue
            try:
                download(f"{mirror.rstrip('/')}/{a.name}" if mirror else a.url, path)
            except ArchiveError as e:
                failed = str(e)
                missing.append(a)
                continue
            fresh = True
        # archives are checked when they are used: on extraction, or (a file used as it is)
        # when it arrives or a checksum is given for it
        if a.extracts_to or fresh or a.name in expected:
            notes.append(verify_archive(path, expected, record))
        if a.extracts_to:
            extract(path, a.extracts_to, data)
            notes.append(f"{a.name}: extracted to {data / a.extracts_to}")
    if missing:
        lines = "\n".join(f"  {a.url}\n      -> {data / a.name}" for a in missing)
        how = (f"downloading failed ({failed}); fetch them elsewhere" if failed else
               "download them (the recipe's --download does, where this machine can reach them)")
        raise ArchiveError(f"{data}: missing {len(missing)} file(s); {how} and place them at:\n{lines}")
    return notes
