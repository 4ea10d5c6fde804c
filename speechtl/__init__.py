"""speechtl: adapt pretrained speech encoders to new languages and vocabularies."""

from __future__ import annotations

import importlib

from .core.constants import __version__

# Public names and the submodule each lives in. They are imported on first use (PEP 562),
# so that `import speechtl`, which every `speechtl` command does, loads neither numpy,
# soundfile nor torch up front: `speechtl --help` needs none of them.
_LAZY = {
    "AudioError": "data.audio",
    "load_audio": "data.audio",
    "ManifestError": "data.manifest",
    "Utterance": "data.manifest",
    "read_manifest": "data.manifest",
    "write_manifest": "data.manifest",
    "Recognizer": "inference.recognizer",
}
# submodules that `import speechtl` used to load, so that `speechtl.audio.x` keeps working
_LAZY_SUBMODULES = ("audio", "manifest")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_SUBMODULES))


def load(model_dir, device: str | None = None, lang: str | None = None):
    """Load a trained speechtl model directory; returns a :class:`speechtl.inference.recognizer.Recognizer`.
    ``lang`` picks the language of a model trained with ``mode=adapter`` (default: the one
    trained last); ``Recognizer.set_language`` switches later without reloading the encoder.
    A folder written by ``speechtl export --format onnx`` loads as an
    :class:`speechtl.inference.onnx.OnnxRecognizer`, which runs without torch."""
    from .inference.onnx import load as load_any

    return load_any(model_dir, device=device, lang=lang)


__all__ = ["AudioError", "ManifestError", "Recognizer", "Utterance", "load", "load_audio", "read_manifest", "write_manifest",
           "__version__"]
