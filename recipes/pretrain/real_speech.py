#!/usr/bin/env python
"""Collect the real human recordings with transcripts that Debian packages carry.

Sources (install with ``apt-get install``):

- ``asterisk-core-sounds-{en,es,fr,ru}`` and their ``-wav`` packages: telephony prompts,
  one studio speaker per language, 8 kHz. Transcripts from each package's
  ``core-sounds-XX.txt``; bracketed notes (``[ascending tones]``) are dropped, and a
  prompt that is only a note is skipped.
- ``tuxpaint-stamps-default``: spoken descriptions of the stamps (``NAME_desc_LL.ogg``
  beside ``NAME.txt``, whose ``LL.utf8=`` line is the text; English has no suffix).
- ``pocketsphinx-testdata``: the ``cards`` and ``librivox`` test sets.

Recordings in the reserved languages (cs, it, pl, sw, nl, tr) are never written.
Audio is trimmed of leading and trailing silence and written as 16 kHz mono wav under
``OUT/wavs``; ``OUT/manifest.jsonl`` holds the orthographic text. Phoneme targets are
added by ``phonemize.py``, which also drops clips whose speaking rate shows the
recording does not match its text.
"""

import argparse
import gzip
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from speechtl.data.audio import SAMPLE_RATE, load_audio, write_wav
from speechtl.data.corpora.synth import _trim
from speechtl.data.manifest import Utterance, write_manifest

RESERVED = {"cs", "it", "pl", "sw", "nl", "tr"}
ASTERISK = {"en": "en-us", "es": "es", "fr": "fr-fr", "ru": "ru"}  # package language -> espeak-ng voice
TUXPAINT = {"": "en-us", "fr": "fr-fr", "ru": "ru", "ro": "ro", "ca": "ca", "bg": "bg", "es": "es", "be": "be",
            "el": "el", "da": "da", "lt": "lt", "ml": "ml"}  # fmt: skip


def asterisk(sounds: Path, docs: Path):
    for pkg_lang, voice in ASTERISK.items():
        script = docs / f"asterisk-core-sounds-{pkg_lang}" / f"core-sounds-{pkg_lang}.txt.gz"
        audio_dir = sounds / pkg_lang
        if not script.is_file() or not audio_dir.is_dir():
            print(f"asterisk {pkg_lang}: not installed (apt-get install asterisk-core-sounds-{pkg_lang}-wav), skipped")
            continue
        with gzip.open(script, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, text = line.partition(":")
                if not sep or line.startswith(";"):
                    continue
                text = re.sub(r"\[[^\]]*\]", " ", text).strip()
                wav = audio_dir / f"{key.strip()}.wav"
                if text and any(c.isalpha() for c in text) and wav.is_file():
                    yield f"asterisk-{pkg_lang}-{key.strip().replace('/', '-')}", wav, text, voice, f"asterisk-{pkg_lang}"


def tuxpaint(stamps: Path):
    for ogg in sorted(stamps.rglob("*_desc*.ogg")):
        m = re.fullmatch(r"(.+)_desc(?:_([a-z]{2}))?\.ogg", ogg.name)
        if not m or (m.group(2) or "") not in TUXPAINT:
            continue
        code = m.group(2) or ""
        txt = ogg.with_name(m.group(1) + ".txt")
        if not txt.is_file():
            continue
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        if code:
            found = [ln.split("=", 1)[1] for ln in lines if ln.startswith(f"{code}.utf8=")]
            text = found[0] if found else ""
        else:
            text = lines[0] if lines else ""
        if text.strip():
            rel = ogg.relative_to(stamps).with_suffix("").as_posix().replace("/", "-")
            yield f"tuxpaint-{rel}", ogg, text.strip(), TUXPAINT[code], f"tuxpaint-{code or 'en'}"


def pocketsphinx(data: Path):
    for name in ("cards", "librivox"):
        d = data / name
        tr = d / (f"{name}.transcription" if name == "cards" else "transcription")
        if not tr.is_file():
            continue
        ids = [ln.strip() for ln in (d / (f"{name}.fileids" if name == "cards" else "fileids")).read_text().splitlines() if ln.strip()]
        texts = [re.sub(r"</?s>|\([^)]*\)", " ", ln).strip() for ln in tr.read_text().splitlines() if ln.strip()]
        for fid, text in zip(ids, texts):
            wav = d / f"{Path(fid).name}.wav"
            if wav.is_file() and text:
                yield f"pocketsphinx-{name}-{Path(fid).name}", wav, text.lower(), "en-us", f"pocketsphinx-{name}"


def convert(item, wav_dir: Path):
    uid, src, text, voice, speaker = item
    out = wav_dir / f"{uid}.wav"
    if not out.is_file():
        wav = _trim(load_audio(src, SAMPLE_RATE), SAMPLE_RATE)
        if wav.size < SAMPLE_RATE // 4:
            return None
        write_wav(out, np.clip(wav, -1, 1), SAMPLE_RATE)
    import soundfile as sf

    duration = sf.info(str(out)).duration
    lang = voice.split("-")[0]
    return Utterance(uid, str(out.resolve()), text, round(duration, 4), voice, speaker, extra={"source": str(src), "lang_code": lang})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (wavs/ and manifest.jsonl)")
    p.add_argument("--sounds", default="/usr/share/asterisk/sounds", type=Path)
    p.add_argument("--docs", default="/usr/share/doc", type=Path)
    p.add_argument("--stamps", default="/usr/share/tuxpaint/stamps", type=Path)
    p.add_argument("--pocketsphinx", default="/usr/share/pocketsphinx/test/data", type=Path)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args()
    items = [*asterisk(args.sounds, args.docs), *tuxpaint(args.stamps), *pocketsphinx(args.pocketsphinx)]
    seen: set[str] = set()  # a script may list a prompt twice; the first text wins
    items = [it for it in items if it[3].split("-")[0] not in RESERVED and not (it[0] in seen or seen.add(it[0]))]
    wav_dir = Path(args.out) / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.workers) as pool:
        utts = [u for u in tqdm(pool.map(lambda it: convert(it, wav_dir), items), total=len(items), disable=args.quiet,
                                desc="real speech") if u is not None]
    write_manifest(Path(args.out) / "manifest.jsonl", utts)
    by = {}
    for u in utts:
        by.setdefault(u.speaker, [0, 0.0])
        by[u.speaker][0] += 1
        by[u.speaker][1] += u.duration
    for spk, (n, d) in sorted(by.items()):
        print(f"{spk:24s} {n:5d} clips {d / 60:7.1f} min")
    print(f"wrote {len(utts)} clips ({sum(u.duration for u in utts) / 3600:.2f} h) to {Path(args.out) / 'manifest.jsonl'}")


if __name__ == "__main__":
    main()
