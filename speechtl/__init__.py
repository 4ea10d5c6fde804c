"""speechtl: adapt pretrained speech encoders to new languages and vocabularies."""

__version__ = "0.1.0"

from .audio import AudioError, load_audio  # noqa: E402
from .manifest import ManifestError, Utterance, read_manifest, write_manifest  # noqa: E402


def load(model_dir, device: str | None = None, lang: str | None = None):
    """Load a trained speechtl model directory; returns a :class:`speechtl.inference.Recognizer`.
    ``lang`` picks the language of a model trained with ``mode=adapter`` (default: the one
    trained last); ``Recognizer.set_language`` switches later without reloading the encoder."""
    from .inference import Recognizer

    return Recognizer.load(model_dir, device=device, lang=lang)


__all__ = ["AudioError", "ManifestError", "Utterance", "load", "load_audio", "read_manifest", "write_manifest", "__version__"]
