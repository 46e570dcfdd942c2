"""LoRA delta weights: identity at start, trainable fraction and stripping."""

import pytest
import torch
from helpers import tiny_dit

from models import DiT_models
from tinyfusion.lora import (
    DEFAULT_TARGETS,
    add_lora,
    block_linear_names,
    has_lora,
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
    targets = block_linear_names(model)
    params = add_lora(model, rank=4)
    assert has_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), before, atol=0, rtol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(params) == 2 * len(targets) == 2 * 4 * len(DEFAULT_TARGETS)


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
    assert len(block_linear_names(model)) == 4 * len(DEFAULT_TARGETS)
    with pytest.raises(ValueError, match="match no Linear"):
        block_linear_names(model, ["attn.qkvv"])
    with pytest.raises(ValueError, match="rank"):
        add_lora(model, rank=0)
