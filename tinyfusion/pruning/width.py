"""Width pruning (Diff-Pruning, Fang et al., "Structural Pruning for Diffusion Models", 2023): every block's
attention heads and MLP hidden channels are scored, the least important are cut by `models.prune_width`.

The criteria give each head and each channel an importance (higher = more important), summed over the weights
the unit owns (a head: its rows of q, k and v in the fused qkv layer and its input columns of the output
projection; a channel: its fc1 row and its fc2 column; biases not counted), as Torch-Pruning's importances do:
- taylor: sum |w * dL/dw| (first-order Taylor, Torch-Pruning's TaylorImportance, which Diff-Pruning uses), the
  gradient accumulated over timesteps by Diff-Pruning's loop (`accumulate_taylor_gradients`);
- magnitude: sum w^2 (Torch-Pruning's MagnitudeImportance, p = 2);
- random: seeded.
Each block's head scores, and its channel scores, are divided by their mean over the block (Torch-Pruning's
"mean" normalizer), so a ranking across blocks (`global_rank`) compares every unit with its block's average.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, ContextManager, Iterable, Sequence

import torch
import torch.nn as nn

from models import block_units, flat_blocks, prunable_layers, prune_depth, total_depth, unit_sums, unwrap
from processes import NoiseProcess

from ..checkpoint import LoadedModel
from ..distributed import all_reduce_sum
from ..errors import UserError
from ..features import SeedPurpose, derive_seed
from ..options import ScorePruningOptions
from ..precision import autocast
from ..runtime import Runtime
from .calibration import calibration_batches

WIDTH_CRITERIA = ("taylor", "magnitude", "random")
# Diff-Pruning's default threshold: the timestep loop stops after the first loss below 5% of the largest so far.
TAYLOR_THRESHOLD = 0.05


@dataclasses.dataclass
class UnitScores:
    """Importances of the heads and channels of every flat block: heads[i] (H_i,), channels[i] (C_i,), float64."""

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]


def normalized(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their mean (a block whose scores are all zero stays zero)."""
    mean = scores.mean()
    return scores / mean if mean > 0 else scores


def _scores(model: nn.Module, values: Callable[[nn.Linear], torch.Tensor]) -> UnitScores:
    heads, channels = [], []
    for block in flat_blocks(model):
        h, c = unit_sums(block, values)
        heads.append(normalized(h).cpu())
        channels.append(normalized(c).cpu())
    return UnitScores(heads, channels)


def _weight_times_gradient(layer: nn.Linear) -> torch.Tensor:
    if layer.weight.grad is None:
        raise ValueError("the Taylor scores need the gradients: run accumulate_taylor_gradients first")
    return (layer.weight.detach() * layer.weight.grad).abs()


def taylor_scores(model: nn.Module) -> UnitScores:
    """sum |w * g| over each unit's weights, g the gradient the prunable weights hold, normalized per block."""
    return _scores(model, _weight_times_gradient)


def magnitude_scores(model: nn.Module) -> UnitScores:
    """sum w^2 over each unit's weights, normalized per block."""
    return _scores(model, lambda layer: layer.weight.detach() ** 2)


def random_unit_scores(model: nn.Module, seed: int) -> UnitScores:
    """Seeded uniform scores, the same for any process count."""
    g = torch.Generator().manual_seed(derive_seed(SeedPurpose.RANDOM_WIDTH_SCORES, seed))
    units = block_units(model)
    return UnitScores([torch.rand(h, generator=g, dtype=torch.float64) for h, _ in units],
                      [torch.rand(c, generator=g, dtype=torch.float64) for _, c in units])


#################################################################################
#                          Diff-Pruning's timestep loop                         #
#################################################################################

@dataclasses.dataclass
class TimestepWalk:
    """The timesteps a Taylor loop used, in order from the data end, and the loss at each."""

    times: list[float]
    losses: list[float]


def walk_timesteps(times: Iterable, step: Callable[[object], float], threshold: float) -> TimestepWalk:
    """Diff-Pruning's early stop: runs `step(t)` (one timestep's loss, its gradient accumulated) for the times in
    order, tracks the largest loss so far, and stops after the first timestep whose loss falls below
    `threshold` times that maximum (its gradient included). threshold 0: every timestep."""
    walk, largest = TimestepWalk([], []), -math.inf
    for t in times:
        loss = float(step(t))
        walk.times.append(t.item() if isinstance(t, torch.Tensor) else t)
        walk.losses.append(loss)
        largest = max(largest, loss)
        if loss < threshold * largest:
            break
    return walk


