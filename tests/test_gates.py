"""Grouped N:M layer gates: option enumeration, exactness of decisions, gradients and errors."""

import math

import pytest
import torch
from helpers import tiny_dit

from models import DiT_models, GatedModel, LayerGates, format_groups, kept_depth, parse_groups, prune_depth


@pytest.mark.parametrize("spec, expected", [
    ("14x1:2", [(1, 2)] * 14),
    ("7x2:4", [(2, 4)] * 7),
    ("2x7:14", [(7, 14)] * 2),
    ("2x2:4,3:4,1:2", [(2, 4), (2, 4), (3, 4), (1, 2)]),
    ([[2, 4], [2, 4], [3, 4]], [(2, 4), (2, 4), (3, 4)]),
])
def test_parse_groups_forms(spec, expected):
    assert parse_groups(spec) == expected


def test_format_round_trip():
    groups = [(2, 4), (2, 4), (3, 4), (1, 2), (1, 2)]
    assert format_groups(groups) == "2x2:4,3:4,2x1:2"
    assert parse_groups(format_groups(groups)) == groups


@pytest.mark.parametrize("spec, depth, message", [
    ("2x1:2", 6, "cover 4 blocks but the model has 6"),
    ("0:2,2x1:2", None, "at least one block"),
    ("3:2", None, "cannot exceed M"),
    ("1:28", 27, "cover 28 blocks"),
    ("14:28", None, "too many|more than"),
    ("1-2", None, "cannot read the group term"),
    ("", None, "cannot read"),
    ([[1, 2, 3]], None, "pair"),
])
def test_invalid_specs_get_their_error(spec, depth, message):
    with pytest.raises(ValueError, match=message):
        parse_groups(spec, depth=depth)


@pytest.mark.parametrize("groups", ["4x1:2", "2x2:4", "1:2,2:4,1:2", "1x3:8"])
def test_option_counts_are_binomials(groups):
    gates = LayerGates(parse_groups(groups))
    assert gates.num_options == [math.comb(m, n) for n, m in parse_groups(groups)]
    for g, (n, m) in enumerate(gates.groups):
        options = gates.options(g)
        assert options.shape == (math.comb(m, n), m)
        assert (options.sum(1) == n).all()
        assert len({tuple(r.tolist()) for r in options}) == len(options)  # every option once
    assert "options_0" in dict(gates.named_buffers())


def test_training_masks_keep_n_of_m_per_sample():
    gates = LayerGates(parse_groups("2x2:4,1:2"))
    gates.tau = 0.5
    mask = gates.sample(64)
    assert mask.shape == (64, 10)
    hard = mask.round()
    torch.testing.assert_close(mask, hard, atol=1e-6, rtol=0)  # hard + (soft - soft.detach()): one rounding of [0, 1]
    assert (hard[:, :4].sum(1) == 2).all() and (hard[:, 4:8].sum(1) == 2).all() and (hard[:, 8:].sum(1) == 1).all()
    assert len({tuple(r.tolist()) for r in hard}) > 1  # per-sample draws differ


def test_given_uniforms_make_the_draw_deterministic():
    gates = LayerGates(parse_groups("2x2:4"))
    u = torch.rand(8, sum(gates.num_options), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(gates.sample(8, u), gates.sample(8, u), atol=0, rtol=0)


def test_one_hot_decision_equals_the_pruned_model():
    base = tiny_dit(depth=4)
    gated = GatedModel(base, "2x1:2")
    with torch.no_grad():
        gated.gates.logits[0].copy_(torch.tensor([0.0, 5.0]))  # group 0 keeps block 1
        gated.gates.logits[1].copy_(torch.tensor([5.0, 0.0]))  # group 1 keeps block 2
    gated.eval()
    assert gated.decisions()["kept_indices"] == [1, 2]
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 9])
    pruned = prune_depth(tiny_dit(depth=4), [1, 2]).eval()  # the same weights, never gated
    with torch.no_grad():
        torch.testing.assert_close(gated(x, t, y), pruned(x, t, y), atol=0, rtol=0)
        x2, t2, y2 = torch.cat([x[:2], x[:2]]), torch.tensor([5, 700, 5, 700]), torch.tensor([0, 3, 10, 10])
        torch.testing.assert_close(gated.forward_with_cfg(x2, t2, y2, 2.0), pruned.forward_with_cfg(x2, t2, y2, 2.0),
                                   atol=0, rtol=0)
    # outside a gated call the wrapped model is the full model
    with torch.no_grad():
        torch.testing.assert_close(gated.model(x, t, y), base(x, t, y), atol=0, rtol=0)


