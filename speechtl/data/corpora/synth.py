"""Build a labelled speech corpus for any espeak-ng language.

Text comes from a file (one sentence per line) or from random sequences of the
language's most frequent words (wordfreq). Each utterance is spoken by one of
``n_speakers`` synthetic "speakers": an espeak voice variant with a speaking rate
(words per minute) and pitch (0-99). Audio is written as 16 kHz mono 16-bit wav
beside a ``manifest.jsonl``.

Every random choice is drawn from ``random.Random(seed)`` in a fixed order, so the
corpus (texts, speakers, wav bytes) depends only on the configuration, not on the
number of workers or on timing.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
import unicodedata
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ...core.cpus import cpu_threads
from ...data.audio import SAMPLE_RATE, resample, write_wav
from ...data.manifest import Utterance, write_manifest
from ...data.text import Normalizer

logger = logging.getLogger(__name__)

DEFAULT_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
    "croak", "klatt", "klatt2", "klatt3", "whisper",
)  # fmt: skip
ESPEAK_SAMPLE_RATE = 22_050  # what espeak-ng -w writes
TRIM_TOP_DB = 40.0  # silence threshold below peak, dB
TRIM_MARGIN_S = 0.1  # silence kept at each end after trimming, seconds
# espeak voice -> wordfreq language, where stripping the region is not enough
_WORDFREQ_ALIASES = {"cmn": "zh", "hr": "sh", "sr": "sh", "bs": "sh", "no": "nb", "tl": "fil"}
_VOWELS = set("aeiouyаеёиоуыэюяαεηιουω")


@dataclass(frozen=True)
class SynthConfig:
    """What to synthesise. ``minutes`` is the target total audio length in minutes;
    ``rate_range`` is in words per minute, ``pitch_range`` on espeak's 0-99 scale,
    both inclusive. ``speakers``, when given, replaces ``variants`` as the pool of
    voice variants (e.g. held-out voices for a test set)."""

    lang: str  # espeak voice name: "cs", "en-us", "pt-br"
    minutes: float
    out_dir: str | os.PathLike
    seed: int = 0
    text_file: str | os.PathLike | None = None  # one sentence per line; None: wordfreq
    min_words: int = 2
    max_words: int = 10
    vocab_size: int = 3000  # top-N wordfreq words
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    rate_range: tuple[int, int] = (130, 200)
    pitch_range: tuple[int, int] = (30, 70)
    n_speakers: int = 12
    workers: int = field(default_factory=cpu_threads)
    noise_snr_db: float | None = None  # white noise at this SNR (dB); None: clean
    prefix: str = ""  # prepended to every utterance id
    speakers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Speaker:
    variant: str
    rate: int  # words per minute
    pitch: int  # 0-99

    def name(self, lang: str) -> str:
        variant = f"-{self.variant}" if self.variant else ""
        return f"{lang}{variant}-r{self.rate}-p{self.pitch}"


@dataclass(frozen=True)
class UttSpec:
    index: int
    id: str
    text: str  # normalised; both what espeak reads and the transcript
    speaker: Speaker


def check_espeak() -> str:
    """Return the path of espeak-ng, or raise RuntimeError saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("espeak-ng not found; install it with: apt-get install espeak-ng")
    return path


