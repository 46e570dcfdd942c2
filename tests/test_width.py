"""Width pruning: the surgery (heads and MLP channels cut out exactly), the criteria, and the CLI."""

import pytest
import torch
from helpers import tiny_dit, tiny_mar, tiny_sit
from helpers.tolerance import assert_fp32_close

from models import DiT, flat_blocks, prune_depth, prune_width
from tinyfusion.checkpoint import load_model, save_model
from tinyfusion.errors import UserError

#################################################################################
#                                    Surgery                                    #
#################################################################################


class ZeroedUnits:
    """Forward pre-hooks that zero the removed heads' attention outputs (the output projection's inputs of
    those heads) and the removed channels' activations (fc2's inputs): the reference that surgery must equal."""

    def __init__(self, model, kept_heads, kept_channels):
        self.handles = []
        for block, heads, channels in zip(flat_blocks(model), kept_heads, kept_channels):
            d = block.attn.head_dim
            head_mask = torch.zeros(block.attn.num_heads, d)
            head_mask[list(heads)] = 1.0
            channel_mask = torch.zeros(block.mlp.fc1.out_features)
            channel_mask[list(channels)] = 1.0
            self.handles.append(block.attn.proj.register_forward_pre_hook(_times(head_mask.reshape(-1))))
            self.handles.append(block.mlp.fc2.register_forward_pre_hook(_times(channel_mask)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _times(mask):
    return lambda module, args: (args[0] * mask,)


def _inputs(model, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *model.data_shape, generator=g)
    t = torch.rand(n, generator=g) if model.arch == "SiT" else torch.randint(0, 1000, (n,), generator=g)
    return x, t, torch.randint(0, 10, (n,), generator=g)


def _check_exact(model, kept_heads, kept_channels):
    x, t, y = _inputs(model)
    pruned = prune_width(model, kept_heads, kept_channels)
    with torch.no_grad():
        with ZeroedUnits(model, kept_heads, kept_channels):
            expected = model(x, t, y)
        full = model(x, t, y)
        actual = pruned(x, t, y)
    assert_fp32_close(actual, expected)
    assert not torch.allclose(full, expected, atol=1e-3)  # the removed units mattered: the test can fail
    return pruned


@pytest.mark.parametrize("make", [tiny_dit, tiny_sit], ids=["DiT", "SiT"])
def test_uniform_width_surgery_equals_the_zeroed_model(make):
    model = make(num_heads=4).eval()  # 4 heads of 8, 128 MLP channels, 4 blocks
    kept_heads = [[0, 2], [1, 3], [0, 1], [2, 3]]
    kept_channels = [list(range(b, 128, 2)) for b in (0, 1, 0, 1)]
    pruned = _check_exact(model, kept_heads, kept_channels)
    assert type(pruned) is type(model)
    assert pruned.config["block_widths"] == [{"num_heads": 2, "head_dim": 8, "mlp_hidden": 64}] * 4
    assert model.config["block_widths"][0] == {"num_heads": 4, "head_dim": 8, "mlp_hidden": 128}  # untouched
    # what surgery does not cut is copied bit for bit; the residual width and adaLN keep their sizes
    for name, tensor in model.state_dict().items():
        if not any(part in name for part in ("attn.qkv", "attn.proj.weight", "mlp.fc1", "mlp.fc2.weight")):
            assert torch.equal(pruned.state_dict()[name], tensor), name
    block, source = pruned.blocks[1], model.blocks[1]
    assert torch.equal(block.attn.qkv.weight[8:16], source.attn.qkv.weight[24:32])  # q of head 3
    assert torch.equal(block.attn.qkv.weight[16 + 8:16 + 16], source.attn.qkv.weight[32 + 24:32 + 32])  # k of head 3
    assert torch.equal(block.attn.proj.weight[:, :8], source.attn.proj.weight[:, 8:16])  # head 1's columns
    assert torch.equal(block.mlp.fc2.weight[:, 1], source.mlp.fc2.weight[:, 3])


@pytest.mark.parametrize("make", [tiny_dit, tiny_sit], ids=["DiT", "SiT"])
def test_per_block_width_surgery_equals_the_zeroed_model_and_composes(make):
    model = make(num_heads=4).eval()
    kept_heads = [[3], [0, 1, 2], [0, 1, 2, 3], [1, 2]]
    kept_channels = [[5], list(range(0, 128, 3)), list(range(100)), [0, 64, 127]]
    pruned = _check_exact(model, kept_heads, kept_channels)
    assert [w["num_heads"] for w in pruned.config["block_widths"]] == [1, 3, 4, 2]
    assert [w["mlp_hidden"] for w in pruned.config["block_widths"]] == [1, 43, 100, 3]
    # a model of per-block widths is cut again, exactly
    again = _check_exact(pruned, [[0], [0, 2], [1, 3], [1]], [[0], list(range(20)), list(range(0, 100, 7)), [2]])
    assert [w["num_heads"] for w in again.config["block_widths"]] == [1, 2, 2, 1]


def test_a_width_pruned_file_rebuilds_itself_and_is_depth_pruned_later(tmp_path):
    model = tiny_dit(num_heads=4).eval()
    pruned = prune_width(model, [[3], [0, 1], [0, 1, 2], [1, 2]], [[5, 6], list(range(10)), list(range(99)), [4]])
    save_model(tmp_path / "w.pt", pruned)
    loaded = load_model(tmp_path / "w.pt")
    assert loaded.config == pruned.config
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded.model(x, t, y), pruned(x, t, y))
        shallow = prune_depth(loaded.model, [1, 3])
        assert shallow.config["block_widths"] == [pruned.config["block_widths"][i] for i in (1, 3)]
        assert torch.equal(shallow.blocks[0].attn.qkv.weight, pruned.blocks[1].attn.qkv.weight)
        shallow(x, t, y)


def test_width_surgery_refuses_what_it_cannot_cut():
    model = tiny_dit()
    with pytest.raises(ValueError, match="keeps no heads"):
        prune_width(model, [[], [0], [0], [0]], [[0]] * 4)
    with pytest.raises(ValueError, match="distinct indices"):
        prune_width(model, [[0, 0], [0], [0], [0]], [[0]] * 4)
    with pytest.raises(ValueError, match="each of the 4 blocks"):
        prune_width(model, [[0]] * 3, [[0]] * 3)
    with pytest.raises(UserError, match="records none"):
        prune_width(tiny_mar(), [[0]] * 4, [[0]] * 4)


def test_a_bare_state_dict_of_per_block_widths_is_refused(tmp_path):
    pruned = prune_width(tiny_dit(num_heads=4), [[0], [0, 1], [0, 1], [0]], [[0], [1], [2], [3]])
    torch.save(pruned.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(UserError, match="cannot describe its heads") as info:
        load_model(tmp_path / "bare.pt", "DiT", num_heads=4)
    assert "\n" not in str(info.value)
    assert isinstance(pruned, DiT)
