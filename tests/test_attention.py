"""Attention kinds (issue 22): CLEAR's local attention as one definition, computed by three execution paths.

The definition is the circle: query i attends to grid token j when |pos_i - pos_j| < r (strictly), plus every
pooled key with a pooled branch. Each path is compared with a softmax written out here from that definition.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_dit, tiny_sit
from helpers.tolerance import KERNEL_REL, assert_fp32_close

from models import DiT, build_architecture
from models.attention import (
    Attention,
    attend,
    attention_paths,
    attention_spec,
    convert_attention,
    local_mask,
    pooled_keys,
    resolve_path,
    set_attention_path,
    tile_layout,
    tile_mask,
)
from tinyfusion.checkpoint import load_model, save_model
from tinyfusion.errors import UserError

# Square and non-square grids; radii below, between and above whole numbers; tiles that divide the grid
# and tiles that do not (the last row and column of tiles run past the grid).
CASES = [  # (grid, radius, pool, tile)
    ((8, 8), 3, 1, 4),
    ((8, 8), 2.5, 1, 8),
    ((7, 10), 2.5, 1, 4),
    ((9, 6), 4, 3, 8),
    ((12, 12), 1.5, 4, 5),
    ((5, 6), 100, 1, 8),
    ((6, 9), 1, 1, 3),
]


def circle_by_distances(grid, radius):
    """(T, T) bool from each pair's Euclidean distance, computed pair by pair in float64."""
    positions = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    return torch.tensor([[math.dist(p, q) < radius for q in positions] for p in positions])


def reference_attention(q, k, v, grid, radius, pool):
    """Softmax over the allowed keys, written out: scores, -inf outside the circle, softmax, average."""
    allowed = circle_by_distances(grid, radius)
    if pool > 1:
        k = torch.cat([k, pooled_keys(k, grid, pool)], dim=2)
        v = torch.cat([v, pooled_keys(v, grid, pool)], dim=2)
        allowed = torch.cat([allowed, torch.ones(allowed.shape[0], k.shape[2] - allowed.shape[0], dtype=bool)], 1)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (scores.masked_fill(~allowed, -math.inf).softmax(-1) @ v.double()).float()


def qkv(grid, heads=3, dim=16, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, grid[0] * grid[1], dim, generator=g) for _ in range(3)]


@pytest.mark.parametrize("grid", [(8, 8), (7, 10), (10, 3)])
@pytest.mark.parametrize("radius", [1, 1.5, 2, 3.2, 8])
def test_the_mask_is_the_circle(grid, radius):
    assert torch.equal(local_mask(grid, radius), circle_by_distances(grid, radius))


def test_the_mask_counts_the_offsets_of_the_circle():
    # Radius 1 keeps the token itself; 1.2 its 4 neighbours too; 1.5 the 4 diagonals (1.41); 2 is strict, so
    # still 9; 2.01 adds the 4 at distance 2; 2.3 the 8 at sqrt(5) = 2.24.
    for radius, count in ((1, 1), (1.2, 5), (1.5, 9), (2, 9), (2.01, 13), (2.3, 21)):
        assert local_mask((9, 9), radius)[40].sum().item() == count  # token 40 is the centre of the 9x9 grid