def list_variants() -> list[str]:
    """Names of the voice variants espeak-ng knows (``!v/m1`` -> ``m1``), usable as ``-v LANG+NAME``."""
    out = subprocess.run([check_espeak(), "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = []
    for line in out.splitlines()[1:]:
        m = re.search(r"!v/(.+?)\s*(\(.*\))?\s*$", line)
        if m:
            names.append(m.group(1))
    return names


def is_mbrola(lang: str) -> bool:
    """True for espeak-ng's MBROLA voices ("mb-de1"): diphones cut from human recordings."""
    return lang.startswith("mb-")


def mbrola_language(voice: str) -> str:
    """The language an MBROLA voice speaks, from ``espeak-ng --voices=mb`` ("mb-de1" -> "de")."""
    out = subprocess.run([check_espeak(), "--voices=mb"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5 and cols[4].split("/")[-1] == voice:
            return cols[1]
    raise ValueError(f"espeak-ng lists no MBROLA voice {voice!r}; see espeak-ng --voices=mb")


def wordfreq_lang(lang: str) -> str:
    """Map an espeak voice name to a wordfreq language code ("en-us" -> "en", "cmn" -> "zh",
    "mb-de1" -> "de")."""
    if is_mbrola(lang):
        lang = mbrola_language(lang)
    base = lang.lower().split("-")[0]
    return _WORDFREQ_ALIASES.get(base, base)


def _load_lines(path: str | os.PathLike, normalizer: Normalizer) -> list[str]:
    lines, digits = [], 0
    with open(path, encoding="utf-8") as f:
        for raw in f:
            text = normalizer(raw)
            if not text:
                continue
            if any(ch.isdigit() for ch in text):  # espeak would say the number, the label would not
                digits += 1
                continue
            lines.append(text)
    if digits:
        logger.warning("%s: skipped %d line(s) containing digits", path, digits)
    if not lines:
        raise ValueError(f"{path}: no usable text lines")
    return lines


def _load_words(lang: str, vocab_size: int, normalizer: Normalizer) -> list[str]:
    import wordfreq

    code = wordfreq_lang(lang)
    if code not in wordfreq.available_languages():
        raise ValueError(
            f"wordfreq has no word list for espeak language {lang!r} (looked for {code!r}); "
            "pass text_file with one sentence per line instead"
        )
    words = []
    for w in wordfreq.top_n_list(code, vocab_size):
        if normalizer(w) != w or not w.replace("'", "").isalpha() or w.startswith("'") or w.endswith("'"):
            continue
        # espeak spells out lone letters ("s" -> "ess"); keep only vowels and uncased scripts (CJK)
        if len(w) == 1 and w.upper() != w.lower():
            if unicodedata.normalize("NFD", w)[0] not in _VOWELS:
                continue
        words.append(w)
    if not words:
        raise ValueError(f"wordfreq list for {code!r} has no usable words; pass text_file instead")
    return words


def make_speakers(config: SynthConfig, rng: random.Random) -> list[Speaker]:
    """Draw ``n_speakers`` distinct (variant, rate, pitch) profiles, spreading the variants evenly."""
    pool = [""] if is_mbrola(config.lang) else list(config.speakers or config.variants)
    if not pool or config.n_speakers < 1:
        raise ValueError("need at least one voice variant and n_speakers >= 1")
    rng.shuffle(pool)
    speakers: list[Speaker] = []
    for i in range(config.n_speakers):
        for _ in range(100):  # redraw a rare duplicate profile
            s = Speaker(pool[i % len(pool)], rng.randint(*config.rate_range), rng.randint(*config.pitch_range))
            if s not in speakers:
                break
        speakers.append(s)
    return speakers


def utterance_specs(config: SynthConfig) -> Iterator[UttSpec]:
    """The endless, seed-determined stream of utterances to synthesise, in index order."""
    if not 1 <= config.min_words <= config.max_words:
        raise ValueError("need 1 <= min_words <= max_words")
    normalizer = Normalizer()
    rng = random.Random(config.seed)
    speakers = make_speakers(config, rng)
    if config.text_file is not None:
        lines, words = _load_lines(config.text_file, normalizer), None
    else:
        lines, words = None, _load_words(config.lang, config.vocab_size, normalizer)
    order: list[int] = []
    index = 0
    while True:
        if lines is not None:  # each line once per pass, in a fresh order every pass
            if not order:
                order = list(range(len(lines)))
                rng.shuffle(order)
            text = lines[order.pop()]
        else:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(config.min_words, config.max_words)))
        speaker = speakers[rng.randrange(len(speakers))]
        yield UttSpec(index, f"{config.prefix}{config.lang}-{index:06d}", text, speaker)
        index += 1


def _trim(wav: np.ndarray, sr: int, frame_s: float = 0.046, hop_s: float = 0.0116) -> np.ndarray:
    """Cut leading/trailing silence (frames more than TRIM_TOP_DB below the loudest
    frame), keeping TRIM_MARGIN_S seconds at each end. Frame and hop are in seconds."""
    frame, hop = max(1, int(frame_s * sr)), max(1, int(hop_s * sr))
    if wav.size == 0 or not np.any(wav):
        return wav
    padded = np.pad(wav, (0, max(0, frame - wav.size)))
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame)[::hop]
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    loud = np.nonzero(rms > rms.max() * 10 ** (-TRIM_TOP_DB / 20))[0]
    margin = int(TRIM_MARGIN_S * sr)
    start, end = loud[0] * hop, min(wav.size, loud[-1] * hop + frame)
    return wav[max(0, start - margin) : min(wav.size, end + margin)]


def _synth_one(spec: UttSpec, lang: str, wav_dir: Path, tmp_dir: Path, noise_snr_db: float | None, seed: int) -> Utterance:
    """Synthesise one utterance to ``wav_dir/{id}.wav`` (16 kHz); duration in seconds."""
    import soundfile as sf

    s = spec.speaker
    tmp = tmp_dir / f"{spec.id}.wav"
    voice = f"{lang}+{s.variant}" if s.variant else lang  # MBROLA voices take no variant
    cmd = [check_espeak(), "-b", "1", "-v", voice, "-s", str(s.rate), "-p", str(s.pitch),
           "--ipa", "-w", str(tmp), "--stdin"]  # fmt: skip
    # text on stdin: a leading "-" can never be taken for an option
    proc = subprocess.run(cmd, input=spec.text.encode("utf-8"), capture_output=True, timeout=300)
    if proc.returncode != 0 or not tmp.is_file():
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise RuntimeError(f"espeak-ng failed for utterance {spec.id} (exit {proc.returncode}): {err}")
    wav, sr = sf.read(str(tmp), dtype="float32")
    tmp.unlink()
    if wav.ndim > 1:
        wav = wav.mean(axis=1)
    wav = _trim(wav, sr)
    if wav.size == 0:
        raise RuntimeError(f"espeak-ng produced no audio for utterance {spec.id}: {spec.text!r}")
    wav = resample(wav, sr, SAMPLE_RATE).astype(np.float32)
    if noise_snr_db is not None:
        noise_rng = np.random.default_rng([seed, spec.index])
        power = float(np.mean(wav.astype(np.float64) ** 2))
        wav = wav + noise_rng.standard_normal(wav.size).astype(np.float32) * math.sqrt(power / 10 ** (noise_snr_db / 10))
    wav = np.clip(wav, -1.0, 1.0)
    out = wav_dir / f"{spec.id}.wav"
    part = wav_dir / f"{spec.id}.part.wav"
    write_wav(part, wav, SAMPLE_RATE)
    os.replace(part, out)
    # espeak prints the IPA phonemes it spoke: language-universal pretraining targets
    phonemes = " ".join(proc.stdout.decode("utf-8", "replace").split())
    return Utterance(spec.id, str(out.resolve()), spec.text, round(wav.size / SAMPLE_RATE, 4), lang, s.name(lang),
                     extra={"phonemes": phonemes})


def synth_utterances(
    specs: Sequence[UttSpec],
    out_dir: str | os.PathLike,
    lang: str,
    workers: int = 1,
    noise_snr_db: float | None = None,
    seed: int = 0,
    pbar=None,
) -> list[Utterance]:
    """Synthesise ``specs`` in parallel into ``out_dir/wavs``; results come back in spec order."""
    wav_dir = Path(out_dir) / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    results: list[Utterance | None] = [None] * len(specs)
    with tempfile.TemporaryDirectory(prefix="speechtl-synth-") as tmp, ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {pool.submit(_synth_one, s, lang, wav_dir, Path(tmp), noise_snr_db, seed): i for i, s in enumerate(specs)}
        try:
            for fut in as_completed(futures):
                utt = fut.result()
                results[futures[fut]] = utt
                if pbar is not None:  # progress in seconds of audio, capped at the bar's total
                    pbar.update(max(0.0, min(utt.duration, pbar.total - pbar.n)))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return results  # type: ignore[return-value]


def _check_voices(config: SynthConfig) -> None:
    exe = check_espeak()
    proc = subprocess.run([exe, "-q", "-v", config.lang, "a"], capture_output=True, text=True)
    if proc.returncode != 0:
        hint = f"install its MBROLA voice: apt-get install mbrola-{config.lang[3:]}" if is_mbrola(config.lang) else "see espeak-ng --voices"
        raise ValueError(f"espeak-ng has no voice {config.lang!r} ({proc.stderr.strip()}); {hint}")
    if is_mbrola(config.lang):
        return
    known = set(list_variants())
    unknown = [v for v in (config.speakers or config.variants) if v not in known]
    if unknown:
        raise ValueError(f"unknown espeak-ng variant(s) {unknown}; see espeak-ng --voices=variant")


def synthesize(config: SynthConfig, progress: bool = True) -> list[Utterance]:
    """Synthesise at least ``config.minutes`` minutes of audio and write ``out_dir/manifest.jsonl``.

    Utterances are taken from the seeded stream in order until their total duration
    first reaches the target; anything synthesised beyond that is deleted.
    """
    from tqdm.auto import tqdm

    if config.minutes <= 0:
        raise ValueError("minutes must be positive")
    _check_voices(config)
    specs = utterance_specs(config)
    pending = [next(specs)]  # loads the text now: a missing word list fails before any output
    out_dir, target = Path(config.out_dir), config.minutes * 60.0
    mean_words = (config.min_words + config.max_words) / 2 if config.text_file is None else 8
    est_s = mean_words * 60.0 / (sum(config.rate_range) / 2) + 0.4  # rough seconds per utterance
    utts: list[Utterance] = []
    total = 0.0
    bar = "{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}]"
    with tqdm(total=target, disable=not progress, desc=f"synth {config.lang}", bar_format=bar) as pbar:
        while total < target:
            n = min(5000, max(config.workers * 2, math.ceil((target - total) / est_s * 1.05)))
            batch = pending + [next(specs) for _ in range(n - len(pending))]
            pending = []
            done = synth_utterances(batch, out_dir, config.lang, config.workers, config.noise_snr_db, config.seed, pbar)
            for i, u in enumerate(done):
                if total >= target:  # past the first prefix that reaches the target
                    for extra in done[i:]:
                        Path(extra.audio).unlink(missing_ok=True)
                    break
                utts.append(u)
                total += u.duration
    _remove_stale(out_dir / "wavs", config, {u.id for u in utts})
    write_manifest(out_dir / "manifest.jsonl", utts)
    logger.info("synthesised %d utterances, %.1f s of %s audio into %s", len(utts), total, config.lang, out_dir)
    return utts


def _remove_stale(wav_dir: Path, config: SynthConfig, keep: set[str]) -> None:
    """Delete wavs left in our id namespace by an earlier, longer run into the same folder."""
    pattern = re.compile(re.escape(f"{config.prefix}{config.lang}-") + r"\d{6}(\.part)?\.wav")
    for p in wav_dir.glob("*.wav"):
        if pattern.fullmatch(p.name) and p.name[: -len(".wav")] not in keep:
            p.unlink()
