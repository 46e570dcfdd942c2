"""The pruned-model file that every pruning method writes: the model cut from its source, with its lineage."""

from __future__ import annotations

import logging
from typing import Sequence

import torch.nn as nn

from models import GatedModel, flat_blocks, prune_depth, prune_width, split_indices, stack_depths, validate_kept_indices

from ..checkpoint import LoadedModel, pruned_lineage, save_model
from ..training import parameter_count
from .width import block_parameter_count


def save_pruned(source: LoadedModel, kept: Sequence[int], path: str, method: str, logger: logging.Logger,
                extra: dict | None = None, width: dict | None = None) -> nn.Module:
    """Cuts the kept blocks (flat indices) out of `source`, narrows them by `width` when given, and writes a
    self-describing pruned checkpoint.

    `width`: {"kept_heads", "kept_channels"} (per kept block, the indices of its heads and MLP channels to keep)
    and how they were chosen ("criterion", "ratio", "global"), all recorded in the lineage. A gated source gives
    its wrapped model up first (its gate hooks are removed), so the pruned model carries no hooks and no copy of
    the gates.
    """
    model = source.model.release() if isinstance(source.model, GatedModel) else source.model
    depths = stack_depths(model)
    kept = validate_kept_indices(kept, sum(depths.values()))
    pruned = prune_depth(model, kept)
    if width is not None:
        pruned = prune_width(pruned, width["kept_heads"], width["kept_channels"])
    lineage = pruned_lineage(source, kept, method, width=width)
    save_model(path, pruned, process=source.process, codec=source.codec, lineage=lineage, extra=extra)
    before, after = parameter_count(model), parameter_count(pruned)
    per_stack = "" if len(depths) == 1 else " (" + ", ".join(
        f"{name} {idx}" for name, idx in split_indices(kept, depths).items()) + ")"
    logger.info(f"kept blocks {kept}{per_stack} of {sum(depths.values())} ({method}); original blocks "
                f"{lineage['kept_indices']}; parameters {before:,} -> {after:,} ({after / before:.1%})")
    if width is not None:
        blocks = flat_blocks(model)
        full, narrow = block_parameter_count(blocks[i] for i in kept), block_parameter_count(flat_blocks(pruned))
        logger.info(f"the kept blocks' attention and MLP parameters: {full:,} -> {narrow:,} ({narrow / full:.1%})")
    logger.info(f"saved {path}")
    return pruned

