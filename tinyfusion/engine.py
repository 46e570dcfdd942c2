"""The one training loop of train.py, train_masked_kd.py and prune_by_learning.py.

What differs between them (the loss, the gate schedule, what is logged and saved) is passed in
as a `Task`; everything else lives here: DDP, data order, per-sample randomness, gradient
accumulation, mixed precision, clipping, EMA, learning-rate schedule, non-finite steps,
logging, checkpoints, resume and preemption.

Every random draw of step s (timesteps, noise, label dropout, gate noise) is made for the whole
global batch from a generator seeded by (seed, s), and each process takes its slice. Together
with `GlobalBatchSampler`, a run is therefore the same function of its seed whatever the number
of processes, and resuming from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import json
import math
import re
import signal
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from models import unwrap
from models.compiling import CompiledModel
from processes import Draws, NoiseProcess

from .checkpoint import FORMAT, FORMAT_VERSION, atomic_save, first_nonfinite, read_checkpoint
from .distributed import DistEnv, all_reduce_mean, barrier, broadcast_object, is_distributed
from .errors import RunFailed, UserError, WriteFailed
from .features import FeatureDataset, GlobalBatchSampler, SeedPurpose, derive_seed
from .fileio import atomic_write_json, setting_differences, truncate_jsonl
from .precision import autocast, grad_scaler

# Settings that may change between a run and its resumption (they do not change the result; gradient
# checkpointing recomputes the very activations it drops, so a run resumed on a smaller GPU may turn it on; a
# compiled forward computes the same function, rounded as its backend's kernels round, as on another device). Paths
# are compared by what they hold (tinyfusion.training.run_settings records the content of each input), so a
# moved run folder or a data path spelled another way resumes.
RESUMABLE_CHANGES = {"log_every", "ckpt_every", "keep_last", "num_workers", "tensorboard", "device",
                     "max_nonfinite_steps", "save_model", "results_dir", "prefix", "debug", "grad_checkpointing",
                     "compile", "compile_backend"}
# The suffix of the settings that record what an input path holds (tinyfusion.training.run_settings).
CONTENT_SUFFIX = "@content"
# Exit statuses of a run stopped by a signal after saving (128 + the signal's number, as a shell reports).
SIGNAL_STATUS = {signal.SIGTERM: 143, signal.SIGINT: 130}


@dataclasses.dataclass
class TrainConfig:
    """What the loop needs to know; built from the shared training arguments (tinyfusion.args)."""

    run_dir: Path
    global_batch_size: int
    total_steps: int
    lr: float
    micro_batch_size: int | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    precision: str = "fp32"
    log_every: int = 100
    ckpt_every: int = 10_000
    keep_last: int = 2
    num_workers: int = 4
    global_seed: int = 0
    max_nonfinite_steps: int = 5
    tensorboard: bool = False
    compile_backend: str | None = None  # torch.compile the model's forward with this backend (models/compiling.py)


@dataclasses.dataclass
class Batch:
    """One micro-batch and its randomness. Shapes: x (B, C, H, W), y (B,), draws the noise process's
    draws of this batch (e.g. "t" (B,) and "noise" like x), drop_ids (B,) 1 where the label is
    replaced by the null class, gate_uniform (B, K) or None."""

    x: torch.Tensor
    y: torch.Tensor
    draws: Draws
    drop_ids: torch.Tensor
    gate_uniform: torch.Tensor | None
    step: int

    @property
    def cond(self) -> dict:
        """The conditioning keyword arguments of a model call on this batch."""
        cond = dict(y=self.y, force_drop_ids=self.drop_ids)
        if self.gate_uniform is not None:
            cond["gate_uniform"] = self.gate_uniform
        return cond


class Task(abc.ABC):
    """What a script adds to the loop. Subclass and override what differs.

    Attributes:
        gate_options: how many uniforms per sample the task's gates need (0 without gates).
    """

    gate_options: int = 0
    # JSON-lines files (in the run folder) the task appends a record with a "step" to; cut back on resume.
    log_files: tuple[str, ...] = ()

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Batch, total_steps: int) -> dict[str, torch.Tensor]:
        """Returns {"loss": scalar to minimise, other scalars to log}; `model` is the DDP-wrapped model."""

    def before_step(self, step: int, total_steps: int) -> None:
        """Called before each step (e.g. to anneal gate temperatures)."""

    def log_fields(self, ema: nn.Module) -> dict:
        """Extra fields for each log line (e.g. the current pruning decision)."""
        return {}

    def describe(self, fields: dict) -> str:
        """A short human-readable form of `log_fields` for the console."""
        return ""

    def on_log(self, record: dict) -> None:
        """Called on rank 0 with each log record (e.g. to append it to a file of the task's own)."""

    def finished(self, fields: dict) -> str | None:
        """Why the run may end before its last step, judged at a log step from `log_fields` (the same on every
        rank); None to go on. The checkpoint records it, so running the same command again ends too."""
        return None


def step_draws(seed: int, step: int, global_batch_size: int, data_shape, process: NoiseProcess, env: DistEnv, *,
               label_dropout: float = 0.0, gate_options: int = 0) -> dict:
    """The random draws of one step for the whole global batch; returns this process's slice.

    "draws" (the noise process's draws, e.g. time and noise), "drop_ids" (B,) label dropout, and with
    gates "gate_uniform" (B, K). Drawn on env.device from a generator seeded by (seed, step) alone.
    """
    g = torch.Generator(device=env.device).manual_seed(derive_seed(SeedPurpose.TRAIN_STEP, seed, step))
    dev, B = env.device, global_batch_size
    draws = {
        "draws": process.draw(g, B, data_shape, dev),
        "drop_ids": (torch.rand(B, generator=g, device=dev) < label_dropout).long(),
    }
    if gate_options:
        draws["gate_uniform"] = torch.rand((B, gate_options), generator=g, device=dev)
    local = B // env.world_size
    begin = env.rank * local

    def mine(v):
        return {k: t[begin:begin + local] for k, t in v.items()} if isinstance(v, dict) else v[begin:begin + local]
    return {k: mine(v) for k, v in draws.items()}


#################################################################################
#                                       EMA                                     #
#################################################################################

class EMA:
    """Exponential moving average of a model's trainable parameters (frozen ones are copied once).

    Args:
        model: the (unwrapped) model to average.
        decay: the averaging factor per step.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise UserError(f"--ema-decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = [(e, p) for e, p in zip(self.model.parameters(), model.parameters()) if p.requires_grad]

    @torch.no_grad()
    def update(self) -> None:
        if self._pairs:
            ema_params, params = zip(*self._pairs)
            torch._foreach_lerp_(list(ema_params), [p.detach() for p in params], 1.0 - self.decay)


#################################################################################
#                                   Run folders                                 #
#################################################################################

class CheckpointManager:
    """Training checkpoints in run_dir/checkpoints, written atomically, the last `keep_last` kept.

    The run lists what it wrote, with each file's step, in checkpoints/manifest.json: only those files
    count and rotate, by their recorded step, so a file of the user's there (say `step-best.pt`) is
    never taken for the latest nor deleted. A folder written before the manifest existed is read by
    the exact names the toolkit gives (`step-NNNNNNN.pt`).
    """

    MANIFEST = "manifest.json"
    _OWN_NAME = re.compile(r"^step-(\d{7,})\.pt$")

    def __init__(self, run_dir: Path, keep_last: int):
        if keep_last < 1:
            raise UserError(f"--keep-last must be at least 1, got {keep_last}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def _entries(self) -> list[dict]:
        manifest = self.dir / self.MANIFEST
        if manifest.is_file():
            try:
                entries = json.loads(manifest.read_text())["checkpoints"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{manifest} is damaged ({e}); it lists the run's checkpoints: restore it, or "
                                 "delete it to fall back to the step-NNNNNNN.pt names") from None
            return sorted(entries, key=lambda e: e["step"])
        found = [(int(m.group(1)), p.name) for p in self.dir.glob("step-*.pt")
                 if (m := self._OWN_NAME.match(p.name))]
        return [{"file": name, "step": step} for step, name in sorted(found)]

    def all(self) -> list[Path]:
        """The run's checkpoints that exist, oldest step first."""
        return [self.dir / e["file"] for e in self._entries() if (self.dir / e["file"]).is_file()]

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, state: dict, step: int) -> Path:
        name = f"step-{step:07d}.pt"
        path = self.dir / name
        atomic_save(state, path)
        entries = sorted([e for e in self._entries() if e["file"] != name] + [{"file": name, "step": step}],
                         key=lambda e: e["step"])
        keep, drop = entries[-self.keep_last:], entries[:-self.keep_last]
        # The manifest first: a crash between the two steps leaves an unlisted file, never a listed missing one.
        atomic_write_json(self.dir / self.MANIFEST, {"checkpoints": keep})
        for old in drop:
            (self.dir / old["file"]).unlink(missing_ok=True)
        return path


