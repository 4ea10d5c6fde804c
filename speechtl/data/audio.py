"""Audio I/O: read any file soundfile or librosa can decode, as 16 kHz mono float32.

soundfile (libsndfile) reads wav at any bit depth, flac, ogg and mp3; librosa
(audioread) is the fallback for what libsndfile cannot open. Resampling uses
soxr's high-quality mode through librosa.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".aac", ".wma", ".aiff", ".aif")


class AudioError(Exception):
    """An audio file that cannot be read. The message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class AudioInfo:
    """What the file header says: native sample rate, channels, duration in seconds."""

    sample_rate: int
    channels: int
    duration: float
    subtype: str = ""  # libsndfile's sample format (PCM_16, FLOAT, ...); empty when another decoder read it


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise AudioError(path, "file not found")
    if not path.is_file():
        raise AudioError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)")


# sample formats that can hold NaN or infinity; integer PCM and the lossy codecs' integer output cannot
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")


def audio_info(path: str | os.PathLike, samples: bool = False) -> AudioInfo:
    """Read duration and format from the header, without decoding the samples.

    Falls back to a full decode only for formats libsndfile cannot open. ``samples``: also
    check that a float file (the only kind that can hold them) has no NaN or infinite
    samples, reading it in blocks, so that a job that skips bad files skips this one at its
    start, not when it meets it half-way.
    """
    path = Path(path)
    _check_exists(path)
    try:
        info = sf.info(str(path))
        if info.frames <= 0 or info.samplerate <= 0:
            raise AudioError(path, "no audio frames in file")
        if samples and info.subtype in FLOAT_SUBTYPES:
            _check_finite(path)
        return AudioInfo(info.samplerate, info.channels, info.frames / info.samplerate, info.subtype)
    except AudioError:
        raise
    except Exception as sf_err:  # libsndfile could not open it; try librosa
        try:
            import librosa

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sr = librosa.get_samplerate(str(path))
                duration = librosa.get_duration(path=str(path))
            if duration <= 0:
                raise AudioError(path, "no audio frames in file")
            return AudioInfo(int(sr), 0, float(duration))
        except AudioError:
            raise
        except Exception:
            raise AudioError(path, f"cannot decode audio ({_reason(sf_err)})") from None


def _check_finite(path: Path, block_seconds: int = 60) -> None:
    with sf.SoundFile(str(path)) as f:
        for block in f.blocks(blocksize=block_seconds * f.samplerate, dtype="float32"):
            if not np.isfinite(block).all():
                raise AudioError(path, NON_FINITE)


NON_FINITE = "audio contains NaN or infinite samples"


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = SAMPLE_RATE,
    offset: float = 0.0,
    duration: float | None = None,
) -> np.ndarray:
    """Load ``path`` as mono float32 in [-1, 1] at ``sample_rate``.

    ``offset`` and ``duration`` (seconds) read a window of the file, which lets long
    recordings be processed in blocks. Returns a 1-D array of samples.
    """
    path = Path(path)
    _check_exists(path)
    try:
        with sf.SoundFile(str(path)) as f:
            native_sr = f.samplerate
            start = int(round(offset * native_sr))
            if start:
                f.seek(min(start, f.frames))
            frames = -1 if duration is None else int(round(duration * native_sr))
            data = f.read(frames=frames, dtype="float32", always_2d=True)
    except Exception as sf_err:
        try:
            import librosa

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data, native_sr = librosa.load(
                    str(path), sr=None, mono=False, offset=offset, duration=duration, dtype=np.float32
                )
            data = np.atleast_2d(data).T  # (samples, channels)
        except Exception:
            raise AudioError(path, f"cannot decode audio ({_reason(sf_err)})") from None
    if data.size == 0 and offset == 0:
        raise AudioError(path, "no audio frames in file")
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    wav = resample(wav, native_sr, sample_rate)
    if not np.all(np.isfinite(wav)):
        raise AudioError(path, NON_FINITE)
    return np.ascontiguousarray(wav, dtype=np.float32)


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """High-quality (soxr HQ) resampling of a 1-D float array to ``ceil(len * target / orig)``
    samples, as ``librosa.resample(res_type="soxr_hq")`` gives, without importing librosa
    (which imports scipy.signal and numba: seconds of a short command's start-up)."""
    if orig_sr == target_sr or wav.size == 0:
        return wav
    import soxr

    n = int(np.ceil(wav.shape[-1] * float(target_sr) / orig_sr))
    out = soxr.resample(wav, orig_sr, target_sr, quality="soxr_hq")
    if out.shape[-1] > n:
        out = out[:n]
    elif out.shape[-1] < n:
        out = np.pad(out, (0, n - out.shape[-1]))
    return np.asarray(out, dtype=wav.dtype)


def change_speed(wav: np.ndarray, factor: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Play ``wav`` ``factor`` times as fast (Kaldi-style speed perturbation): tempo and pitch
    change together, and the length becomes ``len / factor``. Done by resampling, as if the
    samples had been recorded at ``sample_rate * factor``."""
    if factor == 1:
        return wav
    return resample(wav, int(round(sample_rate * factor)), sample_rate)


def write_wav(path: str | os.PathLike, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write 16-bit PCM wav."""
    sf.write(str(path), np.asarray(wav), sample_rate, subtype="PCM_16")


def _reason(err: Exception) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    # libsndfile repeats the path in its message; keep only the reason
    if "Error opening" in msg and ":" in msg:
        msg = msg.rsplit(":", 1)[-1].strip()
    return msg or type(err).__name__


def duration_mismatch(stated: float, real: float) -> str | None:
    """Why a manifest's ``duration`` cannot be trusted for a clip whose header says ``real``
    seconds, or None: batches are cut and long clips dropped by the stated lengths, so a
    1-hour file listed as 2 s would pass every cap. A codec's padding and rounding pass."""
    if abs(stated - real) <= max(0.5, 0.05 * real):
        return None
    return (f"the manifest says {stated:g} s but the audio is {real:.2f} s long (rewrite the durations from the "
            f"files: speechtl prepare MANIFEST --format jsonl --out NEW.jsonl)")


def check_readable(utterances, on_bad_audio: str = "error", fix_hint: str = "") -> tuple[list, list[dict]]:
    """Read every utterance's audio header before a long job, so that a broken or missing
    file, a float file with NaN or infinite samples, or a clip whose ``duration`` is not its
    real length stops it at the start with all such files named (``"error"``, ``fix_hint``
    appended to the message), or is left out and logged (``"skip"``).
    Returns the readable utterances and ``{id, audio, reason}`` for each bad one."""
    if on_bad_audio not in ("error", "skip"):
        raise ValueError(f"on_bad_audio must be 'error' or 'skip', not {on_bad_audio!r}")
    good, bad = [], []
    for u in utterances:
        try:
            info = audio_info(u.audio, samples=True)
        except AudioError as e:
            bad.append({"id": u.id, "audio": u.audio, "reason": e.reason})
            continue
        stated = getattr(u, "duration", None)
        wrong = None if stated is None else duration_mismatch(stated, info.duration / getattr(u, "speed", 1.0))
        if wrong:
            bad.append({"id": u.id, "audio": u.audio, "reason": wrong})
        else:
            good.append(u)
    if bad and on_bad_audio == "error":
        lines = [f"{b['id']}: {b['audio']}: {b['reason']}" for b in bad[:10]]
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(f"{len(bad)} unreadable audio file(s){fix_hint}:\n  " + "\n  ".join(lines) + more)
    for b in bad:
        logger.warning("skipped %s (%s): %s", b["id"], b["audio"], b["reason"])
    return good, bad
