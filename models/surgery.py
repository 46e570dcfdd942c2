"""Surgery: a shallower model made of a chosen subset of a model's blocks (depth), a narrower one made of a
chosen subset of each block's attention heads and MLP channels (width), and their lineage.

Both return a copy and leave the source untouched; everything they do not remove is copied bit for bit,
and the config's depth and per-block widths follow, so the result's file rebuilds it with no flags.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from tinyfusion.errors import UserError

from .stacks import block_stacks, flat_blocks, split_indices, unwrap


def validate_kept_indices(kept_indices: Iterable[int], depth: int) -> list[int]:
    """Checks that block indices are integers in [0, depth), unique and non-empty; returns them sorted.

    Raises:
        UserError: naming the offending indices and the valid range.
    """
    kept = [int(i) for i in kept_indices]
    if not kept:
        raise UserError("no blocks are kept: give at least one block index")
    out_of_range = sorted(i for i in kept if not 0 <= i < depth)
    if out_of_range:
        raise UserError(f"block indices {out_of_range} are out of range for a model of depth {depth} "
                         f"(valid: 0 to {depth - 1})")
    duplicates = sorted({i for i in kept if kept.count(i) > 1})
    if duplicates:
        raise UserError(f"block indices {duplicates} are given more than once")
    return sorted(kept)


def prune_depth(model: nn.Module, kept_indices: Sequence[int]) -> nn.Module:
    """A copy of `model` holding only the kept blocks of each stack, in their original order, renumbered.

    `kept_indices` are flat indices over the concatenated stacks (models.stacks). Everything outside
    the blocks (embedders, norms, final layer) is copied unchanged, so flat block i of the result is
    bit-identical to flat block kept_indices[i] of the input. The config's depth and per-block widths
    of every stack follow. A gated model must be released first (`GatedModel.release`).
    """
    if hasattr(model, "gates"):
        raise ValueError("prune the model inside the gates: call GatedModel.release() first")
    stacks = block_stacks(model)
    kept = validate_kept_indices(kept_indices, sum(len(b) for b in stacks.values()))
    per_stack = split_indices(kept, {name: len(b) for name, b in stacks.items()})
    attrs = type(model).stacks
    for name in stacks:  # do not deep-copy the dropped blocks
        setattr(model, attrs[name][0], nn.ModuleList())
    try:
        pruned = copy.deepcopy(model)
    finally:
        for name, blocks in stacks.items():
            setattr(model, attrs[name][0], blocks)
    config = dict(model.config)
    for name, (attr, depth_key, widths_key) in attrs.items():
        setattr(pruned, attr, nn.ModuleList(copy.deepcopy(stacks[name][i]) for i in per_stack[name]))
        config[depth_key] = len(per_stack[name])
        if widths_key and config.get(widths_key) is not None:
            config[widths_key] = [dict(config[widths_key][i]) for i in per_stack[name]]
    pruned.config = config
    return pruned


def compose_kept_indices(source_kept: Sequence[int] | None, kept: Sequence[int]) -> list[int]:
    """Original block indices of a model pruned twice.

    `source_kept[j]` is the original block that block j of the source came from (None when the
    source is unpruned); the result maps each kept block of the new model to its original block.
    """
    if source_kept is None:
        return list(kept)
    return [source_kept[i] for i in kept]


def layer_map(kept_indices: Sequence[int]) -> dict[int, int]:
    """Student block i -> the teacher block it was copied from (the default distillation map; flat indices)."""
    return {i: int(k) for i, k in enumerate(kept_indices)}


#################################################################################
#                                  Width surgery                                #
#################################################################################
# A head goes whole: its rows in each of q, k and v of the fused qkv layer (rows part * H * d + h * d + j, part
# 0, 1, 2 for q, k, v; timm's layout) and its d input columns of the output projection. An MLP channel goes as
# its fc1 row (and bias) and its fc2 column. The residual width, the adaLN modulation, the embedders and the
# final layer are untouched: the output projection and fc2 keep their biases and their output size.

def width_stack_keys(model: nn.Module) -> dict[str, str]:
    """Stack name -> the config key of its per-block widths, for a model whose blocks width surgery can cut.

    Raises:
        UserError: a family whose config records no per-block widths (MAR: timm blocks whose widths its
            constructor cannot take per block).
    """
    inner = unwrap(model)
    keys = {name: widths_key for name, (_, _, widths_key) in type(inner).stacks.items()}
    missing = [name for name, key in keys.items() if not key]
    if missing:
        raise UserError(f"width pruning cuts blocks whose per-block widths the config records (DiT, SiT); a "
                         f"{inner.arch}'s stack {missing[0]!r} records none: its blocks are built at one width (MAR: "
                         "timm blocks, and the surgery does not cover its diffusion head), so a narrowed model could "
                         "not be rebuilt from its file; prune its depth instead")
    return keys


def block_units(model: nn.Module) -> list[tuple[int, int]]:
    """(attention heads, MLP hidden channels) of every flat block."""
    return [(block.attn.num_heads, block.mlp.fc1.out_features) for block in flat_blocks(model)]


def prunable_layers(block: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """The four layers width surgery cuts in a block: qkv (rows), proj (columns), fc1 (rows), fc2 (columns)."""
    return block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2


def unit_sums(block: nn.Module, values: Callable[[nn.Linear], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head (H,) and per-channel (C,) sums, in float64, of `values(layer)` (a tensor shaped like the layer's
    weight: |w * g|, w^2) over the weights each unit owns: a head's q, k and v rows and output-projection
    columns, a channel's fc1 row and fc2 column (biases not counted)."""
    qkv, proj, fc1, fc2 = prunable_layers(block)
    heads, head_dim = block.attn.num_heads, block.attn.head_dim
    per_head = values(qkv).double().sum(dim=1).reshape(3, heads, head_dim).sum(dim=(0, 2))  # q, k, v rows: (H,)
    per_head = per_head + values(proj).double().sum(dim=0).reshape(heads, head_dim).sum(dim=1)  # columns: (H,)
    per_channel = values(fc1).double().sum(dim=1) + values(fc2).double().sum(dim=0)  # (C,)
    return per_head, per_channel


