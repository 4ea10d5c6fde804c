"""Names and checks that several layers share, kept free of heavy imports (the command
line reads them without loading torch)."""

from __future__ import annotations

import re

__version__ = "0.1.0"  # speechtl's version, recorded in every model folder

ADAPTER_KINDS = ("lora", "mms")
# a job smaller than either starts no audio-decoding processes (speechtl.data.loader.is_small_job);
# here so that `speechtl extract --help` can state them without importing torch
SMALL_JOB_CLIPS = 200
SMALL_JOB_SECONDS = 600.0
# a model folder's own decoding (CTC: :mod:`speechtl.training.words`; seq2seq: its beams)
DECODING_FILE = "decoding.json"
_LANG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_lang(lang: str, key: str = "lang") -> str:
    """A language code usable in a file name (``adapter.<lang>.safetensors``)."""
    if not isinstance(lang, str) or not _LANG.match(lang):
        raise ValueError(f"config key {key!r}: {lang!r} is not a language code (letters, digits, '-' and '_', "
                         "e.g. cs, it, cmn-script_simplified)")
    return lang
