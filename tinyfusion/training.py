"""Run setup shared by the training scripts, and plain diffusion training (train.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from models import create_model, total_depth, unwrap
from models.attention import attention_paths, convert_attention, describe_attention
from processes import NoiseProcess, Prediction, create_process

from .checkpoint import LoadedModel, load_model, save_model
from .distributed import DistEnv, barrier, broadcast_object
from .engine import CONTENT_SUFFIX, Batch, Task, TrainConfig, Trainer
from .errors import UserError
from .features import FeatureDataset
from .fileio import RunLock, remove_orphan_temporaries
from .options import TrainingOptions, TrainOptions
from .paths import check_outputs, content_identity
from .runtime import Runtime, bootstrap
from .vae import codec_record


@dataclasses.dataclass
class Run:
    """A training run's environment: the runtime, its folder and its data."""

    rt: Runtime
    run_dir: Path
    dataset: FeatureDataset

    @property
    def env(self) -> DistEnv:
        return self.rt.env

    @property
    def logger(self) -> logging.Logger:
        return self.rt.logger

    @property
    def precision(self) -> str:
        return self.rt.precision


# The inputs of the training scripts, compared by content when a run is resumed (tinyfusion.engine).
CONTENT_SETTINGS = ("load_weight", "data_path", "load_teacher")


@contextlib.contextmanager
def start_run(opts: TrainingOptions, default_prefix: str, *, outputs: dict | None = None) -> Iterator[Run]:
    """The runtime, the data and the run folder (results_dir/prefix), claimed by a lock; the process group
    ends on exit.

    Before any work: every output is checked (not an input, writable). In the folder, orphan temporary
    files of an interrupted write are removed. A run that fails before writing anything into a folder it
    created leaves no folder behind.

    Args:
        opts: the training options.
        default_prefix: the run folder's name when --prefix is not given.
        outputs: flag -> file the script writes besides the run folder (e.g. {"--save-model": path}).
    """
    run_dir = Path(opts.results_dir) / (opts.prefix or default_prefix)
    inputs = {"--" + k.replace("_", "-"): getattr(opts, k, None) for k in CONTENT_SETTINGS}
    check_outputs(outputs or {}, inputs, folders={"--results-dir/--prefix": run_dir})
    with bootstrap(opts, seed=opts.global_seed) as rt:
        # Every rank seeds alike: initialisations (a model from scratch, LoRA's A matrices) are a
        # function of the seed; the per-step draws have their own generators (tinyfusion.engine).
        dataset = FeatureDataset(opts.data_path)
        created = not run_dir.exists()
        lock, error = RunLock(run_dir), None
        if rt.env.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                lock.acquire()
            except ValueError as e:
                error = str(e)
        error = broadcast_object(error)  # every rank stops on a refused folder, not only rank 0
        if error:
            if rt.env.is_main and created:
                _remove_if_unused(run_dir)
            raise UserError(error)
        try:
            if rt.env.is_main:
                for folder in (run_dir, run_dir / "checkpoints"):
                    remove_orphan_temporaries(folder)
            barrier()
            rt.log_to(run_dir)
            if lock.removed_stale:
                rt.logger.info(f"removed the stale lock of pid {lock.removed_stale.get('pid')} on "
                               f"{lock.removed_stale.get('host')} (that run is gone)")
            rt.logger.info(f"run folder {run_dir}; {len(dataset):,} images from {opts.data_path} ({dataset.layout} "
                           f"layout, {'with' if dataset.flip else 'without'} mirrored copies); {rt.env.world_size} "
                           f"process(es) on {rt.env.device.type}")
            yield Run(rt=rt, run_dir=run_dir, dataset=dataset)
        except BaseException:
            if rt.env.is_main and created:
                rt.close_log()
                _remove_if_unused(run_dir)
            raise
        finally:
            lock.release()


def _remove_if_unused(run_dir: Path) -> None:
    """Deletes a run folder that holds nothing but the log and lock of a run that failed at its start."""
    leftovers = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if leftovers <= {"log.txt", RunLock.NAME, "checkpoints"} and not any((run_dir / "checkpoints").glob("*")):
        shutil.rmtree(run_dir, ignore_errors=True)


def total_steps(args: TrainingOptions, dataset: FeatureDataset) -> int:
    """Steps of the run from --epochs or --max-steps (exactly one of them)."""
    if (args.epochs is None) == (args.max_steps is None):
        raise UserError("give exactly one of --epochs and --max-steps")
    if args.max_steps is not None:
        return args.max_steps
    steps_per_epoch = len(dataset) // args.global_batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--global-batch-size {args.global_batch_size} is larger than the dataset "
                         f"({len(dataset)} images)")
    return args.epochs * steps_per_epoch


