"""speechtl: adapt pretrained speech encoders to new languages and vocabularies."""

__version__ = "0.1.0"

from .audio import AudioError, load_audio  # noqa: E402
from .manifest import ManifestError, Utterance, read_manifest, write_manifest  # noqa: E402


def load(model_dir, device: str | None = None):
    """Load a trained speechtl model directory; returns a :class:`speechtl.inference.Recognizer`."""
    from .inference import Recognizer

    return Recognizer.load(model_dir, device=device)


__all__ = ["AudioError", "ManifestError", "Utterance", "load", "load_audio", "read_manifest", "write_manifest", "__version__"]
