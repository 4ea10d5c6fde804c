"""The bundled default encoder loads by name and with transformers' own classes."""

import json

import pytest
import torch

from speechtl.encoders.registry import BUNDLED_DIR, load_encoder

DEFAULT = BUNDLED_DIR / "default"
pytestmark = pytest.mark.skipif(not (DEFAULT / "model.safetensors").is_file(), reason="no bundled encoder in this checkout")


def test_small_deterministic_and_readable_by_transformers():
    cfg = json.loads((DEFAULT / "config.json").read_text())
    assert (DEFAULT / "model.safetensors").stat().st_size < 25e6
    enc = load_encoder("default").eval()
    assert sum(p.numel() for p in enc.parameters()) <= 12e6
    x = 0.1 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([16000, 16000])
    with torch.no_grad():
        a = enc(x, lengths)
        b = enc(x, lengths)
    assert a.hidden_states[-1].shape == (2, enc.frame_lengths(16000), enc.hidden_size)
    assert len(a.hidden_states) == enc.num_layers
    assert torch.equal(a.hidden_states[-1], b.hidden_states[-1])
    # transformers' own class reads the same weights from the folder
    if cfg["model_type"] == "whisper":
        from transformers import WhisperModel

        theirs = WhisperModel.from_pretrained(str(DEFAULT)).encoder.state_dict()
    else:
        from transformers import AutoModel

        theirs = AutoModel.from_pretrained(str(DEFAULT)).state_dict()
    ours = enc.model.state_dict()
    assert set(ours) <= set(theirs)
    assert all(torch.equal(ours[k].float(), theirs[k].float()) for k in ours)


def test_default_name_resolves_and_has_a_model_card():
    enc = load_encoder("default")
    assert enc.num_layers >= 5
    card = (DEFAULT / "README.md").read_text()
    assert "Czech, Italian, Polish, Swahili, Dutch, Turkish" in card  # the reserved languages are named
