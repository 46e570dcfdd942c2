"""Run setup shared by the training scripts, and plain diffusion training (train.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from diffusion import create_diffusion
from models import create_model

from .checkpoint import LoadedModel, load_model, save_model
from .distributed import DistEnv, barrier, cleanup, create_logger, init_distributed
from .engine import Batch, Task, TrainConfig, Trainer
from .features import FeatureDataset
from .precision import enable_tf32, resolve_precision


@dataclasses.dataclass
class Run:
    """A training run's environment: process, logger, folder, precision and data."""

    env: DistEnv
    logger: logging.Logger
    run_dir: Path
    precision: str
    dataset: FeatureDataset


def start_run(args: argparse.Namespace, default_prefix: str) -> Run:
    """Process group, TF32, precision, data and the run folder (results_dir/prefix)."""
    env = init_distributed(args.device)
    # Every rank seeds alike: initialisations (a model from scratch, LoRA's A matrices) are a
    # function of the seed; the per-step draws have their own generators (tinyfusion.engine).
    torch.manual_seed(args.global_seed)
    if args.tf32:
        enable_tf32()
    precision = resolve_precision(args.precision, env.device)
    dataset = FeatureDataset(args.data_path)
    run_dir = Path(args.results_dir) / (args.prefix or default_prefix)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    logger = create_logger(env, run_dir)
    logger.info(f"run folder {run_dir}; {len(dataset):,} images from {args.data_path} ({dataset.layout} layout, "
                f"{'with' if dataset.flip else 'without'} mirrored copies); {env.world_size} process(es) on "
                f"{env.device.type}")
    return Run(env=env, logger=logger, run_dir=run_dir, precision=precision, dataset=dataset)


def total_steps(args: argparse.Namespace, dataset: FeatureDataset) -> int:
    """Steps of the run from --epochs or --max-steps (exactly one of them)."""
    if (args.epochs is None) == (args.max_steps is None):
        raise ValueError("give exactly one of --epochs and --max-steps")
    if args.max_steps is not None:
        return args.max_steps
    steps_per_epoch = len(dataset) // args.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is larger than the dataset "
                         f"({len(dataset)} images)")
    return args.epochs * steps_per_epoch


def train_config(args: argparse.Namespace, run: Run, steps: int) -> TrainConfig:
    return TrainConfig(
        run_dir=run.run_dir, global_batch_size=args.global_batch_size, total_steps=steps, lr=args.lr,
        micro_batch_size=args.micro_batch_size, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, ema_decay=args.ema_decay,
        precision=run.precision, log_every=args.log_every, ckpt_every=args.ckpt_every, keep_last=args.keep_last,
        num_workers=args.num_workers, global_seed=args.global_seed, max_nonfinite_steps=args.max_nonfinite_steps,
        tensorboard=args.tensorboard,
    )


def run_settings(args: argparse.Namespace, **resolved) -> dict:
    """The run's settings as JSON values: compared when a run is resumed, stored in its files."""
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    settings.update(resolved)
    return json.loads(json.dumps(settings))


def check_data_fits(config: dict, dataset: FeatureDataset, what: str = "the model") -> None:
    """The latents must have the model's channels and size."""
    expected = (config["in_channels"], config["input_size"], config["input_size"])
    if tuple(dataset.latent_shape) != expected:
        raise ValueError(f"the features at {dataset.root} are {tuple(dataset.latent_shape)} but {what} expects "
                         f"{expected} (in_channels, input_size, input_size); extract features with the VAE and "
                         "image size the model was trained with")


def model_for_training(args: argparse.Namespace, dataset: FeatureDataset, logger: logging.Logger) -> LoadedModel:
    """The model to train: from --load-weight (any checkpoint), or a registry --model from scratch."""
    if args.load_weight:
        loaded = load_model(args.load_weight, args.model, weights=args.weights, num_heads=args.num_heads)
        logger.info(f"loaded {loaded.weights} weights of a {loaded.arch} (depth {loaded.config['depth']}) from "
                    f"{args.load_weight}" + (f"; pruned, kept blocks {loaded.lineage['kept_indices']} of "
                                             f"{loaded.lineage['source_depth']}" if loaded.lineage else ""))
    elif args.model:
        num_classes = args.num_classes or dataset.infer_num_classes()
        channels, size, _ = dataset.latent_shape
        model = create_model(args.model, input_size=size, in_channels=channels, num_classes=num_classes)
        loaded = LoadedModel(model=model, arch=model.arch, config=dict(model.config), lineage=None,
                             weights="scratch", path="", extra={})
        logger.info(f"training {args.model} from scratch ({num_classes} classes, latents {dataset.latent_shape})")
    else:
        raise ValueError("give --load-weight (a checkpoint to start from) or --model (a registry model to train "
                         "from scratch)")
    check_data_fits(loaded.config, dataset)
    return loaded


def checkpoint_record(loaded: LoadedModel, script: str) -> dict:
    """The self-describing part of the checkpoints of a model that keeps its architecture."""
    return {"arch": loaded.arch, "config": loaded.config, "lineage": loaded.lineage,
            "extra": {"script": script, "initialised_from": loaded.path or "scratch"}}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#################################################################################
#                               Plain diffusion loss                            #
#################################################################################

class DiffusionTask(Task):
    """The hybrid diffusion loss of DiT (MSE on the noise + VB term for the learned variance)."""

    def __init__(self, diffusion):
        self.diffusion = diffusion

    def loss(self, model: nn.Module, batch: Batch, total_steps: int) -> dict[str, torch.Tensor]:
        kwargs = dict(y=batch.y, force_drop_ids=batch.drop_ids)
        if batch.gate_uniform is not None:
            kwargs["gate_uniform"] = batch.gate_uniform
        terms = self.diffusion.training_losses(model, batch.x, batch.t, kwargs, noise=batch.noise)
        out = {"loss": terms["loss"].mean(), "mse": terms["mse"].mean()}
        if "vb" in terms:
            out["vb"] = terms["vb"].mean()
        return out


def run_train(args: argparse.Namespace) -> None:
    """train.py: fine-tune a (pruned) model, or train one from scratch, on a feature dataset."""
    name = Path(args.load_weight).stem if args.load_weight else (args.model or "model").replace("/", "-")
    run = start_run(args, default_prefix=f"{name}-train")
    try:
        loaded = model_for_training(args, run.dataset, run.logger)
        model = loaded.model.to(run.env.device)
        if args.grad_checkpointing:
            model.gradient_checkpointing = True
        diffusion = create_diffusion("", learn_sigma=loaded.config["learn_sigma"])
        steps = total_steps(args, run.dataset)
        run.logger.info(f"{parameter_count(model):,} parameters; {steps} steps")
        trainer = Trainer(
            env=run.env, model=model, param_groups=[{"params": [p for p in model.parameters() if p.requires_grad]}],
            task=DiffusionTask(diffusion), dataset=run.dataset, config=train_config(args, run, steps),
            num_timesteps=diffusion.num_timesteps, label_dropout=loaded.config["class_dropout_prob"],
            settings=run_settings(args, precision=run.precision), logger=run.logger,
            record=lambda: checkpoint_record(loaded, "train.py"))
        ema = trainer.fit()
        if args.save_model and run.env.is_main:
            save_model(args.save_model, model, ema=ema, lineage=loaded.lineage,
                       extra={"script": "train.py", "steps": steps, "initialised_from": loaded.path or "scratch"})
            run.logger.info(f"saved {args.save_model}")
        barrier()
    finally:
        cleanup()