def accumulate_taylor_gradients(model: nn.Module, process: NoiseProcess, batches: Sequence[dict], *,
                                global_batch_size: int, threshold: float = TAYLOR_THRESHOLD,
                                times: Iterable | None = None,
                                forward_context: Callable[[], ContextManager] = contextlib.nullcontext
                                ) -> TimestepWalk:
    """Diff-Pruning's gradient: the calibration batches with their fixed noise are taken to every timestep in
    order from the data end (`process.calibration_times()`, or `times`); at each, the gradient of the process's
    calibration loss (DiT: the MSE of the predicted noise) is accumulated into the prunable weights' .grad, and
    the walk stops by `walk_timesteps`'s rule.

    The loss of a timestep is each global batch's mean per-sample loss, summed over the batches (one batch:
    Diff-Pruning's `mse_loss`); each process holds its share of every batch, and the losses and, at the end, the
    gradients are summed over processes. Only the prunable weights take gradients; every other parameter's
    requires_grad is restored. Model in eval mode (no label dropout).

    Args:
        model: the model; its prunable weights' .grad is overwritten.
        process: the noise process (`calibration_times`, `with_time`, `calibration_loss`).
        batches: this process's share of each batch: {"x", "y", "draws"} (the draws' noise is kept, their time
            replaced).
        global_batch_size: the examples of one global batch (the mean's denominator).
        threshold: the early stop's fraction of the largest loss (0: every timestep).
        times: the timesteps to walk instead of the process's grid.
        forward_context: a context for each forward pass (autocast).
    """
    weights = [layer.weight for block in flat_blocks(model) for layer in prunable_layers(block)]
    saved = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
        weight.grad = None
    device = weights[0].device

    def step(t) -> float:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for batch in batches:
            draws = process.with_time(batch["draws"], t)
            with forward_context():
                prediction = process.predict(model, batch["x"], draws, dict(y=batch["y"]))
                loss = process.calibration_loss(prediction, batch["x"], draws).float().sum() / global_batch_size
            loss.backward()
            total += loss.detach().double()
        return all_reduce_sum(total).item()

    try:
        walk = walk_timesteps(process.calibration_times() if times is None else times, step, threshold)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    for weight in weights:
        weight.grad = all_reduce_sum(weight.grad) if weight.grad is not None else torch.zeros_like(weight)
    return walk


