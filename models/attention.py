"""Self-attention of the DiT-shaped families, in the kinds a config names, with one definition per kind.

Kinds (`config["attention"]`, recorded by every checkpoint):
- `{"kind": "global"}`: every token attends to every token (the official models).
- `{"kind": "local", "radius": r, "pool": f}`: CLEAR (Liu, Tan & Wang, "CLEAR: Conv-Like Linearization
  Revs Pre-Trained Diffusion Transformers Up", 2024): each image token attends only to the tokens of
  the 2D token grid whose Euclidean distance to it is strictly less than r. With `pool` f > 1, every
  query also attends to the keys and values average-pooled over f x f cells of the grid (CLEAR's
  `down_factor`: a coarse global view against the repetitive patterns of small windows), in the same
  softmax as its local keys. `pool` 1 (the default) has no pooled branch.

The definition is `local_mask` (a boolean mask over (query, key) pairs); three execution paths compute
the same attention from it, and `resolve_path` picks one:
- "flex": FlexAttention (`torch.nn.attention.flex_attention`), the mask as a `mask_mod`, its block
  mask built once per grid and cached; compiled, the fast path on CUDA, where it skips the masked
  blocks of keys.
- "tiled": queries in square tiles of the grid; each tile attends to the keys of the tile and its
  halo (the ceil(r) - 1 rows and columns around it that a circle of radius r can reach), as one
  batched SDPA call with the circle mask. Its cost grows with the tokens, not their square: the fast
  path on CPUs, where compiled FlexAttention is measured slower than global attention.
- "dense": one SDPA call with the full (T, T) boolean mask: the reference the others are checked
  against (and the cost of global attention).

Shapes: q, k, v are (B, H, T, head_dim) with T = grid_h * grid_w tokens in row-major order.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyfusion.errors import UserError

from .compiling import fail_at_recompile_limit

ATTENTION_KINDS = ("global", "local")
PATHS = ("auto", "flex", "tiled", "dense")
# Why a family without an `attention` config key (MAR) refuses local attention.
NO_ATTENTION_KINDS = ("local attention is defined on a full token grid, and MAR's encoder attends over the unmasked "
                      "tokens of a random order plus its class buffer; it is built for DiT and SiT")


def default_tile(radius: float) -> int:
    """Tile side of the halo-tiled path: a tile reads (tile + 2 * halo)^2 keys, so small tiles waste fewer
    keys on the window's corners, but below 8 the batched calls get too small to run fast. Measured on CPU
    (AMD EPYC, 128x128 grid, DiT-XL/2 heads): tile 8 and 16 within 10% of each other at r = 8, 16 faster
    at r = 16; tile 4 2x slower, tile 32 2-4x slower."""
    return 8 if radius <= 8 else 16


#################################################################################
#                              The kinds, as data                               #
#################################################################################

def attention_spec(spec: dict | None) -> dict:
    """A validated, complete copy of an attention config: {"kind": "global"}, or {"kind": "local",
    "radius": r > 0, "pool": f >= 1}. None is global.

    Raises:
        UserError: an unknown kind, a radius or pooling factor out of range, or unknown keys.
    """
    spec = dict(spec or {"kind": "global"})
    kind = spec.get("kind")
    if kind not in ATTENTION_KINDS:
        raise UserError(f"attention kind {kind!r} is not known; known: {', '.join(ATTENTION_KINDS)}")
    if kind == "global":
        extra = set(spec) - {"kind"}
        if extra:
            raise UserError(f"global attention takes no {sorted(extra)}")
        return {"kind": "global"}
    extra = set(spec) - {"kind", "radius", "pool"}
    if extra:
        raise UserError(f"local attention takes a radius and a pool factor, not {sorted(extra)}")
    radius = spec.get("radius")
    if not isinstance(radius, (int, float)) or isinstance(radius, bool) or not radius > 0 or math.isinf(radius):
        raise UserError(f"local attention needs a radius > 0 (tokens on the grid), got {radius!r}: "
                         "pass --attention-radius R")
    pool = spec.get("pool", 1)
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1:
        raise UserError(f"the pooled branch's factor must be an integer >= 1 (1: off), got {pool!r}")
    return {"kind": "local", "radius": radius, "pool": pool}


def describe_attention(spec: dict) -> str:
    """"global", "local r=8" or "local r=8 + keys pooled 4x4"."""
    if spec["kind"] == "global":
        return "global"
    text = f"local r={spec['radius']:g}"
    return text + (f" + keys pooled {spec['pool']}x{spec['pool']}" if spec["pool"] > 1 else "")


def halo(radius: float) -> int:
    """The largest row or column offset inside a circle of radius r (distance strictly below r)."""
    return math.ceil(radius) - 1


def pooled_grid(grid: tuple[int, int], pool: int) -> tuple[int, int]:
    return grid[0] // pool, grid[1] // pool


def check_grid(spec: dict, grid: tuple[int, int]) -> None:
    """A pooled branch needs a grid its factor divides."""
    if spec["kind"] == "local" and spec["pool"] > 1 and (grid[0] % spec["pool"] or grid[1] % spec["pool"]):
        raise UserError(f"the pooled branch's factor {spec['pool']} (--attention-pool) does not divide the token grid "
                         f"{grid[0]}x{grid[1]}: choose a factor of both sides")


#################################################################################
#                               The definition                                  #
#################################################################################

def _coordinates(grid: tuple[int, int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(grid[0], device=device).repeat_interleave(grid[1])
    cols = torch.arange(grid[1], device=device).repeat(grid[0])
    return rows, cols  # each (T,), row-major


def local_mask(grid: tuple[int, int], radius: float, pool: int = 1, device=None) -> torch.Tensor:
    """(T, T + T_pooled) bool: True where query i may attend to key j, the definition every path computes.

    Key j < T is a grid token, attended when |pos_i - pos_j| < radius; keys past T are the pooled ones
    (pool > 1), attended by every query.
    """
    rows, cols = _coordinates(grid, device)
    d2 = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2  # (T, T), exact integers
    mask = d2 < radius * radius
    if pool > 1:
        gh, gw = pooled_grid(grid, pool)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], gh * gw)], dim=1)
    return mask


def pooled_keys(x: torch.Tensor, grid: tuple[int, int], pool: int) -> torch.Tensor:
    """(B, H, T, D) keys or values averaged over pool x pool cells of the grid: (B, H, T / pool^2, D)."""
    B, H, T, D = x.shape
    cells = x.transpose(2, 3).reshape(B * H, D, grid[0], grid[1])
    cells = F.avg_pool2d(cells, pool)  # (B H, D, gh, gw)
    return cells.reshape(B, H, D, -1).transpose(2, 3)


#################################################################################
#                               Execution paths                                 #
#################################################################################

def resolve_path(spec: dict, device: torch.device | str, path: str = "auto", grid: tuple[int, int] | None = None
                 ) -> str:
    """The path an attention of this kind runs on `device`: "sdpa" for global attention; for local, `path` unless
    "auto": FlexAttention on CUDA; elsewhere the halo-tiled path, or the dense mask on a grid so small that a
    tile's window would read more than half the tokens (a radius near the grid's size: tiling saves nothing)."""
    if path not in PATHS:
        raise UserError(f"attention path {path!r} is not known; known: {', '.join(PATHS)}")
    if spec["kind"] == "global":
        return "sdpa"
    if path != "auto":
        return path
    if torch.device(device).type == "cuda":
        return "flex"
    if grid is not None:
        tile, h, _, _ = tile_layout(grid, spec["radius"])
        if 2 * (tile + 2 * h) ** 2 > grid[0] * grid[1]:
            return "dense"
    return "tiled"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: dict, grid: tuple[int, int],
           path: str = "auto") -> torch.Tensor:
    """Attention of q over k, v under the kind `spec` on a `grid` of tokens; (B, H, T, D) in and out."""
    path = resolve_path(spec, q.device, path, grid)
    if path == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if q.shape[2] != grid[0] * grid[1]:
        raise ValueError(f"{q.shape[2]} tokens on a {grid[0]}x{grid[1]} grid")
    radius, pool = spec["radius"], spec["pool"]
    if path == "dense":
        return _dense(q, k, v, grid, radius, pool)
    if path == "tiled":
        return _tiled(q, k, v, grid, radius, pool)
    return _flex(q, k, v, grid, radius, pool)


def _with_pooled(k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], pool: int):
    if pool == 1:
        return k, v
    return torch.cat([k, pooled_keys(k, grid, pool)], dim=2), torch.cat([v, pooled_keys(v, grid, pool)], dim=2)


def _dense(q, k, v, grid, radius, pool):
    mask = _cached_dense_mask(grid, radius, pool, q.device)
    k, v = _with_pooled(k, v, grid, pool)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@functools.lru_cache(maxsize=16)
def _cached_dense_mask(grid, radius, pool, device):
    return local_mask(grid, radius, pool, device)


def tile_layout(grid: tuple[int, int], radius: float, tile: int | None = None):
    """The halo-tiled path's geometry: (tile, halo, tiles per column, tiles per row); the grid is padded
    to whole tiles and by the halo on every side."""
    tile = max(1, min(tile or default_tile(radius), max(grid)))
    return tile, halo(radius), math.ceil(grid[0] / tile), math.ceil(grid[1] / tile)


@functools.lru_cache(maxsize=16)
def tile_mask(grid: tuple[int, int], radius: float, tile: int, pool: int, device) -> torch.Tensor:
    """(tiles, tile^2, window^2 + T_pooled) bool, window = tile + 2 * halo: the circle of each query of a
    tile over its window of keys, without the padding's keys. A query in the padding (a tile that runs
    past the grid) attends to every key of its window: its output is discarded, and a row with no key
    would be NaN."""
    tile, h, n_rows, n_cols = tile_layout(grid, radius, tile)
    window = tile + 2 * h
    qi = torch.arange(tile, device=device)
    wi = torch.arange(window, device=device) - h  # key offsets relative to the tile's first row / column
    dr = wi[None, :] - qi[:, None]  # (tile, window): key row - query row
    circle = (dr[:, None, :, None] ** 2 + dr[None, :, None, :] ** 2) < radius * radius  # (q_r, q_c, k_r, k_c)
    r0 = torch.arange(n_rows, device=device) * tile  # first grid row of each tile row
    c0 = torch.arange(n_cols, device=device) * tile
    q_row_ok = (r0[:, None] + qi[None]) < grid[0]  # (n_rows, tile)
    q_col_ok = (c0[:, None] + qi[None]) < grid[1]
    k_rows = r0[:, None] + wi[None]  # (n_rows, window)
    k_cols = c0[:, None] + wi[None]
    k_row_ok = (k_rows >= 0) & (k_rows < grid[0])
    k_col_ok = (k_cols >= 0) & (k_cols < grid[1])
    key_ok = k_row_ok[:, None, :, None] & k_col_ok[None, :, None, :]  # (n_rows, n_cols, window, window)
    query_ok = q_row_ok[:, None, :, None] & q_col_ok[None, :, None, :]  # (n_rows, n_cols, tile, tile)
    mask = circle[None, None] & key_ok[:, :, None, None]  # (n_rows, n_cols, tile, tile, window, window)
    mask = mask | ~query_ok[..., None, None]
    mask = mask.reshape(n_rows * n_cols, tile * tile, window * window)
    if pool > 1:
        gh, gw = pooled_grid(grid, pool)
        mask = torch.cat([mask, mask.new_ones(*mask.shape[:2], gh * gw)], dim=2)
    return mask


def _to_tiles(x: torch.Tensor, grid, tile, pad, n_rows, n_cols, window):
    """(B, H, T, D) -> (B * tiles, H, window^2, D): each tile's window (the tile and `pad` tokens around it),
    zeros past the grid. Tiles lead and heads follow: the layout SDPA runs fastest on CPU (measured 1.5-3x
    against heads first), with one mask per tile broadcast over the heads."""
    B, H, T, D = x.shape
    x = x.reshape(B, H, grid[0], grid[1], D).permute(0, 2, 3, 1, 4)  # (B, rows, cols, H, D)
    bottom = n_rows * tile - grid[0] + pad
    right = n_cols * tile - grid[1] + pad
    x = F.pad(x, (0, 0, 0, 0, pad, right, pad, bottom))
    x = x.unfold(1, window, tile).unfold(2, window, tile)  # (B, n_rows, n_cols, H, D, window, window)
    return x.permute(0, 1, 2, 3, 5, 6, 4).reshape(B * n_rows * n_cols, H, window * window, D)


def _tiled(q, k, v, grid, radius, pool, tile: int | None = None):
    B, H, T, D = q.shape
    tile, h, n_rows, n_cols = tile_layout(grid, radius, tile)
    n_tiles = n_rows * n_cols
    mask = tile_mask(grid, radius, tile, pool, q.device)  # (tiles, tile^2, keys)
    mask = mask[:, None].repeat(B, 1, 1, 1)  # (B * tiles, 1, tile^2, keys)
    q_tiles = _to_tiles(q, grid, tile, 0, n_rows, n_cols, tile)  # (B * tiles, H, tile^2, D)
    k_tiles = _to_tiles(k, grid, tile, h, n_rows, n_cols, tile + 2 * h)  # (B * tiles, H, window^2, D)
    v_tiles = _to_tiles(v, grid, tile, h, n_rows, n_cols, tile + 2 * h)
    if pool > 1:
        def every_tile(x):  # (B, H, T_pooled, D) -> (B * tiles, H, T_pooled, D)
            x = pooled_keys(x, grid, pool)
            return x[:, None].expand(-1, n_tiles, -1, -1, -1).reshape(B * n_tiles, *x.shape[1:])
        k_tiles = torch.cat([k_tiles, every_tile(k)], dim=2)
        v_tiles = torch.cat([v_tiles, every_tile(v)], dim=2)
    out = F.scaled_dot_product_attention(q_tiles, k_tiles, v_tiles, attn_mask=mask)  # (B * tiles, H, tile^2, D)
    out = out.reshape(B, n_rows, n_cols, H, tile, tile, D).permute(0, 3, 1, 4, 2, 5, 6)
    out = out.reshape(B, H, n_rows * tile, n_cols * tile, D)[:, :, : grid[0], : grid[1]]
    return out.reshape(B, H, T, D)


#################################################################################
#                                FlexAttention                                  #
#################################################################################

# Compiled flex_attention is compiled once per shape; sampling at several resolutions or batch sizes
# recompiles. Past dynamo's recompile limit torch would run the eager version (which materialises the
# full score matrix) without a word, so the limit is raised and reaching it fails loudly instead.
FLEX_RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=1)
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    fail_at_recompile_limit(FLEX_RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=16)
def flex_block_mask(grid: tuple[int, int], radius: float, pool: int, device):
    """The block mask of `local_mask` for FlexAttention, built once per (grid, radius, pool, device)."""
    from torch.nn.attention.flex_attention import create_block_mask
    rows, cols = _coordinates(grid, device)
    T = grid[0] * grid[1]
    r2 = radius * radius

    def circle(b, h, q_idx, kv_idx):
        kv = torch.clamp(kv_idx, max=T - 1)
        near = (rows[q_idx] - rows[kv]) ** 2 + (cols[q_idx] - cols[kv]) ** 2 < r2
        return near | (kv_idx >= T)  # keys past T: the pooled branch, seen by every query

    kv_len = T + (math.prod(pooled_grid(grid, pool)) if pool > 1 else 0)
    return create_block_mask(circle, B=None, H=None, Q_LEN=T, KV_LEN=kv_len, device=device)


def _flex(q, k, v, grid, radius, pool, compiled: bool = True):
    block_mask = flex_block_mask(grid, radius, pool, q.device)
    k, v = _with_pooled(k, v, grid, pool)
    if compiled:
        return compiled_flex_attention()(q, k, v, block_mask=block_mask)
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v, block_mask=block_mask)


#################################################################################
#                                 The module                                    #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's parameter layout), of any kind.

    The head dimension defaults to dim / num_heads (every official model); width pruning gives
    blocks other head counts and dimensions, so both are free: qkv maps dim to 3 * H * head_dim.
    The kind changes no parameter: a global model's weights load into a local one and back.

    Args:
        dim, num_heads, head_dim: the widths.
        kind: the attention kind (`attention_spec`); None is global.
        grid: (rows, columns) of the token grid, required by local attention.
    Attributes:
        path: "auto" (default), or a path of `PATHS` to force one (the benchmarks, the tests).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, *, kind: dict | None = None,
                 grid: tuple[int, int] | None = None):
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise UserError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
            head_dim = dim // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.kind = attention_spec(kind)
        if self.kind["kind"] == "local":
            if grid is None:
                raise ValueError("local attention needs the token grid")
            check_grid(self.kind, grid)
        self.grid = None if grid is None else tuple(grid)
        self.path = "auto"
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=True)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, head_dim)
        x = attend(q, k, v, self.kind, self.grid, self.path)  # (B, H, T, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))  # (B, T, D)


def convert_attention(model: nn.Module, spec: dict) -> None:
    """Make every attention of `model` (unwrapped) of the kind `spec`, in place, and record it in its config.
    No parameter changes: CLEAR starts the local model from the global one's weights.

    Raises:
        UserError: a family whose blocks have no attention kinds, or a pooled branch the grid does not divide.
    """
    spec = attention_spec(spec)
    if "attention" not in getattr(model, "config", {}):
        raise UserError(f"--attention: a {getattr(model, 'arch', type(model).__name__)} has no attention kinds "
                         f"({NO_ATTENTION_KINDS}); drop --attention")
    modules = attention_modules(model)
    for module in modules:
        check_grid(spec, module.grid)
    for module in modules:
        module.kind = dict(spec)
    model.config["attention"] = dict(spec)


def block_attention(block: nn.Module) -> Attention:
    """The one `Attention` of a transformer block (what CLEAR trains and compares per layer)."""
    found = [m for m in block.modules() if isinstance(m, Attention)]
    if len(found) != 1:
        raise ValueError(f"a block holds {len(found)} attention modules, not one")
    return found[0]


def attention_modules(model: nn.Module) -> list[Attention]:
    """Every `Attention` of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def set_attention_path(model: nn.Module, path: str) -> None:
    """Force one execution path on every attention of `model` ("auto" gives the choice back)."""
    if path not in PATHS:
        raise UserError(f"attention path {path!r} is not known; known: {', '.join(PATHS)}")
    for module in attention_modules(model):
        module.path = path


def attention_paths(model: nn.Module, device: torch.device | str) -> str:
    """What the log says: each attention kind of the model and the path it runs on `device` ("" for a model
    without these attention modules, MAR)."""
    seen: dict[tuple[str, str], int] = {}
    for m in attention_modules(model):
        key = (describe_attention(m.kind), resolve_path(m.kind, device, m.path, m.grid))
        seen[key] = seen.get(key, 0) + 1
    return ", ".join(f"{kind} ({path}, {n} layers)" for (kind, path), n in seen.items())
