"""The bundled default encoder loads like any HF checkpoint."""

import json

import pytest
import torch

from speechtl.encoder import BUNDLED_DIR, load_encoder

DEFAULT = BUNDLED_DIR / "default"
pytestmark = pytest.mark.skipif(not (DEFAULT / "model.safetensors").is_file(), reason="no bundled encoder in this checkout")


def test_loads_with_automodel_and_is_deterministic():
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(DEFAULT)).eval()
    cfg = json.loads((DEFAULT / "config.json").read_text())
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params <= 12e6
    assert (DEFAULT / "model.safetensors").stat().st_size < 25e6
    x = 0.1 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(x, output_hidden_states=True)
        b = model(x, output_hidden_states=True)
    assert a.last_hidden_state.shape == (2, 49, cfg["hidden_size"])
    assert len(a.hidden_states) == cfg["num_hidden_layers"] + 1
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


def test_default_name_resolves():
    enc = load_encoder("default")
    assert enc.num_layers == enc.config.num_hidden_layers + 1
    assert (DEFAULT / "README.md").is_file()