def test_gradients_reach_every_gate_logit():
    gated = GatedModel(tiny_dit(depth=4), "1:2,2:2")
    gated.train()
    gated.gates.tau = 1.0
    x, t, y = torch.randn(16, 4, 8, 8), torch.randint(0, 1000, (16,)), torch.randint(0, 10, (16,))
    gated(x, t, y).square().mean().backward()
    assert gated.gates.logits[0].grad.abs().sum() > 0
    # a 2:2 group has a single option: softmax over one option is flat, so its gradient is exactly zero
    assert gated.gates.logits[1].grad.shape == (1,) and torch.count_nonzero(gated.gates.logits[1].grad) == 0


def test_confidence_follows_scaled_softmax():
    gates = LayerGates(parse_groups("1:2"))
    with torch.no_grad():
        gates.logits[0].copy_(torch.tensor([0.01, 0.0]))
    gates.scaling = 100.0
    d = gates.decisions()
    assert d["kept_indices"] == [0]
    assert d["confidence"][0] == pytest.approx(torch.tensor([1.0, 0.0]).softmax(0)[0].item(), rel=1e-6)


@pytest.mark.parametrize("name, depth, kept", [
    ("DiT-XL-1-2", 28, 14), ("DiT-XL-2-4", 28, 14), ("DiT-XL-7-14", 28, 14), ("DiT-XL-1-4", 28, 7),
    ("DiT-D14-1-2", 14, 7), ("DiT-D14-2-4", 14, 7),
])
def test_gated_presets(name, depth, kept):
    from models import GATED_PRESETS
    _, groups = GATED_PRESETS[name]
    assert sum(m for _, m in parse_groups(groups)) == depth and kept_depth(parse_groups(groups)) == kept
    assert name in DiT_models


def test_gates_wrap_any_block_list():
    """A model that is not a DiT: blocks with a different signature are gated the same way."""
    class Tower(torch.nn.Module):
        arch, config = "Tower", {}
        stacks = {"blocks": ("blocks", "depth", None)}

        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    tower = Tower()
    gated = GatedModel(tower, "1:2,1:2").eval()
    with torch.no_grad():
        gated.gates.logits[0].copy_(torch.tensor([1.0, 0.0]))
        gated.gates.logits[1].copy_(torch.tensor([0.0, 1.0]))
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(gated(x), tower.blocks[3](tower.blocks[0](x)), atol=0, rtol=0)


def test_deep_copies_gate_with_their_own_gates():
    import copy

    base = tiny_dit(depth=4)
    gated = GatedModel(base, "2x1:2").eval()
    twin = copy.deepcopy(gated)
    with torch.no_grad():
        for logit, value in zip(twin.gates.logits, ([0.0, 1.0], [0.0, 1.0])):
            logit.copy_(torch.tensor(value))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 30]), torch.tensor([1, 2])
    with torch.no_grad():
        fresh = tiny_dit(depth=4)  # the same weights, never gated
        torch.testing.assert_close(twin(x, t, y), prune_depth(fresh, [1, 3]).eval()(x, t, y), atol=0, rtol=0)
        torch.testing.assert_close(gated(x, t, y), prune_depth(fresh, [0, 2]).eval()(x, t, y), atol=0, rtol=0)


def test_released_gates_leave_no_hooks_and_pruning_a_gated_model_is_refused():
    base = tiny_dit(depth=4)
    gated = GatedModel(base, "2x1:2")
    assert all(len(b._forward_hooks) == 1 for b in base.blocks)
    with pytest.raises(ValueError, match="release"):
        prune_depth(gated, [0, 2])
    assert gated.release() is base
    assert all(len(b._forward_hooks) == 0 for b in base.blocks)
    pruned = prune_depth(base, [0, 2])
    assert all(len(b._forward_hooks) == 0 for b in pruned.blocks)
    assert not any(isinstance(m, GatedModel) for m in pruned.modules())
