"""LoRA delta weights: identity at start, trainable fraction and stripping."""

import pytest
import torch
from helpers import tiny_dit

from models import DiT_models
from tinyfusion.lora import (
    BLOCK_TARGETS,
    add_lora,
    block_linear_names,
    has_lora,
    lora_linear_names,
    strip_lora,
    trainable_fraction,
)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([1, 400, 900]), torch.tensor([1, 2, 3])


def _train_lora_a_bit(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


def test_lora_starts_as_identity_and_freezes_the_base():
    model = tiny_dit().eval()
    x, t, y = _inputs()
    with torch.no_grad():
        before = model(x, t, y)
    targets = lora_linear_names(model)
    params = add_lora(model, rank=4)
    assert has_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), before, atol=0, rtol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(params) == 2 * len(targets) == 2 * (4 * len(BLOCK_TARGETS) + 4)


def test_strip_restores_the_base_weights():
    model = tiny_dit()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=2)
    _train_lora_a_bit(model)
    strip_lora(model)
    stripped = model.state_dict()
    assert set(stripped) == set(original)
    for k in original:
        torch.testing.assert_close(stripped[k], original[k], atol=0, rtol=0)


def test_trainable_fraction_of_dit_xl_rank8_is_about_0_9_percent():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    add_lora(model, rank=8)
    trainable, total = trainable_fraction(model)
    assert total == pytest.approx(675_129_632, rel=1e-3)
    assert 0.0085 < trainable / total < 0.0092


def test_targets_are_configurable_and_typos_are_errors():
    model = tiny_dit()
    assert len(block_linear_names(model, ["attn.qkv"])) == 4
    assert len(block_linear_names(model)) == 4 * len(BLOCK_TARGETS)
    assert lora_linear_names(model, ["blocks"]) == block_linear_names(model)
    with pytest.raises(ValueError, match="stand alone"):
        lora_linear_names(model, ["all", "attn.qkv"])
    with pytest.raises(ValueError, match="match no Linear"):
        block_linear_names(model, ["attn.qkvv"])
    with pytest.raises(ValueError, match="rank"):
        add_lora(model, rank=0)


def test_the_default_adapts_every_linear_of_the_model_as_the_reference_does():
    """The reference wraps every nn.Linear: 5 per block, the timestep MLP's 2, the final layer's 2."""
    model = tiny_dit()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 5 * 4 + 4
    assert {"t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear",
            "final_layer.adaLN_modulation.1"} <= set(linears)
    params = add_lora(model, rank=3)
    assert len(params) == 2 * len(linears)
    assert sum(p.numel() for p in params) == sum(3 * (m.in_features + m.out_features) for m in linears.values())
    blocks_only = tiny_dit()
    assert len(add_lora(blocks_only, rank=3, targets=["blocks"])) == 2 * 5 * 4