def train_config(args: TrainingOptions, run: Run, steps: int) -> TrainConfig:
    return TrainConfig(
        run_dir=run.run_dir, global_batch_size=args.global_batch_size, total_steps=steps, lr=args.lr,
        micro_batch_size=args.micro_batch_size, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay or 0.0, betas=tuple(args.adam_betas or DEFAULT_RECIPE["betas"]),
        grad_clip=args.grad_clip, ema_decay=args.ema_decay,
        precision=run.precision, log_every=args.log_every, ckpt_every=args.ckpt_every, keep_last=args.keep_last,
        num_workers=args.num_workers, global_seed=args.global_seed, max_nonfinite_steps=args.max_nonfinite_steps,
        tensorboard=args.tensorboard, compile_backend=args.compiled_with(),
    )


# AdamW's defaults, DiT's recipe (its official training passes weight_decay=0).
DEFAULT_RECIPE = {"betas": (0.9, 0.999), "weight_decay": 0.0}


def with_family_recipe(args: TrainingOptions, model: nn.Module) -> TrainingOptions:
    """The options with --weight-decay and --adam-betas, where not given, from the model family's published
    recipe (its class's `optimizer_recipe`, e.g. MAR's betas (0.9, 0.95) and weight decay 0.02)."""
    recipe = {**DEFAULT_RECIPE, **getattr(type(unwrap(model)), "optimizer_recipe", {})}
    return dataclasses.replace(
        args, weight_decay=args.weight_decay if args.weight_decay is not None else recipe["weight_decay"],
        adam_betas=list(args.adam_betas) if args.adam_betas is not None else list(recipe["betas"]))


def run_settings(args, **resolved) -> dict:
    """The run's settings (an options dataclass) as JSON values: compared when a run is resumed, stored in its
    files. Each input path also gets KEY@content, what it holds (tinyfusion.paths.content_identity): a resume
    compares that, not the path's spelling."""
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(args).items()
                if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
    for key in CONTENT_SETTINGS:
        if settings.get(key):
            settings[key + CONTENT_SUFFIX] = content_identity(settings[key])
    settings.update(resolved)
    return json.loads(json.dumps(settings))


def check_data_fits(model: nn.Module, dataset: FeatureDataset, what: str = "the model") -> None:
    """The features must have the shape of the model's inputs."""
    expected = tuple(unwrap(model).data_shape)
    if tuple(dataset.latent_shape) != expected:
        raise UserError(f"the features at {dataset.root} are {tuple(dataset.latent_shape)} but {what} expects "
                         f"{expected} (channels, height, width); extract features with the codec and image size "
                         "the model was trained with")


def dataset_codec(dataset: FeatureDataset) -> dict | None:
    """The codec the features were made with (extract_features.py records it), as a checkpoint records it."""
    source = dataset.index.source if getattr(dataset, "index", None) is not None else {}
    if "vae" not in source:
        return None
    return codec_record(source["vae"], source.get("scaling_factor", 1.0))


def adopt_data_codec(loaded: LoadedModel, dataset: FeatureDataset, logger: logging.Logger | None = None) -> None:
    """Makes `loaded` record the codec of the features it meets (what extract_features.py recorded), so that
    every run writes the codec of the data it trained on: a bare state dict gains one (1-channel pixels
    included), and a file recorded with another codec of the same shape (SD-VAE ema against mse) says so."""
    data = dataset_codec(dataset)
    if data is None:
        return
    if logger is not None and loaded.codec is not None and loaded.codec != data:
        logger.info(f"codec: the model recorded {loaded.codec['vae']}, the features at {dataset.root} were made with "
                    f"{data['vae']}; this run records the features' codec")
    loaded.codec = data


def model_for_training(args: TrainingOptions, dataset: FeatureDataset, logger: logging.Logger) -> LoadedModel:
    """The model to train: from --load-weight (any checkpoint), or a registry --model from scratch."""
    if args.load_weight:
        loaded = load_model(args.load_weight, args.model, weights=args.weights, num_heads=args.num_heads)
        logger.info(f"loaded {loaded.weights} weights of a {loaded.arch} (depth {total_depth(loaded.model)}) from "
                    f"{args.load_weight}" + (f"; pruned, kept blocks {loaded.lineage['kept_indices']} of "
                                             f"{loaded.lineage['source_depth']}" if loaded.lineage else ""))
    elif args.model:
        num_classes = args.num_classes or dataset.infer_num_classes()
        channels, size, _ = dataset.latent_shape
        model = create_model(args.model, input_size=size, in_channels=channels, num_classes=num_classes)
        loaded = LoadedModel(model=model, arch=model.arch, config=dict(model.config),
                             process=create_process(type(unwrap(model)).default_process(model.config)).record(),
                             codec=dataset_codec(dataset), lineage=None, weights="scratch", path="", extra={})
        logger.info(f"training {args.model} from scratch ({num_classes} classes, latents {dataset.latent_shape})")
    else:
        raise UserError("give --load-weight (a checkpoint to start from) or --model (a registry model to train "
                         "from scratch)")
    stated = args.stated_attention()
    if stated is not None and stated != loaded.config.get("attention"):
        before = describe_attention(loaded.config["attention"]) if "attention" in loaded.config else "none"
        convert_attention(unwrap(loaded.model), stated)
        loaded.config = dict(unwrap(loaded.model).config)
        logger.info(f"attention: {before} -> {describe_attention(stated)} (--attention; every weight kept)")
    check_data_fits(loaded.model, dataset)
    adopt_data_codec(loaded, dataset, logger)
    return loaded


