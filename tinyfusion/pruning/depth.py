"""Score-based depth pruning baselines: ShortGPT block influence, loss sensitivity, random; and prune_by_score.py,
which prunes depth by them, width by `width` (--width-ratio), or depth first and then width.

Each criterion gives every block an importance (higher = more important); the least important
unprotected blocks are pruned. Calibration batches come from the feature dataset at random
timesteps, split over the processes and reduced, with the same draws for any process count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import BlockRecorder, flat_blocks, stack_depths, total_depth, width_stack_keys
from processes import NoiseProcess

from ..checkpoint import LoadedModel, load_with_flags
from ..distributed import all_reduce_sum, barrier
from ..errors import UserError
from ..features import SeedPurpose, derive_seed
from ..options import ScorePruningOptions
from ..paths import check_outputs
from ..precision import autocast
from ..runtime import Runtime, bootstrap
from .calibration import calibration_batches
from .saving import save_pruned
from .width import TAYLOR_THRESHOLD, check_taylor_threshold, check_width_ratio, width_decision

CRITERIA = ("bi", "loss", "random")
# Calibration batches of the depth criteria when --num-batches is not given.
DEPTH_NUM_BATCHES = 16


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable, call: Callable[[Any], Any] | None = None
                    ) -> tuple[torch.Tensor, int]:
    """ShortGPT's block influence summed over samples: sum of (1 - mean_tokens cos(h_in, h_out)).

    Args:
        model: the model (eval mode).
        batches: the batches to score on.
        call: runs the model on one batch; default `model(*batch)` for batches of denoiser inputs
            (x_t (N, C, H, W), t (N,), y (N,)). Through a noise process:
            `lambda b: process.predict(model, b["x"], b["draws"], dict(y=b["y"]))`.
    Returns:
        (per-block sums (depth,) float64 over the flat blocks, number of samples); divide for the mean.
    """
    call = call or (lambda batch: model(*batch))
    blocks = flat_blocks(model)
    sums, count = torch.zeros(len(blocks), dtype=torch.float64), 0
    with BlockRecorder(blocks, inputs=True) as tap:
        for batch in batches:
            call(batch)
            for i, h_out in tap.outputs.items():
                cos = F.cosine_similarity(tap.inputs[i].float(), h_out.float(), dim=-1)  # (N, T)
                sums[i] += (1.0 - cos.mean(dim=1)).double().sum().cpu()
            count += tap.inputs[0].shape[0]
    return sums, count


def _skip(module, args, output):
    return args[0]


@torch.no_grad()
def loss_sensitivity(model: nn.Module, process: NoiseProcess, batches: Sequence[dict]) -> tuple[torch.Tensor, int]:
    """Increase of the training loss when each block alone is removed, summed over samples.

    Args:
        model: the model (eval mode).
        process: the noise process (its training loss).
        batches: dicts with x (clean data), y and the process's draws under "draws"; the same draws
            serve every block.
    Returns:
        (per-block sums of loss(without block) - loss(full model) (depth,) float64, number of samples).
    """
    def total_loss() -> torch.Tensor:
        return sum(process.training_losses(model, b["x"], b["draws"], dict(y=b["y"]))["loss"].double().sum().cpu()
                   for b in batches)

    baseline = total_loss()
    blocks = flat_blocks(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    for i, block in enumerate(blocks):
        handle = block.register_forward_hook(_skip)
        try:
            sums[i] = total_loss() - baseline
        finally:
            handle.remove()
    return sums, sum(b["x"].shape[0] for b in batches)


def random_scores(depth: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed(SeedPurpose.RANDOM_SCORES, seed))
    return torch.rand(depth, generator=g, dtype=torch.float64)


def select_kept(scores: Sequence[float], n_pruned: int, protect_first: int = 0, protect_last: int = 0) -> list[int]:
    """Prunes the n_pruned least important blocks outside the protected first and last ones.

    Raises:
        UserError: when the protected blocks leave fewer than n_pruned candidates.
    """
    depth = len(scores)
    if protect_first < 0 or protect_last < 0:
        raise UserError("--protect-first and --protect-last must be non-negative")
    candidates = [i for i in range(depth) if protect_first <= i < depth - protect_last]
    if not 1 <= n_pruned <= len(candidates) or n_pruned >= depth:
        raise UserError(f"cannot prune {n_pruned} of {depth} blocks with the first {protect_first} and the last "
                         f"{protect_last} protected ({len(candidates)} candidates); lower the number pruned or "
                         "protect fewer blocks")
    pruned = sorted(candidates, key=lambda i: (float(scores[i]), i))[:n_pruned]
    return [i for i in range(depth) if i not in set(pruned)]


def stack_targets(target_depth: Sequence[str] | None, depths: dict[str, int], ckpt: str) -> dict[str, int] | None:
    """Per-stack kept depths of a `--target-depth` written per stack (encoder=8 decoder=8), else None.

    Raises:
        UserError: a stack missing, unknown or given a depth outside 1..its depth.
    """
    if not target_depth:
        return None
    if not any("=" in t for t in target_depth):
        if len(target_depth) != 1 or not target_depth[0].isdigit():
            raise UserError(f"--target-depth {' '.join(target_depth)}: give one number, or one STACK=DEPTH per "
                             f"stack ({', '.join(f'{n}=...' for n in depths)})")
        return None
    targets = {}
    for term in target_depth:
        name, _, value = term.partition("=")
        if name not in depths:
            raise UserError(f"--target-depth {term}: {ckpt} has the stacks {', '.join(depths)}")
        if not value.isdigit() or not 1 <= int(value) <= depths[name]:
            raise UserError(f"--target-depth {term}: keep between 1 and {depths[name]} blocks of {name!r}")
        targets[name] = int(value)
    missing = [n for n in depths if n not in targets]
    if missing:
        raise UserError(f"--target-depth: give a depth for every stack; {missing[0]!r} has none")
    if sum(targets.values()) == sum(depths.values()):
        raise UserError("--target-depth keeps every block: prune at least one")
    return targets


def select_kept_per_stack(scores: Sequence[float], targets: dict[str, int], depths: dict[str, int],
                          protect_first: int = 0, protect_last: int = 0) -> list[int]:
    """`select_kept` within each stack (flat indices): stack s keeps its targets[s] most important blocks."""
    kept, offset = [], 0
    for name, depth in depths.items():
        local = list(scores[offset:offset + depth])
        n_pruned = depth - targets[name]
        chosen = range(depth) if n_pruned == 0 else select_kept(local, n_pruned, protect_first, protect_last)
        kept += [offset + i for i in chosen]
        offset += depth
    return kept


def format_score_table(scores: Sequence[float], kept: Sequence[int], criterion: str) -> str:
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    rank = {i: r + 1 for r, i in enumerate(order)}
    lines = [f"block | {criterion} score | rank | decision", "------|------------|------|---------"]
    lines += [f"{i:5d} | {float(s):10.6f} | {rank[i]:4d} | {'kept' if i in set(kept) else 'pruned'}"
              for i, s in enumerate(scores)]
    return "\n".join(lines)


def run_prune_by_score(args: ScorePruningOptions) -> None:
    """prune_by_score.py: score every block on calibration data and prune the least important (depth), then
    score every head and MLP channel of the kept blocks and remove the least important (width, with
    --width-ratio); either alone or both."""
    depth_given = args.n_pruned is not None or args.target_depth is not None
    if args.n_pruned is not None and args.target_depth is not None:
        raise UserError("give at most one of --n-pruned and --target-depth")
    if not depth_given and args.width_ratio is None:
        raise UserError("give what to prune: --n-pruned or --target-depth (blocks), --width-ratio (heads and MLP "
                         "channels), or both")
    if args.width_ratio is None:
        stray = [flag for flag, value, default in (
            ("--width-criterion", args.width_criterion, "taylor"), ("--global-width", args.global_width, False),
            ("--taylor-threshold", args.taylor_threshold, TAYLOR_THRESHOLD)) if value != default]
        if stray:
            raise UserError(f"{stray[0]} applies to width pruning: add --width-ratio (or drop {stray[0]})")
    else:
        check_width_ratio(args.width_ratio)
        check_taylor_threshold(args.taylor_threshold)
    scores_path = Path(args.save_scores or Path(args.save_model).with_suffix(".scores.json"))
    check_outputs({"--save-model": args.save_model, "--save-scores": scores_path},
                  {"--ckpt": args.ckpt, "--data-path": args.data_path})
    with bootstrap(args) as rt:
        source = load_with_flags(args.ckpt, args)
        if args.width_ratio is not None:
            width_stack_keys(source.model)  # a family that cannot be narrowed is refused before any work
        depth = total_depth(source.model)
        record: dict = {"checkpoint": args.ckpt, "seed": args.global_seed}
        kept, methods, extra = list(range(depth)), [], {}
        if depth_given:
            kept, depth_record = _depth_decision(args, source, rt)
            record.update(depth_record)
            methods.append(f"score-{args.criterion}")
            extra.update(scores=depth_record["scores"], criterion=args.criterion)
        width = None
        if args.width_ratio is not None:
            width, width_record = width_decision(args, source, kept, rt)
            record["width"] = width_record
            methods.append(f"width-{args.width_criterion}")
            extra["width"] = {k: width_record[k] for k in ("criterion", "ratio", "global", "threshold", "timesteps",
                                                           "losses") if k in width_record}
        if rt.env.is_main:
            scores_path.parent.mkdir(parents=True, exist_ok=True)
            scores_path.write_text(json.dumps(record, indent=1))
            rt.logger.info(f"scores saved to {scores_path}")
            save_pruned(source, kept, args.save_model, "+".join(methods), rt.logger, extra=extra, width=width)
        barrier()


def _depth_decision(args: ScorePruningOptions, source: LoadedModel, rt: Runtime) -> tuple[list[int], dict]:
    """The kept blocks by --criterion (the same on every process), and what the scores file records of them."""
    depth = total_depth(source.model)
    depths = stack_depths(source.model)
    targets = stack_targets(args.target_depth, depths, args.ckpt)
    if targets is None:
        n_pruned = args.n_pruned if args.n_pruned is not None else depth - int(args.target_depth[0])
        if not 1 <= n_pruned <= depth - 1:
            flag = (f"--n-pruned {args.n_pruned}" if args.n_pruned is not None
                    else f"--target-depth {args.target_depth[0]}")
            raise UserError(f"{flag} does not fit {args.ckpt}, a model of depth {depth}: prune between 1 and "
                             f"{depth - 1} blocks (--target-depth between 1 and {depth - 1})")
    if args.criterion == "random":
        scores, count = random_scores(depth, args.global_seed), 0
    else:
        scores, count = _calibrated_scores(args, source, rt)
    if targets is None:
        kept = select_kept(scores.tolist(), n_pruned, args.protect_first, args.protect_last)
    else:
        kept = select_kept_per_stack(scores.tolist(), targets, depths, args.protect_first, args.protect_last)
    rt.logger.info(f"{args.criterion} scores over {count} calibration samples:\n"
                   + format_score_table(scores.tolist(), kept, args.criterion))
    return kept, {"criterion": args.criterion, "scores": scores.tolist(), "kept_indices": kept,
                  "pruned_indices": [i for i in range(depth) if i not in set(kept)], "num_samples": count,
                  "protect_first": args.protect_first, "protect_last": args.protect_last}


def _calibrated_scores(args: ScorePruningOptions, source: LoadedModel, rt: Runtime) -> tuple[torch.Tensor, int]:
    num_batches = args.num_batches or DEPTH_NUM_BATCHES
    calibration = calibration_batches(args, source, rt, num_batches, f"--criterion {args.criterion}")
    env, process, batches = rt.env, calibration.process, calibration.batches
    model = source.model.to(env.device).eval()
    rt.logger.info(f"scoring {total_depth(model)} blocks by {args.criterion} on {num_batches} batches of "
                   f"{args.batch_size} ({rt.precision})")
    with autocast(rt.precision, env.device):
        if args.criterion == "bi":
            sums, count = block_influence(
                model, batches, lambda b: process.predict(model, b["x"], b["draws"], dict(y=b["y"])))
        else:
            sums, count = loss_sensitivity(model, process, batches)
    totals = all_reduce_sum(torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)]).to(env.device))
    return (totals[:-1] / totals[-1]).cpu(), int(totals[-1])
