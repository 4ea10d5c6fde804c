"""Shared test helpers: synthetic audio written with soundfile.

Use the plain functions (``from conftest import make_wav``) or the fixtures
``wav_factory`` / ``make_wav_fixture`` that write under the test's ``tmp_path``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


def make_signal(seconds: float, sr: int = 16000, channels: int = 1, freq: float = 440.0,
                amplitude: float = 0.3, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """A sine tone plus a little noise, float32, shape (samples,) or (samples, channels).

    Each channel gets a different frequency so a mixdown is not just one channel.
    """
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr
    rng = np.random.default_rng(seed)
    chans = [
        amplitude * np.sin(2 * np.pi * freq * (c + 1) * t) + noise * rng.standard_normal(n)
        for c in range(channels)
    ]
    data = np.stack(chans, axis=1) if channels > 1 else chans[0]
    return np.clip(data, -1.0, 1.0).astype(np.float32)


def make_wav(path: str | os.PathLike, seconds: float, sr: int = 16000, channels: int = 1,
             subtype: str | None = "PCM_16", format: str | None = None, **signal_kw) -> Path:
    """Write a synthetic audio file and return its path (parent folders are created).

    ``format`` defaults to what the extension says (WAV, FLAC, OGG, MP3...); ``subtype``
    applies to wav only unless given for another format explicitly (OGG uses VORBIS,
    MP3 and FLAC their defaults). ``signal_kw`` goes to :func:`make_signal`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = make_signal(seconds, sr, channels, **signal_kw)
    fmt = (format or path.suffix.lstrip(".")).upper()
    if fmt == "OGG":
        st = "VORBIS" if subtype in (None, "PCM_16") else subtype
    elif fmt in ("WAV", "AIFF", "AIF"):
        st = subtype
    else:  # FLAC / MP3: the default subtype unless a non-default one is asked for
        st = None if subtype == "PCM_16" else subtype
    sf.write(str(path), data, sr, format=fmt if fmt != "AIF" else "AIFF", subtype=st)
    return path


def make_corrupt(path: str | os.PathLike, nbytes: int = 4096, seed: int = 0) -> Path:
    """Write ``nbytes`` random bytes (not decodable audio) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def wav_factory(tmp_path):
    """``wav_factory("a/b.wav", 1.5, sr=8000, ...)`` writes under ``tmp_path`` and returns the path."""

    def factory(name: str, seconds: float = 1.0, **kw) -> Path:
        return make_wav(tmp_path / name, seconds, **kw)

    return factory


@pytest.fixture
def make_wav_fixture():
    """The :func:`make_wav` function, for tests that prefer fixtures to imports."""
    return make_wav


# --- corpora and encoders shared by the model tests -------------------------------

def tiny_encoder_dir(root: Path, family: str = "wav2vec2", **kw) -> Path:
    """Save a tiny random encoder of ``family`` as a HF model directory under ``root``."""
    from speechtl.encoders.registry import save_encoder
    from speechtl.encoders.testing import encoder_from_config, tiny_config

    out = root / f"enc-{family}-{'-'.join(f'{k}{v}' for k, v in sorted(kw.items()))}"
    if not (out / "config.json").exists():
        save_encoder(encoder_from_config(tiny_config(family, **kw)), out)
    return out


def tone_corpus(root: Path, n: int = 8, seed: int = 0) -> Path:
    """A manifest of short synthetic clips with letter transcripts (no espeak needed)."""
    from speechtl.data.manifest import Utterance, write_manifest

    rng = np.random.default_rng(seed)
    words = ["ab", "ba", "cab", "abc", "cc", "bad"]
    utts = []
    for i in range(n):
        seconds = float(rng.uniform(0.8, 2.0))
        path = make_wav(root / "wavs" / f"u{i}.wav", seconds, freq=200 + 50 * i, seed=i)
        text = " ".join(rng.choice(words, size=2))
        utts.append(Utterance(f"u{i}", str(path), text, seconds))
    return write_manifest(root / "manifest.jsonl", utts)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="session")
def tones(session_dir) -> Path:
    return tone_corpus(session_dir / "tones")


@pytest.fixture(scope="session")
def tiny_encoder(session_dir) -> Path:
    return tiny_encoder_dir(session_dir)


@pytest.fixture(scope="session")
def speech_corpus(session_dir) -> Path:
    """About 20 espeak-ng utterances (skips the test when espeak-ng is missing)."""
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (tools/setup.sh installs it)")
    from speechtl.data.corpora.synth import SynthConfig, synthesize

    out = session_dir / "speech"
    synthesize(SynthConfig(lang="en-us", minutes=0.6, out_dir=str(out), seed=11, min_words=2, max_words=4, workers=2), progress=False)
    return out / "manifest.jsonl"


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, speech_corpus):
    """A recogniser that really outputs words: a BiLSTM head on the bundled encoder, trained
    on the synthesised English corpus (as the learning test in test_train.py)."""
    from speechtl.training.config import load_train_config
    from speechtl.training.train import train

    out = tmp_path_factory.mktemp("tr")
    cfg = load_train_config(None, dict(encoder="default", mode="frozen", head="bilstm", bilstm_hidden=96, bilstm_layers=1,
                                       train=str(speech_corpus), out=str(out), max_steps=160, eval_every=160, lr=6e-3,
                                       max_batch_seconds=20, num_workers=0, seed=0))
    train(cfg, progress=False)
    return out / "model"
