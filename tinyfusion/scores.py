"""Score-based depth pruning baselines: ShortGPT block influence, loss sensitivity, random.

Each criterion gives every block an importance (higher = more important); the least important
unprotected blocks are pruned. Calibration batches come from the feature dataset at random
timesteps, split over the processes and reduced, with the same draws for any process count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import create_diffusion

from .checkpoint import load_model
from .distributed import all_reduce_sum, barrier, cleanup, create_logger, init_distributed
from .engine import step_draws
from .features import FeatureDataset, GlobalBatchSampler, SeedPurpose, derive_seed
from .precision import autocast, enable_tf32, resolve_precision
from .pruning import save_pruned
from .training import check_data_fits

CRITERIA = ("bi", "loss", "random")


class _BlockIO:
    """Forward hooks keeping each block's input tokens and output tokens."""

    def __init__(self, blocks: nn.ModuleList):
        self.io: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(blocks)]

    def _hook(self, index: int):
        def record(module, args, output):
            self.io[index] = (args[0], output)
        return record

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def block_influence(model: nn.Module, inputs: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                    ) -> tuple[torch.Tensor, int]:
    """ShortGPT's block influence summed over samples: sum of (1 - mean_tokens cos(h_in, h_out)).

    Args:
        model: the model (eval mode), called as model(x, t, y).
        inputs: batches of model inputs (x (N, C, H, W), t (N,), y (N,)).
    Returns:
        (per-block sums (depth,) float64, number of samples); divide for the mean.
    """
    tap = _BlockIO(model.blocks)
    sums, count = torch.zeros(len(model.blocks), dtype=torch.float64), 0
    try:
        for x, t, y in inputs:
            model(x, t, y)
            for i, (h_in, h_out) in tap.io.items():
                cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (N, T)
                sums[i] += (1.0 - cos.mean(dim=1)).double().sum().cpu()
            count += x.shape[0]
    finally:
        tap.remove()
    return sums, count


def _skip(module, args, output):
    return args[0]


@torch.no_grad()
def loss_sensitivity(model: nn.Module, diffusion, batches: Sequence[dict]) -> tuple[torch.Tensor, int]:
    """Increase of the diffusion loss when each block alone is removed, summed over samples.

    Args:
        model: the model (eval mode).
        diffusion: the training diffusion.
        batches: dicts with x (clean latents), t, noise, y; the same draws serve every block.
    Returns:
        (per-block sums of loss(without block) - loss(full model) (depth,) float64, number of samples).
    """
    def total_loss() -> torch.Tensor:
        return sum(diffusion.training_losses(model, b["x"], b["t"], dict(y=b["y"]), noise=b["noise"])["loss"]
                   .double().sum().cpu() for b in batches)

    baseline = total_loss()
    sums = torch.zeros(len(model.blocks), dtype=torch.float64)
    for i, block in enumerate(model.blocks):
        handle = block.register_forward_hook(_skip)
        try:
            sums[i] = total_loss() - baseline
        finally:
            handle.remove()
    return sums, sum(b["x"].shape[0] for b in batches)


def random_scores(depth: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed(SeedPurpose.RANDOM_SCORES, seed))
    return torch.rand(depth, generator=g, dtype=torch.float64)


def select_kept(scores: Sequence[float], n_pruned: int, keep_first: int = 0, keep_last: int = 0) -> list[int]:
    """Prunes the n_pruned least important blocks outside the protected first and last ones.

    Raises:
        ValueError: when the protected blocks leave fewer than n_pruned candidates.
    """
    depth = len(scores)
    if keep_first < 0 or keep_last < 0:
        raise ValueError("--keep-first and --keep-last must be non-negative")
    candidates = [i for i in range(depth) if keep_first <= i < depth - keep_last]
    if not 1 <= n_pruned <= len(candidates) or n_pruned >= depth:
        raise ValueError(f"cannot prune {n_pruned} of {depth} blocks with the first {keep_first} and the last "
                         f"{keep_last} protected ({len(candidates)} candidates); lower the number pruned or "
                         "protect fewer blocks")
    pruned = sorted(candidates, key=lambda i: (float(scores[i]), i))[:n_pruned]
    return [i for i in range(depth) if i not in set(pruned)]