def test_the_pooled_branch_is_seen_by_every_query():
    mask = local_mask((8, 8), 2, pool=4)
    assert mask.shape == (64, 64 + 4)
    assert mask[:, 64:].all()
    keys = torch.arange(64.0).reshape(1, 1, 64, 1)  # row-major grid positions
    pooled = pooled_keys(keys, (8, 8), 4)[0, 0, :, 0]
    # The first pooled key averages rows 0-3 and columns 0-3: positions r * 8 + c.
    assert pooled.tolist() == [sum(r * 8 + c for r in range(4) for c in range(4)) / 16 + off for off in (0, 4, 32, 36)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("grid,radius,pool,tile", CASES)
def test_every_path_computes_the_definition(grid, radius, pool, tile):
    q, k, v = qkv(grid)
    expected = reference_attention(q, k, v, grid, radius, pool)
    spec = attention_spec({"kind": "local", "radius": radius, "pool": pool})
    from models.attention import _flex, _tiled

    # KERNEL_REL: one attention evaluation in float32 against the float64 softmax (tests/helpers/tolerance.py).
    assert_fp32_close(attend(q, k, v, spec, grid, "dense"), expected, KERNEL_REL)
    assert_fp32_close(_tiled(q, k, v, grid, radius, pool, tile), expected, KERNEL_REL)
    assert_fp32_close(attend(q, k, v, spec, grid, "tiled"), expected, KERNEL_REL)
    # Eager FlexAttention (it warns once that it is unfused) reads the block mask the compiled kernel reads.
    assert_fp32_close(_flex(q, k, v, grid, radius, pool, compiled=False), expected, KERNEL_REL)


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "default",
                    reason="torch 2.14.1's inductor emits at::vec::transpose_block for FlexAttention, which the "
                           "default (non-vectorised) CPU capability lacks: the C++ does not compile")
def test_compiled_flex_attention_computes_the_definition():
    """The CUDA fast path's kernel, compiled here on the CPU: a non-square grid, a head width that is no power
    of two (DiT-XL/2's heads are 72 wide) and a pooled branch."""
    grid, radius, pool = (6, 9), 2.5, 3
    q, k, v = qkv(grid, heads=2, dim=24)
    spec = attention_spec({"kind": "local", "radius": radius, "pool": pool})
    assert_fp32_close(attend(q, k, v, spec, grid, "flex"), reference_attention(q, k, v, grid, radius, pool),
                      KERNEL_REL)


def test_the_tiled_path_has_the_gradients_of_the_dense_one():
    grid, radius = (7, 9), 2.5
    spec = attention_spec({"kind": "local", "radius": radius, "pool": 1})
    grads = {}
    for path in ("dense", "tiled"):
        q, k, v = (x.requires_grad_() for x in qkv(grid))
        (attend(q, k, v, spec, grid, path) ** 2).sum().backward()
        grads[path] = [q.grad, k.grad, v.grad]
    for tiled, dense in zip(grads["tiled"], grads["dense"]):
        assert_fp32_close(tiled, dense, KERNEL_REL)


def test_the_tiles_cover_the_grid_and_their_padding_never_leaks():
    grid, radius = (7, 10), 2.5
    tile, halo, n_rows, n_cols = tile_layout(grid, radius, 4)
    assert (tile, halo, n_rows, n_cols) == (4, 2, 2, 3)
    mask = tile_mask(grid, radius, tile, 1, torch.device("cpu"))
    window = tile + 2 * halo
    assert mask.shape == (n_rows * n_cols, tile * tile, window * window)
    # The first tile's first query (grid 0, 0) sees the keys of its circle inside the grid: (0,0), (0,1), (0,2),
    # (1,0), (1,1), (2,0) and (1,2)? |(1,2)| = 2.24 < 2.5, yes; (2,1) too; (2,2) = 2.83 no.
    seen = {(r - halo, c - halo) for r in range(window) for c in range(window) if mask[0, 0, r * window + c]}
    assert seen == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)}


def _local(model_cls, radius, pool=1, seed=0, **overrides):
    attention = {"kind": "local", "radius": radius, "pool": pool}
    builder = tiny_dit if model_cls is DiT else tiny_sit
    return builder(seed=seed, attention=attention, **overrides)


@pytest.mark.parametrize("builder", [tiny_dit, tiny_sit])
def test_a_radius_that_covers_the_grid_gives_the_global_model(builder):
    torch.manual_seed(0)
    global_model = builder(seed=3).eval()
    local = builder(seed=3, attention={"kind": "local", "radius": 6, "pool": 1}).eval()  # 4x4 tokens: all < 4.3
    narrow = builder(seed=3, attention={"kind": "local", "radius": 1.5, "pool": 1}).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 999]), torch.tensor([1, 2, 3])
    if builder is tiny_sit:
        t = t / 1000
    with torch.no_grad():
        expected = global_model(x, t, y)
        assert_fp32_close(local(x, t, y), expected, KERNEL_REL)
        assert (narrow(x, t, y) - expected).abs().max() > 100 * KERNEL_REL * expected.abs().max()