def check_resumable(saved: dict, current: dict, path: Path) -> None:
    """Refuses to resume a run whose settings differ in a way that changes the result.

    An input path is compared by its content (KEY@content) when the run recorded it, so a moved run
    folder, or a data path given relative instead of absolute, resumes; older runs compare the paths.
    """
    ignore = set(RESUMABLE_CHANGES)
    for key in current:
        if key.endswith(CONTENT_SUFFIX):
            ignore.add(key[:-len(CONTENT_SUFFIX)] if key in saved else key)
    names = {k: (f"the content of --{k[:-len(CONTENT_SUFFIX)].replace('_', '-')}" if k.endswith(CONTENT_SUFFIX)
                 else k) for k in sorted(set(saved) | set(current))}
    differences = setting_differences(saved, current, ignore=ignore, names=names)
    if differences:
        raise UserError(f"{path} belongs to a run with other settings:\n  " + "\n  ".join(differences)
                         + "\nRe-run with the same settings to resume it, or choose another --results-dir/--prefix.")


#################################################################################
#                                     Trainer                                   #
#################################################################################

class Trainer:
    """Runs a Task over a feature dataset.

    Args:
        env: the process's place in the world (tinyfusion.distributed.init_distributed).
        model: the model to train (unwrapped, on env.device); its trainable parameters are those
            in `param_groups`.
        param_groups: optimizer parameter groups (each may carry its own "lr").
        task: the script's loss and hooks.
        dataset: the training data.
        config: loop settings (with `compile_backend`, the task calls the model's forward compiled as one graph,
            `models.compiling.CompiledModel`; the EMA and the checkpoints hold the bare model).
        process: the noise process (it draws each example's time and noise).
        settings: the run's settings as a JSON-able dict, stored in checkpoints and compared on resume.
        logger: a rank-0 logger.
        record: builds the self-describing part of a checkpoint (architecture, config, lineage).
    """

    def __init__(self, *, env: DistEnv, model: nn.Module, param_groups: list[dict], task: Task,
                 dataset: FeatureDataset, config: TrainConfig, process: NoiseProcess,
                 settings: dict, logger, record: Callable[[], dict]):
        self.env, self.model, self.task, self.dataset, self.config = env, model, task, dataset, config
        # Label dropout (classifier-free guidance) is the model's: class_dropout_prob for DiT.
        self.process, self.label_dropout = process, unwrap(model).label_dropout
        self.settings, self.logger, self.record = settings, logger, record
        self.run_dir = Path(config.run_dir)

        if config.global_batch_size % env.world_size:
            raise UserError(f"--global-batch-size {config.global_batch_size} is not divisible by the "
                             f"{env.world_size} processes")
        self.local_batch_size = config.global_batch_size // env.world_size
        micro = config.micro_batch_size or self.local_batch_size
        if self.local_batch_size % micro:
            raise UserError(f"--micro-batch-size {micro} must divide the per-process batch "
                             f"{self.local_batch_size} (= global batch / processes)")
        self.micro_batch_size, self.accum_steps = micro, self.local_batch_size // micro
        if config.total_steps < 1:
            raise UserError("the run has no steps: raise --epochs or --max-steps")

        self.ema = EMA(model, config.ema_decay)
        self.trainable = [p for g in param_groups for p in g["params"]]
        for group in param_groups:
            group.setdefault("lr", config.lr)
            group["base_lr"] = group["lr"]
        # Adam's default eps; weight decay 0 by default, as DiT.
        self.optimizer = torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay,
                                           betas=tuple(config.betas))
        self.scaler = grad_scaler(config.precision, env.device)
        # What the task calls: the model, compiled with --compile (DDP wraps the compiled model: its own forward does
        # not trace as one graph). Checkpoints and the EMA hold the bare model's weights, under its own names.
        forward = model if config.compile_backend is None else CompiledModel(
            model, backend=config.compile_backend, what=_training_forward(model), log=logger.info)
        self.ddp_model = DDP(forward, device_ids=[env.local_rank] if env.device.type == "cuda" else None) \
            if env.distributed else forward
        self.checkpoints = CheckpointManager(self.run_dir, config.keep_last)
        self.step = 0
        self.skipped_steps = 0
        self.finished: str | None = None  # why the run ended before its last step (Task.finished)
        self._stop_requested = False

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """A self-describing checkpoint (load_model reads its "model"/"ema") plus the training state."""
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "kind": "training", **self.record(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in self.ema.model.state_dict().items()},
            "training_state": {
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "skipped_steps": self.skipped_steps, "finished": self.finished,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            },
            "settings": self.settings,
        }

    def maybe_resume(self) -> bool:
        """Loads the latest checkpoint of the run folder, if any; True when a run was resumed."""
        path = self.checkpoints.latest()
        if path is None:
            return False
        saved = read_checkpoint(path)
        check_resumable(saved.get("settings", {}), self.settings, path)
        state = saved["training_state"]
        self.model.load_state_dict(saved["model"])
        self.ema.model.load_state_dict(saved["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])
        self.finished = state.get("finished")
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.env.is_main:  # log lines past the checkpoint are written again by the resumed run
            for log in ("metrics.jsonl", *self.task.log_files):
                truncate_jsonl(self.run_dir / log, self.step)
        self.logger.info(f"resumed from {path} at step {self.step}")
        return True

    def save_checkpoint(self) -> None:
        """Writes the step's checkpoint (rank 0); refuses, on every rank alike, weights that are not finite."""
        bad = first_nonfinite({"model": self.model.state_dict(), "ema": self.ema.model.state_dict()})
        if bad is not None:
            raise RunFailed(self._diverged(f"at step {self.step} the weights are not finite ({bad} holds NaN or "
                                           "inf), so no checkpoint was written"))
        if self.env.is_main:
            try:
                path = self.checkpoints.save(self.state_dict(), self.step)
            except WriteFailed as e:
                last = self.checkpoints.latest()
                raise RunFailed(f"{e}. The last checkpoint is {last if last else 'none (none was written yet)'}: "
                                "free space (or fix the folder's permissions) and run the same command again to "
                                "resume from it") from e
            self.logger.info(f"saved checkpoint {path}")
        barrier()

    def _diverged(self, what: str) -> str:
        last = self.checkpoints.latest()
        return (f"the training diverged: {what}. The last good checkpoint is "
                f"{last if last else 'none (no checkpoint was written yet)'} (checkpoints are written only with "
                "finite weights). Check the data for NaN/inf values, or lower --lr, or use --precision bf16/fp32 "
                "instead of fp16; re-running the same command resumes from that checkpoint")

    # ----------------------------------------------------------------- randomness

    def step_randomness(self, step: int) -> dict[str, torch.Tensor]:
        """This process's slice of step `step`'s global draws."""
        return step_draws(self.config.global_seed, step, self.config.global_batch_size, self.dataset.latent_shape,
                          self.process, self.env, label_dropout=self.label_dropout,
                          gate_options=self.task.gate_options)

    # ----------------------------------------------------------------- loop

    def _loader(self) -> DataLoader:
        sampler = GlobalBatchSampler(
            len(self.dataset), self.config.global_batch_size, rank=self.env.rank, world_size=self.env.world_size,
            seed=self.config.global_seed, copies=self.dataset.copies if self.dataset.flip else 1,
            start_step=self.step, max_steps=self.config.total_steps)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.config.num_workers,
                          pin_memory=self.env.device.type == "cuda",
                          persistent_workers=False, prefetch_factor=4 if self.config.num_workers else None)

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.lr_schedule == "cosine":
            progress = (step - c.warmup_steps) / max(c.total_steps - c.warmup_steps, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    def _install_stop_handlers(self) -> dict:
        """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to save and stop at the end of the step."""
        def handler(signum, frame):
            self._stop_requested = signum
        previous = {}
        try:
            for sig in SIGNAL_STATUS:
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside a notebook worker): no preemption handling
            pass
        return previous

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop; all ranks must leave the loop at the same step."""
        flag = torch.tensor([float(self._stop_requested or 0)], device=self.env.device)
        if is_distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def fit(self) -> nn.Module:
        """Trains to `total_steps` (resuming from the run folder if it holds a checkpoint).

        Returns the EMA model. Raises RuntimeError when too many consecutive steps are non-finite.
        """
        c = self.config
        self.maybe_resume()
        if self.step >= c.total_steps or self.finished:
            self.logger.info(f"the run in {self.run_dir} is already complete ({self.step} steps"
                             + (f"; it ended early: {self.finished})" if self.finished else ")"))
            return self.ema.model
        previous_handlers = self._install_stop_handlers()
        writer = self._tensorboard()
        self.model.train()
        self.logger.info(
            f"training from step {self.step} to {c.total_steps}: global batch {c.global_batch_size} over "
            f"{self.env.world_size} process(es), {self.accum_steps} micro-batch(es) of {self.micro_batch_size} "
            f"each, precision {c.precision}")
        consecutive_bad, window = 0, _Window()
        try:
            for x, y in self._loader():
                metrics, ok = self.train_step(x.to(self.env.device, non_blocking=True),
                                              y.to(self.env.device, non_blocking=True))
                window.add(metrics, self.micro_batch_size * self.accum_steps)
                if ok:
                    consecutive_bad = 0
                else:
                    consecutive_bad += 1
                    self.skipped_steps += 1
                    self.logger.warning(f"step {self.step}: non-finite loss or gradient, step skipped "
                                        f"({self.skipped_steps} skipped in total)")
                    if consecutive_bad >= c.max_nonfinite_steps:
                        raise RunFailed(self._diverged(f"{consecutive_bad} consecutive steps had a non-finite loss "
                                                       f"or gradient (the last at step {self.step})"))
                if self.step % c.log_every == 0 or self.step == c.total_steps:
                    fields = self._log(window, writer)
                    window = _Window()
                    if self.step < c.total_steps:
                        self.finished = self.task.finished(fields)
                stop = self._stop_agreed()
                if stop or self.finished or self.step % c.ckpt_every == 0 or self.step == c.total_steps:
                    self.save_checkpoint()
                if self.finished:
                    self.logger.info(f"ended at step {self.step} of {c.total_steps}: {self.finished}")
                    break
                if stop:
                    name = signal.Signals(stop).name
                    self.logger.info(f"stopped by {name} at step {self.step}; re-run the same command to resume")
                    raise SystemExit(SIGNAL_STATUS.get(signal.Signals(stop), 128 + stop))
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if writer is not None:
                writer.close()
        return self.ema.model

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, bool]:
        """One optimisation step on this process's share (x, y) of the global batch; advances `step`.

        Returns the step's metrics and whether it was applied (False: skipped as non-finite).
        """
        c = self.config
        self.task.before_step(self.step, c.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * self._lr_factor(self.step)
        rnd = self.step_randomness(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        finite = torch.ones((), device=self.env.device)
        for m in range(self.accum_steps):
            sl = slice(m * self.micro_batch_size, (m + 1) * self.micro_batch_size)
            batch = Batch(x=x[sl], y=y[sl], draws={k: v[sl] for k, v in rnd["draws"].items()},
                          drop_ids=rnd["drop_ids"][sl],
                          gate_uniform=rnd["gate_uniform"][sl] if "gate_uniform" in rnd else None, step=self.step)
            sync = contextlib.nullcontext() if m == self.accum_steps - 1 or not self.env.distributed \
                else self.ddp_model.no_sync()
            with sync:
                with autocast(c.precision, self.env.device):
                    out = self.task.loss(self.ddp_model, batch, c.total_steps)
                loss = out["loss"].float()
                finite = finite * torch.isfinite(loss.detach())
                self.scaler.scale(loss / self.accum_steps).backward()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().float()) / self.accum_steps
        # Every rank must take the same decision, or their parameters would drift apart.
        finite = all_reduce_mean(finite)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, c.grad_clip if c.grad_clip > 0 else math.inf)
        ok = bool(finite.item() == 1.0) and (self.scaler.is_enabled() or bool(torch.isfinite(grad_norm)))
        if ok:
            self.scaler.step(self.optimizer)  # with fp16, skipped when the scaled gradients overflowed
            self.ema.update()
        self.scaler.update()
        sums["grad_norm"] = float(grad_norm)
        self.step += 1
        return sums, ok

    # ----------------------------------------------------------------- logging

    def _tensorboard(self):
        if not (self.config.tensorboard and self.env.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _log(self, window: "_Window", writer) -> dict:
        """Logs the window's means and the task's fields (rank 0); returns the fields (every rank)."""
        means = window.means(self.env.device)
        fields = broadcast_object(self.task.log_fields(self.ema.model) if self.env.is_main else None)
        record = {"step": self.step, **means, "steps_per_sec": window.steps / max(window.elapsed(), 1e-9),
                  "images_per_sec": window.images * self.env.world_size / max(window.elapsed(), 1e-9),
                  "lr": self.optimizer.param_groups[0]["lr"], "skipped_steps": self.skipped_steps, **fields}
        if not self.env.is_main:
            return fields
        text = " ".join(f"{k} {v:.4g}" for k, v in means.items())
        extra = self.task.describe(fields)
        self.logger.info(f"(step {self.step:07d}) {text} | {record['steps_per_sec']:.2f} steps/s "
                         f"{record['images_per_sec']:.1f} img/s lr {record['lr']:.2e}"
                         + (f" | {extra}" if extra else ""))
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.task.on_log(record)
        if writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(k, v, self.step)
        return fields


def _training_forward(model: nn.Module) -> str:
    """What a compiled training forward is called in the log: "the DiT's training forward (through its GatedModel)"."""
    inner = unwrap(model)
    through = f" (through its {type(model).__name__})" if model is not inner else ""
    return f"the {inner.arch}'s training forward{through}"


class _Window:
    """Metrics accumulated between two log lines."""

    def __init__(self):
        self.start, self.steps, self.images, self.sums = time.time(), 0, 0, {}

    def add(self, metrics: dict, images: int) -> None:
        self.steps += 1
        self.images += images
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def elapsed(self) -> float:
        return time.time() - self.start

    def means(self, device: torch.device) -> dict:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        values = all_reduce_mean(torch.tensor([self.sums[k] / self.steps for k in keys], device=device,
                                              dtype=torch.float64))
        return dict(zip(keys, values.tolist()))
