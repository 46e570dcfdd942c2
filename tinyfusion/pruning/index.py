"""Depth pruning by index: a chosen set of blocks (flat or per stack), or a preset pattern (BK-SDM's oracle, the
first k blocks)."""

from __future__ import annotations

import logging
from typing import Sequence

from models import join_indices, parse_stack_indices, stack_depths, validate_kept_indices

from ..checkpoint import load_with_flags
from ..distributed import barrier
from ..errors import UserError
from ..options import IndexPruningOptions, RuntimeOptions
from ..paths import check_outputs
from ..runtime import bootstrap
from .saving import save_pruned


def oracle_indices(depth: int) -> list[int]:
    """BK-SDM's pattern at half depth: blocks in consecutive pairs; pairs in the first half keep their
    first block, pairs in the second half their last (for 28 blocks: 0 2 ... 12 15 17 ... 27)."""
    if depth % 2 or depth < 2:
        raise UserError(f"the oracle pattern halves a model of even depth; this one has {depth} blocks")
    pairs = depth // 2
    return [2 * p if 2 * p < depth / 2 else 2 * p + 1 for p in range(pairs)]


def first_k_indices(depth: int, k: int) -> list[int]:
    if not 1 <= k <= depth:
        raise UserError(f"--target-depth {k} must be between 1 and the model's depth {depth}")
    return list(range(k))


def kept_from_pruned(pruned: Sequence[int], depth: int) -> list[int]:
    """The complement of pruned block indices (validated)."""
    pruned = validate_kept_indices(pruned, depth)
    kept = [i for i in range(depth) if i not in set(pruned)]
    if not kept:
        raise UserError("--pruned-indices removes every block; keep at least one")
    return kept


def run_prune_by_index(args: IndexPruningOptions) -> None:
    """prune_by_index.py: keep a chosen set of blocks (rank 0 writes under torchrun)."""
    check_outputs({"--save-model": args.save_model}, {"--ckpt": args.ckpt})
    with bootstrap(RuntimeOptions(), device="cpu") as rt:  # surgery needs no GPU
        if rt.env.is_main:
            _prune_by_index(args, rt.logger)
        barrier()


def _prune_by_index(args: IndexPruningOptions, logger: logging.Logger) -> None:
    source = load_with_flags(args.ckpt, args)
    depths = stack_depths(source.model)
    depth = sum(depths.values())
    if args.preset == "oracle":
        # The BK-SDM pattern halves each stack on its own.
        kept = join_indices({name: oracle_indices(d) for name, d in depths.items()}, depths)
        if args.target_depth is not None and args.target_depth != len(kept):
            raise UserError(f"--preset oracle is BK-SDM's pattern at half depth ({len(kept)} of {depth} blocks); it "
                             f"has no form for --target-depth {args.target_depth}: drop --target-depth, or use "
                             "--preset first-k, --kept-indices, or prune_by_score.py for that depth")
        method = "oracle"
    elif args.preset == "first-k":
        if args.target_depth is None:
            raise UserError("--preset first-k needs --target-depth")
        kept, method = first_k_indices(depth, args.target_depth), "first-k"
    elif args.kept_indices is not None:
        kept = validate_kept_indices(parse_stack_indices(args.kept_indices, depths, "--kept-indices"), depth)
        method = "index"
    else:
        kept, method = kept_from_pruned(parse_stack_indices(args.pruned_indices, depths, "--pruned-indices"),
                                        depth), "index"
    save_pruned(source, kept, args.save_model, method, logger)