def test_the_kind_changes_no_parameter_and_converts_in_place():
    model = tiny_dit(seed=1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_attention(model, {"kind": "local", "radius": 2, "pool": 2})
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config["attention"] == {"kind": "local", "radius": 2, "pool": 2}
    assert attention_paths(model, "cpu") == "local r=2 + keys pooled 2x2 (dense, 4 layers)"  # 4x4 tokens
    rebuilt = build_architecture("DiT", model.config).eval()
    rebuilt.load_state_dict(after)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 9])
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t, y), model(x, t, y))


def test_a_file_records_its_kind_and_a_bare_state_dict_loads_as_stated(tmp_path):
    model = _local(DiT, 2.5)
    save_model(tmp_path / "local.pt", model)
    loaded = load_model(tmp_path / "local.pt")
    assert loaded.config["attention"] == {"kind": "local", "radius": 2.5, "pool": 1}
    assert all(m.kind == loaded.config["attention"] for m in loaded.model.modules() if isinstance(m, Attention))
    with pytest.raises(UserError, match="records local r=2.5 attention"):
        load_model(tmp_path / "local.pt", attention={"kind": "global"})
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert load_model(tmp_path / "bare.pt", "DiT", num_heads=2).config["attention"] == {"kind": "global"}
    stated = attention_spec({"kind": "local", "radius": 2.5, "pool": 1})
    bare = load_model(tmp_path / "bare.pt", "DiT", num_heads=2, attention=stated)
    assert bare.config["attention"] == stated


def test_forced_paths_give_one_model_output():
    model = _local(DiT, 2.5, pool=2, seed=4).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 9])
    outputs = {}
    with torch.no_grad():
        for path in ("dense", "tiled"):
            set_attention_path(model, path)
            outputs[path] = model(x, t, y)
    assert_fp32_close(outputs["tiled"], outputs["dense"], KERNEL_REL)


@pytest.mark.parametrize("spec,needle", [
    ({"kind": "window"}, "not known"),
    ({"kind": "local"}, "radius > 0"),
    ({"kind": "local", "radius": 0}, "radius > 0"),
    ({"kind": "local", "radius": 2, "pool": 0}, "integer >= 1"),
    ({"kind": "local", "radius": 2, "size": 3}, "not ['size']"),
    ({"kind": "global", "radius": 2}, "takes no"),
])
def test_bad_attention_specs_are_one_line(spec, needle):
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        attention_spec(spec)


def test_a_pooled_branch_needs_a_factor_of_the_grid():
    with pytest.raises(UserError, match="does not divide the token grid 4x4"):
        tiny_dit(attention={"kind": "local", "radius": 2, "pool": 3})
    model = tiny_dit()
    with pytest.raises(UserError, match="does not divide"):
        convert_attention(model, {"kind": "local", "radius": 2, "pool": 3})
    assert model.config["attention"] == {"kind": "global"}  # refused before anything changed


def test_the_automatic_path_follows_the_device_and_the_grid():
    r8 = attention_spec({"kind": "local", "radius": 8})
    assert resolve_path(r8, "cuda", "auto", (16, 16)) == "flex"
    assert resolve_path(r8, "cpu", "auto", (64, 64)) == "tiled"  # a tile reads 22^2 of 4096 keys
    assert resolve_path(r8, "cpu", "auto", (16, 16)) == "dense"  # 22^2 of 256: tiling saves nothing
    assert resolve_path(r8, "cpu", "dense", (64, 64)) == "dense"
    assert resolve_path({"kind": "global"}, "cuda", "auto", (64, 64)) == "sdpa"
    with pytest.raises(UserError, match="attention path 'fast' is not known"):
        resolve_path(r8, "cpu", "fast")


def test_global_attention_is_plain_sdpa():
    grid = (4, 4)
    q, k, v = qkv(grid)
    assert torch.equal(attend(q, k, v, {"kind": "global"}, grid), F.scaled_dot_product_attention(q, k, v))