def format_score_table(scores: Sequence[float], kept: Sequence[int], criterion: str) -> str:
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    rank = {i: r + 1 for r, i in enumerate(order)}
    lines = [f"block | {criterion} score | rank | decision", "------|------------|------|---------"]
    lines += [f"{i:5d} | {float(s):10.6f} | {rank[i]:4d} | {'kept' if i in set(kept) else 'pruned'}"
              for i, s in enumerate(scores)]
    return "\n".join(lines)


def run_prune_by_score(args: argparse.Namespace) -> None:
    """prune_by_score.py: score every block on calibration data, prune the least important."""
    env = init_distributed(args.device)
    try:
        if args.tf32:
            enable_tf32()
        logger = create_logger(env)
        source = load_model(args.ckpt, args.model, weights=args.weights, num_heads=args.num_heads)
        depth = source.config["depth"]
        if (args.n_pruned is None) == (args.target_depth is None):
            raise ValueError("give exactly one of --n-pruned and --target-depth")
        n_pruned = args.n_pruned if args.n_pruned is not None else depth - args.target_depth
        if args.criterion == "random":
            scores, count = random_scores(depth, args.global_seed), 0
        else:
            scores, count = _calibrated_scores(args, source, env, logger)
        if env.is_main:
            kept = select_kept(scores.tolist(), n_pruned, args.keep_first, args.keep_last)
            logger.info(f"{args.criterion} scores over {count} calibration samples:\n"
                        + format_score_table(scores.tolist(), kept, args.criterion))
            scores_path = Path(args.save_scores or Path(args.save_model).with_suffix(".scores.json"))
            scores_path.parent.mkdir(parents=True, exist_ok=True)
            scores_path.write_text(json.dumps({
                "criterion": args.criterion, "scores": scores.tolist(), "kept_indices": kept,
                "pruned_indices": [i for i in range(depth) if i not in set(kept)], "num_samples": count,
                "keep_first": args.keep_first, "keep_last": args.keep_last, "checkpoint": args.ckpt,
                "seed": args.global_seed}, indent=1))
            logger.info(f"scores saved to {scores_path}")
            save_pruned(source, kept, args.save_model, f"score-{args.criterion}", logger,
                        extra={"scores": scores.tolist(), "criterion": args.criterion})
        barrier()
    finally:
        cleanup()


def _calibrated_scores(args, source, env, logger) -> tuple[torch.Tensor, int]:
    if not args.data_path:
        raise ValueError(f"--criterion {args.criterion} needs calibration data: give --data-path")
    dataset = FeatureDataset(args.data_path)
    check_data_fits(source.config, dataset)
    precision = resolve_precision(args.precision, env.device)
    model = source.model.to(env.device).eval()
    diffusion = create_diffusion("", learn_sigma=source.config["learn_sigma"])
    sampler = GlobalBatchSampler(len(dataset), args.batch_size, rank=env.rank, world_size=env.world_size,
                                 seed=args.global_seed, copies=dataset.copies if dataset.flip else 1,
                                 max_steps=args.num_batches)
    batches = []
    for step, items in enumerate(sampler):
        x, y = (torch.stack(v).to(env.device) for v in zip(*(dataset[i] for i in items)))
        draws = step_draws(args.global_seed, step, args.batch_size, dataset.latent_shape, diffusion.num_timesteps,
                           env)
        batches.append({"x": x, "y": y, "t": draws["t"], "noise": draws["noise"]})
    logger.info(f"scoring {len(source.model.blocks)} blocks by {args.criterion} on {args.num_batches} batches of "
                f"{args.batch_size} ({precision})")
    with autocast(precision, env.device):
        if args.criterion == "bi":
            inputs = [(diffusion.q_sample(b["x"], b["t"], b["noise"]), b["t"], b["y"]) for b in batches]
            sums, count = block_influence(model, inputs)
        else:
            sums, count = loss_sensitivity(model, diffusion, batches)
    totals = all_reduce_sum(torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)]).to(env.device))
    return (totals[:-1] / totals[-1]).cpu(), int(totals[-1])