def set_grad_checkpointing(args: TrainingOptions, model: nn.Module, logger: logging.Logger) -> None:
    """--grad-checkpointing: the model (under its wrappers, the gates included) recomputes its blocks' activations
    in the backward pass instead of keeping them; the family's `gradient_checkpointing` switch."""
    if args.grad_checkpointing:
        unwrap(model).gradient_checkpointing = True
        logger.info("gradient checkpointing: block activations are recomputed in the backward pass")


def checkpoint_record(loaded: LoadedModel, script: str) -> dict:
    """The self-describing part of the checkpoints of a model that keeps its architecture."""
    return {"arch": loaded.arch, "config": loaded.config, "process": loaded.process, "codec": loaded.codec,
            "lineage": loaded.lineage, "extra": {"script": script, "initialised_from": loaded.path or "scratch"}}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#################################################################################
#                               Plain diffusion loss                            #
#################################################################################

class DiffusionTask(Task):
    """The noise process's training loss (DiT: the hybrid loss, noise MSE + VB for the learned variance)."""

    def __init__(self, process: NoiseProcess):
        self.process = process

    def loss(self, model: nn.Module, batch: Batch, total_steps: int) -> dict[str, torch.Tensor]:
        terms = self.process.training_losses(model, batch.x, batch.draws, batch.cond)
        return {k: v.mean() for k, v in terms.items()}


def predict_with_teacher(process: NoiseProcess, model: nn.Module, teacher: nn.Module, batch: Batch
                         ) -> tuple[Prediction, Prediction, torch.Tensor]:
    """What every distillation starts from: the student's prediction on the batch, the frozen teacher's on the same
    draws (no graph), and the process's training loss of the student (GT), averaged."""
    student = process.predict(model, batch.x, batch.draws, batch.cond)
    with torch.no_grad():
        teacher_prediction = process.predict(teacher, batch.x, batch.draws, batch.cond)
    gt = process.losses(student, batch.x, batch.draws)["loss"].mean()
    return student, teacher_prediction, gt


def train_and_save(args: TrainOptions, run: Run, loaded: LoadedModel, model: nn.Module, task: Task,
                   process: NoiseProcess, steps: int, script: str, *, settings: dict | None = None,
                   extra: dict | None = None) -> None:
    """The end of train.py and train_masked_kd.py: the one training loop (tinyfusion.engine) over the trainable
    parameters of `model`, then, on rank 0, the model and its EMA written to --save-model as `loaded` describes it
    (process, codec, lineage); every rank then waits at a barrier.

    Args:
        loaded: what `model` was loaded as (its record goes into every checkpoint and the saved file).
        model: the model to train, on the run's device.
        script: the script's name, recorded in the files.
        settings: resolved settings beyond the options (e.g. the layer map), compared on resume.
        extra: what the saved file records beyond the script, the steps and the starting point.
    """
    paths = attention_paths(model, run.env.device)
    if paths:
        run.logger.info(f"attention: {paths}")
    trainer = Trainer(
        env=run.env, model=model, param_groups=[{"params": [p for p in model.parameters() if p.requires_grad]}],
        task=task, dataset=run.dataset, config=train_config(args, run, steps), process=process,
        settings=run_settings(args, precision=run.precision, **(settings or {})), logger=run.logger,
        record=lambda: checkpoint_record(loaded, script))
    ema = trainer.fit()
    if args.save_model and run.env.is_main:
        save_model(args.save_model, model, ema=ema, process=loaded.process, codec=loaded.codec,
                   lineage=loaded.lineage,
                   extra={"script": script, "steps": steps, **(extra or {}),
                          "initialised_from": loaded.path or "scratch"})
        run.logger.info(f"saved {args.save_model}")
    barrier()


def run_train(args: TrainOptions) -> None:
    """train.py: fine-tune a (pruned) model, or train one from scratch, on a feature dataset."""
    name = Path(args.load_weight).stem if args.load_weight else (args.model or "model").replace("/", "-")
    with start_run(args, default_prefix=f"{name}-train", outputs={"--save-model": args.save_model}) as run:
        loaded = model_for_training(args, run.dataset, run.logger)
        args = with_family_recipe(args, loaded.model)
        model = loaded.model.to(run.env.device)
        set_grad_checkpointing(args, model, run.logger)
        process = create_process(loaded.process)
        steps = total_steps(args, run.dataset)
        run.logger.info(f"{parameter_count(model):,} parameters; {steps} steps; {process.name} process "
                        f"({process.time_domain().describe()})")
        train_and_save(args, run, loaded, model, DiffusionTask(process), process, steps, "train.py")
