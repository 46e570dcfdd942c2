"""Depth surgery: a shallower model made of a chosen subset of a model's blocks, and its lineage."""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch.nn as nn

from tinyfusion.errors import UserError

from .stacks import block_stacks, split_indices


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