def _validate_units(kept: Sequence[int], total: int, what: str, block: int) -> list[int]:
    kept = sorted(int(i) for i in kept)
    if not kept:
        raise ValueError(f"block {block} keeps no {what}: keep at least one")
    if len(set(kept)) != len(kept) or kept[0] < 0 or kept[-1] >= total:
        raise ValueError(f"block {block}: kept {what} {kept} must be distinct indices in [0, {total})")
    return kept


def _sliced_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
                   ) -> nn.Linear:
    """A copy of `layer` keeping the output rows `rows` (and their bias) and the input columns `cols`."""
    weight = layer.weight.detach()
    bias = layer.bias.detach() if layer.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    out.weight.requires_grad_(layer.weight.requires_grad)
    if bias is not None:
        out.bias.requires_grad_(layer.bias.requires_grad)
    return out


def head_rows(num_heads: int, head_dim: int, heads: Sequence[int]) -> torch.Tensor:
    """Rows of a fused qkv weight (3 * H * d, D) that hold `heads`: their q rows, then k, then v."""
    per_head = torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)
    return torch.cat([part * num_heads * head_dim + per_head for part in range(3)])


def head_columns(head_dim: int, heads: Sequence[int]) -> torch.Tensor:
    """Input columns of the output projection (D, H * d) that `heads` write."""
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


def prune_width(model: nn.Module, kept_heads: Sequence[Sequence[int]], kept_channels: Sequence[Sequence[int]]
                ) -> nn.Module:
    """A copy of `model` whose flat block i keeps the attention heads `kept_heads[i]` and the MLP hidden
    channels `kept_channels[i]` (indices into that block's heads and channels), in their original order.

    Exact: the result computes what the source computes with the removed heads' attention outputs and the
    removed channels' activations set to zero. The config's per-block widths follow (num_heads and
    mlp_hidden; head_dim is kept); the embedders, the adaLN modulation, the norms and the final layer are
    copied unchanged. A gated model must be released first (`GatedModel.release`).

    Raises:
        UserError: a family whose config records no per-block widths (`width_stack_keys`).
        ValueError: a list per block that does not match the model, or a block left with no head or channel.
    """
    if hasattr(model, "gates"):
        raise ValueError("prune the model inside the gates: call GatedModel.release() first")
    keys = width_stack_keys(model)
    units = block_units(model)
    if len(kept_heads) != len(units) or len(kept_channels) != len(units):
        raise ValueError(f"give kept heads and channels for each of the {len(units)} blocks, got "
                         f"{len(kept_heads)} and {len(kept_channels)}")
    pruned = copy.deepcopy(model)
    config = dict(model.config)
    blocks = flat_blocks(pruned)
    for i, (block, (num_heads, hidden)) in enumerate(zip(blocks, units)):
        heads = _validate_units(kept_heads[i], num_heads, "heads", i)
        channels = _validate_units(kept_channels[i], hidden, "MLP channels", i)
        attn, mlp = block.attn, block.mlp
        attn.qkv = _sliced_linear(attn.qkv, rows=head_rows(num_heads, attn.head_dim, heads))
        attn.proj = _sliced_linear(attn.proj, cols=head_columns(attn.head_dim, heads))
        attn.num_heads = len(heads)
        index = torch.tensor(channels, dtype=torch.long)
        mlp.fc1 = _sliced_linear(mlp.fc1, rows=index)
        mlp.fc2 = _sliced_linear(mlp.fc2, cols=index)
    for name, stack in block_stacks(pruned).items():
        config[keys[name]] = [{"num_heads": b.attn.num_heads, "head_dim": b.attn.head_dim,
                               "mlp_hidden": b.mlp.fc1.out_features} for b in stack]
    pruned.config = config
    return pruned


def compose_kept_units(source_kept: Sequence[Sequence[int]] | None, kept: Sequence[Sequence[int]]) -> list[list[int]]:
    """Original heads (or channels) of each block of a model narrowed twice.

    `source_kept[i]` lists the original units that block i of the source kept (None when the source was never
    narrowed); the result maps each kept unit of the new model to its original unit, block by block.
    """
    if source_kept is None:
        return [[int(u) for u in units] for units in kept]
    return [[int(source_kept[i][u]) for u in units] for i, units in enumerate(kept)]
