"""Loading and saving encoders: every call into ``transformers`` model classes goes
through :func:`load_encoder`.

It accepts a local directory, a hub id (for users who have the hub), ``"default"`` for
the encoder bundled with speechtl, or a fetched encoder's name (``whisper-base``). The
folder decides the family: Whisper (a ``WhisperConfig`` or a faster-whisper folder) goes to
:mod:`speechtl.encoders.whisper`, every other wav2vec2-style encoder to
:mod:`speechtl.encoders.wav2vec2`; an encoder that only runs in eval mode is built from
speechtl's own modules (:mod:`speechtl.encoders.native`) where they cover it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..core.paths import fetched_dir
from .base import TRAINING_CONFIG_KEYS
from .config_check import check_encoder_config
from .ct2 import is_ct2_dir
from .lora import base_state_dict
from .native import load_native
from .wav2vec2 import SpeechEncoder, _read_do_normalize
from .whisper import WhisperSpeechEncoder, is_whisper_source, load_whisper_encoder, save_whisper_encoder

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
DEFAULT_ENCODER = "default"
# encoders that ``tools/fetch_encoder.sh NAME`` downloads and converts (into fetched_dir())
FETCHABLE = ("whisper-base", "whisper-tiny.en")


def resolve_encoder(name: str) -> str:
    """Map ``"default"`` (or a bundled name) to its folder, and a fetched encoder's name
    (``whisper-base``) to its converted folder; other names pass through."""
    if name in FETCHABLE and not Path(name).exists():
        path = fetched_dir(name)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"encoder {name!r} has not been fetched; run `bash tools/fetch_encoder.sh {name}` "
                                    f"(it downloads and converts the weights into {path})")
        return str(path)
    if name == DEFAULT_ENCODER or (BUNDLED_DIR / name / "config.json").is_file():
        path = BUNDLED_DIR / name
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"the bundled encoder {name!r} is not installed at {path}; pass encoder=<local dir or hub id>"
            )
        return str(path)
    return name


def load_encoder(
    name_or_path: str,
    random_init: bool = False,
    seed: int = 0,
    config_overrides: dict | None = None,
    trust_remote_code: bool = False,
    inference: bool = False,
) -> SpeechEncoder:
    """Load an encoder by local directory, hub id, or ``"default"``.

    Args:
        random_init: build the same architecture with fresh random weights (the
            ``scratch`` baseline); only the config is read.
        config_overrides: training-time config keys (``mask_time_prob``,
            ``layerdrop``, ...), applied before the model is built.
        trust_remote_code: passed to transformers; off unless the user turns it on.
        inference: the encoder will only run in eval mode. A local wav2vec2, HuBERT or
            Whisper directory is then built from speechtl's own modules
            (:mod:`speechtl.encoders.native`), which spares the command the import of transformers'
            modelling code; ``SPEECHTL_NATIVE=0`` turns this off.
    """
    source = resolve_encoder(name_or_path)
    overrides = dict(config_overrides or {})
    unknown = set(overrides) - set(TRAINING_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"cannot override encoder config keys {sorted(unknown)}")
    if not os.path.exists(source) and (source.startswith(("/", ".", "~")) or source.count("/") > 1):
        # a hub id is owner/name; anything else that does not exist is a mistyped folder
        raise FileNotFoundError(f"encoder folder {source} does not exist")
    if os.path.isdir(source) and not is_ct2_dir(source):  # a CTranslate2 folder has no transformers config
        check_encoder_config(source)
    if inference and not random_init and not overrides and os.path.isdir(source) and native_enabled():
        model = load_native(source)
        if model is not None:
            if model.config.model_type == "whisper":
                return WhisperSpeechEncoder(model, source=str(name_or_path)).eval()
            return SpeechEncoder(model, normalize_waveform=_read_do_normalize(source), source=str(name_or_path)).eval()
    from transformers import AutoConfig, AutoModel

    if is_whisper_source(source):
        return load_whisper_encoder(source, str(name_or_path), random_init, seed, overrides)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    if not hasattr(config, "conv_kernel"):
        raise ValueError(f"{source}: {type(config).__name__} is not a wav2vec2-style audio encoder (no conv feature encoder)")
    # the checkpoint holds a learned mask embedding only if its config masks; build the
    # model with the checkpoint's masking so its weights load cleanly, then apply ours
    # (masking is read from the config at forward time)
    saved_masking = {k: getattr(config, k, 0.0) for k in ("mask_time_prob", "mask_feature_prob")}
    for k, v in overrides.items():
        setattr(config, k, v)
    build_masking = saved_masking if any(saved_masking.values()) and not random_init else {}

    final_masking = {k: getattr(config, k, 0.0) for k in saved_masking}
    for k, v in build_masking.items():
        setattr(config, k, v)
    if random_init:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    else:
        model = _from_pretrained(AutoModel, source, config=config, trust_remote_code=trust_remote_code)
    for k, v in final_masking.items():
        setattr(model.config, k, v)
    return SpeechEncoder(model, normalize_waveform=_read_do_normalize(source), source=str(name_or_path))


def _from_pretrained(cls, source: str, **kwargs):
    """``cls.from_pretrained``, with pickle weights that hold more than tensors refused in
    speechtl's words: torch's own message suggests ``weights_only=False``, the unsafe way."""
    import pickle

    try:
        return cls.from_pretrained(source, **kwargs)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else type(e).__name__)
        bins = sorted(p.name for p in Path(source).glob("*.bin")) if os.path.isdir(source) else []
        where = os.path.join(source, bins[0]) if len(bins) == 1 else source
        raise ValueError(
            f"{where}: refused: these pickle weights hold more than tensors ({detail}), and loading them could run "
            f"code; speechtl reads only safetensors or plain tensors. Get a model.safetensors for this encoder, or, "
            f"only if you trust where the file came from, convert it once: python -c \"import torch; "
            f"from safetensors.torch import save_file; sd = torch.load('{where}', weights_only=False); "
            f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{os.path.join(source, 'model.safetensors')}')\"") from None


def native_enabled() -> bool:
    """Whether inference may use speechtl's own encoder modules (``SPEECHTL_NATIVE``, default on)."""
    return os.environ.get("SPEECHTL_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def save_encoder(encoder: SpeechEncoder, out_dir: str | os.PathLike) -> None:
    """Save as a standard HF model directory (config + safetensors + preprocessor config),
    without any adapters attached to it (:mod:`speechtl.models.adapters`)."""
    from transformers import Wav2Vec2FeatureExtractor

    if isinstance(encoder, WhisperSpeechEncoder):
        save_whisper_encoder(encoder, out_dir)
        return

    # a model built from this config has a mask embedding only if the config masks;
    # keep the saved weights consistent with the saved config. Adapters are not part of
    # the encoder: it is saved as it was before they were attached
    state = base_state_dict(encoder.model, getattr(encoder, "adapter_keys", ()))
    cfg = encoder.model.config
    if not (getattr(cfg, "mask_time_prob", 0) > 0 or getattr(cfg, "mask_feature_prob", 0) > 0):
        state.pop("masked_spec_embed", None)
    encoder.model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16_000,
        padding_value=0.0,
        do_normalize=encoder.normalize_waveform,
        return_attention_mask=not encoder.per_clip_cnn,
    ).save_pretrained(str(out_dir))
