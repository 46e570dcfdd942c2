"""The calibration batches of the score criteria: clean latents, labels and the noise process's draws.

Batches come from the feature dataset in the order of the training sampler (`GlobalBatchSampler`) and the
draws from the training step's generator (`step_draws`), so every process count sees the same examples: each
process holds its contiguous share of each global batch, and criteria reduce over processes.
"""

from __future__ import annotations

import dataclasses

import torch

from processes import NoiseProcess, create_process

from ..checkpoint import LoadedModel
from ..engine import step_draws
from ..errors import UserError
from ..features import FeatureDataset, GlobalBatchSampler
from ..options import ScorePruningOptions
from ..runtime import Runtime
from ..training import adopt_data_codec, check_data_fits


@dataclasses.dataclass
class Calibration:
    """Calibration data on this process's device.

    Attributes:
        process: the model's noise process.
        batches: this process's share of each global batch: {"x": (n, C, H, W), "y": (n,), "draws": the
            process's draws (time, noise, ...)}.
        global_batch_size: examples per global batch (summed over processes).
    """

    process: NoiseProcess
    batches: list[dict]
    global_batch_size: int


def calibration_batches(args: ScorePruningOptions, source: LoadedModel, rt: Runtime, num_batches: int,
                        needed_by: str) -> Calibration:
    """`num_batches` global batches of `args.batch_size` examples from `args.data_path`, seeded by
    `args.global_seed`; `needed_by` names the flag that asked for them (for the error without --data-path).

    Raises:
        UserError: no --data-path, or features of another shape than the model's inputs.
    """
    if not args.data_path:
        raise UserError(f"{needed_by} needs calibration data: give --data-path")
    env = rt.env
    dataset = FeatureDataset(args.data_path)
    check_data_fits(source.model, dataset)
    adopt_data_codec(source, dataset, rt.logger)
    process = create_process(source.process)
    sampler = GlobalBatchSampler(len(dataset), args.batch_size, rank=env.rank, world_size=env.world_size,
                                 seed=args.global_seed, copies=dataset.copies if dataset.flip else 1,
                                 max_steps=num_batches)
    batches = []
    for step, items in enumerate(sampler):
        x, y = (torch.stack(v).to(env.device) for v in zip(*(dataset[i] for i in items)))
        draws = step_draws(args.global_seed, step, args.batch_size, dataset.latent_shape, process, env)
        batches.append({"x": x, "y": y, "draws": draws["draws"]})
    return Calibration(process=process, batches=batches, global_batch_size=args.batch_size)