def clear_gradients(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


#################################################################################
#                                   Selection                                   #
#################################################################################

def units_removed(count: int, ratio: float) -> int:
    """How many of `count` units a ratio removes: the nearest integer (halves up), at most count - 1."""
    return min(int(math.floor(ratio * count + 0.5)), count - 1)


def select_units(scores: Sequence[torch.Tensor], ratio: float, global_rank: bool = False) -> list[list[int]]:
    """The kept units of every block: the fraction `ratio` of the least important removed, in every block alike
    (`units_removed` of each), or, with `global_rank`, of all blocks' units ranked together (so blocks keep
    different widths), never the last unit of a block. Ties go to the lower block, then the lower index."""
    if not global_rank:
        kept = []
        for block_scores in scores:
            n = units_removed(len(block_scores), ratio)
            order = sorted(range(len(block_scores)), key=lambda u: (float(block_scores[u]), u))
            kept.append(sorted(order[n:]))
        return kept
    remaining = [len(s) for s in scores]
    n = units_removed(sum(remaining), ratio)
    ranked = sorted(((float(s[u]), b, u) for b, s in enumerate(scores) for u in range(len(s))))
    removed: set[tuple[int, int]] = set()
    for _, b, u in ranked:
        if len(removed) == n:
            break
        if remaining[b] > 1:
            removed.add((b, u))
            remaining[b] -= 1
    return [[u for u in range(len(s)) if (b, u) not in removed] for b, s in enumerate(scores)]


def check_width_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise UserError(f"--width-ratio {ratio:g}: give the fraction of heads and MLP channels to remove, between 0 "
                         "and 1 (0.5 removes half)")


def check_taylor_threshold(threshold: float) -> None:
    if not 0.0 <= threshold < 1.0:
        raise UserError(f"--taylor-threshold {threshold:g}: give a fraction of the largest loss in [0, 1) "
                         f"(Diff-Pruning: {TAYLOR_THRESHOLD}; 0 walks every timestep)")


def block_parameter_count(blocks: Iterable[nn.Module]) -> int:
    """Parameters of the blocks' attention and MLP layers (what width pruning cuts), biases included."""
    return sum(p.numel() for block in blocks for layer in prunable_layers(block) for p in layer.parameters())


def format_width_table(kept_heads: Sequence[Sequence[int]], kept_channels: Sequence[Sequence[int]],
                       units: Sequence[tuple[int, int]]) -> str:
    lines = ["block | heads kept | MLP channels kept", "------|------------|------------------"]
    lines += [f"{i:5d} | {len(h):4d} of {n_h:<3d} | {len(c):6d} of {n_c}"
              for i, (h, c, (n_h, n_c)) in enumerate(zip(kept_heads, kept_channels, units))]
    return "\n".join(lines)


#################################################################################
#                              prune_by_score.py                                #
#################################################################################

# Calibration batches of the Taylor criterion when --num-batches is not given: Diff-Pruning's one batch.
TAYLOR_NUM_BATCHES = 1


def width_decision(args: ScorePruningOptions, source: LoadedModel, kept: Sequence[int], rt: Runtime
                   ) -> tuple[dict, dict]:
    """The heads and MLP channels to keep in the blocks `kept` of `source` (flat indices), by --width-criterion.

    Returns:
        (width, record): width as `save_pruned` takes it (kept heads and channels per kept block, criterion,
        ratio, global), and what the scores file records (the scores, and the Taylor loop's timesteps).
    """
    model = unwrap(source.model)
    if len(kept) != total_depth(model):
        model = prune_depth(model, kept)
    criterion, walk = args.width_criterion, None
    if criterion == "random":
        scores = random_unit_scores(model, args.global_seed)
    elif criterion == "magnitude":
        scores = magnitude_scores(model)
    else:
        num_batches = args.num_batches or TAYLOR_NUM_BATCHES
        calibration = calibration_batches(args, source, rt, num_batches, "--width-criterion taylor")
        model = model.to(rt.env.device).eval()
        rt.logger.info(f"Taylor scores of {len(kept)} blocks' heads and MLP channels on {num_batches} batch"
                       f"{'es' if num_batches > 1 else ''} of {args.batch_size}, timesteps from the data end until "
                       f"the loss falls below {args.taylor_threshold:g} of its largest ({rt.precision})")
        walk = accumulate_taylor_gradients(
            model, calibration.process, calibration.batches, global_batch_size=calibration.global_batch_size,
            threshold=args.taylor_threshold, forward_context=lambda: autocast(rt.precision, rt.env.device))
        scores = taylor_scores(model)
        clear_gradients(model)
        rt.logger.info(f"Taylor loop: {len(walk.times)} timesteps ({_span(walk.times)}), loss {walk.losses[0]:.4g} "
                       f"at the first, {max(walk.losses):.4g} at most, {walk.losses[-1]:.4g} at the last")
    kept_heads = select_units(scores.heads, args.width_ratio, args.global_width)
    kept_channels = select_units(scores.channels, args.width_ratio, args.global_width)
    units = block_units(model)
    if all(len(h) == n_h and len(c) == n_c for h, c, (n_h, n_c) in zip(kept_heads, kept_channels, units)):
        raise UserError(f"--width-ratio {args.width_ratio:g} removes no head and no MLP channel of blocks of "
                         f"{units[0][0]} heads and {units[0][1]} channels: give a larger ratio")
    rt.logger.info(f"width by {criterion}, ratio {args.width_ratio:g} "
                   f"({'ranked across blocks' if args.global_width else 'in every block'}):\n"
                   + format_width_table(kept_heads, kept_channels, units))
    width = {"kept_heads": kept_heads, "kept_channels": kept_channels, "criterion": criterion,
             "ratio": args.width_ratio, "global": args.global_width}
    record = {**width, "head_scores": [s.tolist() for s in scores.heads],
              "channel_scores": [s.tolist() for s in scores.channels]}
    if walk is not None:
        record.update(threshold=args.taylor_threshold, num_batches=args.num_batches or TAYLOR_NUM_BATCHES,
                      timesteps=walk.times, losses=walk.losses)
    return width, record


def _span(times: Sequence) -> str:
    return f"t = {times[0]:g}" if len(times) == 1 else f"t = {times[0]:g} to {times[-1]:g}"
