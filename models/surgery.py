"""Depth surgery: a shallower model made of a chosen subset of a model's blocks, and its lineage."""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch.nn as nn


def validate_kept_indices(kept_indices: Iterable[int], depth: int) -> list[int]:
    """Checks that block indices are integers in [0, depth), unique and non-empty; returns them sorted.

    Raises:
        ValueError: naming the offending indices and the valid range.
    """
    kept = [int(i) for i in kept_indices]
    if not kept:
        raise ValueError("no blocks are kept: give at least one block index")
    out_of_range = sorted(i for i in kept if not 0 <= i < depth)
    if out_of_range:
        raise ValueError(f"block indices {out_of_range} are out of range for a model of depth {depth} "
                         f"(valid: 0 to {depth - 1})")
    duplicates = sorted({i for i in kept if kept.count(i) > 1})
    if duplicates:
        raise ValueError(f"block indices {duplicates} are given more than once")
    return sorted(kept)


def prune_depth(model: nn.Module, kept_indices: Sequence[int]) -> nn.Module:
    """A copy of `model` holding only the kept blocks, in their original order, renumbered 0..K-1.

    Everything outside the blocks (embedders, final layer) is copied unchanged, so block i of the
    result is bit-identical to block kept_indices[i] of the input.
    """
    kept = validate_kept_indices(kept_indices, len(model.blocks))
    blocks, model.blocks = model.blocks, nn.ModuleList()  # do not deep-copy the dropped blocks
    try:
        pruned = copy.deepcopy(model)
    finally:
        model.blocks = blocks
    pruned.blocks = nn.ModuleList(copy.deepcopy(blocks[i]) for i in kept)
    pruned.config = dict(model.config, depth=len(kept))
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
    """Student block i -> the teacher block it was copied from (the default distillation map)."""
    return {i: int(k) for i, k in enumerate(kept_indices)}
