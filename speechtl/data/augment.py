"""Waveform augmentation that imitates real recording conditions, length-preserving.

:class:`Augmenter` corrupts a 16 kHz clip with a random chain of: a gain change,
reverberation (a synthetic room impulse response), the telephone channel (300-3400 Hz
band, 8 kHz sampling, 8-bit mu-law), a lossy codec round trip (MP3 or Vorbis at a
random quality), and additive noise (white, pink or brown, or mains hum) at a random
SNR. The output has exactly the input's length, so a teacher that hears the clean clip
stays frame-aligned with a student that hears the corrupted one.

Randomness comes from one ``numpy`` generator per call, seeded from torch's random
stream: DataLoader workers seed that stream per worker and epoch, so a run's
augmentations are reproducible and survive an exact resume.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from .audio import SAMPLE_RATE, resample


@dataclass(frozen=True)
class AugmentConfig:
    """Per-effect probabilities (each applied independently, in the order listed) and ranges."""

    p_gain: float = 0.5
    gain_db: tuple[float, float] = (-12.0, 6.0)
    p_reverb: float = 0.3
    rt60_s: tuple[float, float] = (0.15, 0.8)
    p_telephone: float = 0.2
    p_codec: float = 0.2
    p_noise: float = 0.5
    snr_db: tuple[float, float] = (0.0, 30.0)


def _colored_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Gaussian noise whose power falls as 1/f**exponent (0 white, 1 pink, 2 brown), unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1] if n > 2 else 1.0
    noise = np.fft.irfft(spec / f ** (exponent / 2), n)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _hum(rng: np.random.Generator, n: int) -> np.ndarray:
    base = rng.choice([50.0, 60.0])
    t = np.arange(n) / SAMPLE_RATE
    hum = sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * base * k * t + rng.uniform(0, 2 * np.pi)) for k in range(1, 8))
    return hum / (np.sqrt(np.mean(hum**2)) + 1e-12)


def _reverb(rng: np.random.Generator, wav: np.ndarray, rt60: float) -> np.ndarray:
    """Convolve with exponentially decaying noise (a diffuse room tail after a direct path)."""
    from scipy.signal import fftconvolve

    length = int(rt60 * SAMPLE_RATE)
    t = np.arange(length) / SAMPLE_RATE
    rir = rng.standard_normal(length) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60
    rir[0] = 0.0
    rir *= rng.uniform(0.3, 1.5) / (np.sqrt(np.sum(rir**2)) + 1e-12)  # direct-to-reverberant ratio
    rir[0] = 1.0
    out = fftconvolve(wav, rir)[: wav.size]
    return out * (np.sqrt(np.mean(wav**2)) / (np.sqrt(np.mean(out**2)) + 1e-12))


def _telephone(wav: np.ndarray) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    sos = butter(4, [300, 3400], btype="bandpass", fs=SAMPLE_RATE, output="sos")
    narrow = resample(sosfilt(sos, wav).astype(np.float32), SAMPLE_RATE, 8000)
    mu = 255.0
    q = np.round(np.sign(narrow) * np.log1p(mu * np.clip(np.abs(narrow), 0, 1)) / math.log1p(mu) * 127) / 127
    narrow = np.sign(q) * np.expm1(np.abs(q) * math.log1p(mu)) / mu
    return _fit(resample(narrow.astype(np.float32), 8000, SAMPLE_RATE), wav.size)


def _codec(rng: np.random.Generator, wav: np.ndarray) -> np.ndarray:
    import soundfile as sf

    fmt, subtype = [("MP3", "MPEG_LAYER_III"), ("OGG", "VORBIS")][int(rng.integers(2))]
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1, 1), SAMPLE_RATE, format=fmt, subtype=subtype, compression_level=float(rng.uniform(0.5, 1.0)))
    buf.seek(0)
    out, _ = sf.read(buf, dtype="float32")
    return _fit(out if out.ndim == 1 else out.mean(axis=1), wav.size)


def _fit(wav: np.ndarray, n: int) -> np.ndarray:
    return wav[:n] if wav.size >= n else np.pad(wav, (0, n - wav.size))


class Augmenter:
    """``augmenter(wav)`` returns a corrupted copy of the same length (float32 in [-1, 1])."""

    def __init__(self, config: AugmentConfig | None = None):
        self.config = config or AugmentConfig()

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        c = self.config
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        x = wav.astype(np.float64)
        if x.size == 0 or not np.any(x):
            return wav.astype(np.float32)
        if rng.random() < c.p_reverb:
            x = _reverb(rng, x, rng.uniform(*c.rt60_s))
        if rng.random() < c.p_telephone:
            x = _telephone(x)
        if rng.random() < c.p_codec:
            x = _codec(rng, x)
        if rng.random() < c.p_noise:
            kind = int(rng.integers(4))
            noise = _hum(rng, x.size) if kind == 3 else _colored_noise(rng, x.size, float(kind))
            power = float(np.mean(x**2))
            x = x + noise * math.sqrt(power / 10 ** (rng.uniform(*c.snr_db) / 10))
        if rng.random() < c.p_gain:
            x = x * 10 ** (rng.uniform(*c.gain_db) / 20)
        peak = float(np.max(np.abs(x)))
        if peak > 1.0:  # a clipping recorder would distort; we rescale instead
            x = x / peak
        return x.astype(np.float32)
