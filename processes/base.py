"""The noise-process protocol: the one object through which training, distillation, scoring and
sampling reach a diffusion-type process.

A process says how a clean example becomes a training example (its random draws and the noisy
input), what the model is trained to predict and with which loss, what distillation compares, and
which samplers it offers. The rest of the toolkit never names a process's internals: the Gaussian
diffusion of DiT (`processes.gaussian`) is one implementation; a flow-matching transport or a
masked-token process is another, registered with `register_process`.

Every random draw a process needs for a training step is returned by `draw` as a dict of tensors
whose first dimension is the batch, so the training loop draws the whole global batch from one
seeded generator and hands each process its slice (runs are the same for any process count).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable, Sequence

import torch
import torch.nn as nn

from tinyfusion.errors import UserError

Draws = dict[str, torch.Tensor]
# Conditioning keyword arguments of a model call: y (labels), force_drop_ids, gate_uniform, ...
Cond = dict


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One setting of a sampler in a sweep over the number of network evaluations (`evaluation_sweep`).

    Attributes:
        name: the sampler as tables name it ("ddpm", "ode-heun", "ode-dopri5 rtol 0.01", "mar").
        sampler: the --sampler it runs.
        num_steps: its --num-sampling-steps (None: the process's default, e.g. MAR's token steps).
        options: its options (ODE method and tolerances, MAR's iterations).
        evaluations: the network evaluations per image it makes (None for an adaptive solver: measured).
    """

    name: str
    sampler: str
    num_steps: int | None
    options: dict
    evaluations: int | None


def counted(denoise: Callable) -> tuple[Callable, list[int]]:
    """`denoise` and a one-element list that counts its calls (what a sampler sets `last_nfe` from)."""
    calls = [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return denoise(*args, **kwargs)

    return counting, calls


@dataclasses.dataclass(frozen=True)
class TimeDomain:
    """Where a process's time lives: `steps` integer steps 0..steps-1, or the interval [start, end]."""

    kind: str  # "discrete" or "continuous"
    steps: int | None = None
    start: float = 0.0
    end: float = 1.0

    def describe(self) -> str:
        return f"{self.steps} discrete steps" if self.kind == "discrete" else f"t in [{self.start:g}, {self.end:g}]"


@dataclasses.dataclass
class Prediction:
    """One model call on a training example: the model's output and the input it saw.

    Attributes:
        output: the model's raw output, e.g. (N, C_out, H, W).
        x_t: the noisy input the model was given.
        t: the time the model was given.
        weight: per-row weights of the loss where only some rows count (masked tokens: 1 at the rows of
            masked tokens), or None (every row counts).
    """

    output: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    weight: torch.Tensor | None = None


class NoiseProcess(abc.ABC):
    """A diffusion-type process. Subclasses implement the abstract methods and set `name`.

    Attributes:
        name: the registry name recorded in checkpoints ("gaussian", ...).
        samplers: the sampler names it offers, the first being the default.
        default_steps: the default number of sampling steps of each sampler.
    """

    name: str = ""
    samplers: tuple[str, ...] = ()
    default_steps: dict[str, int] = {}
    # Per sampler, the options it takes (e.g. the ODE's solver and tolerances) and their defaults.
    sampler_options: dict[str, dict] = {}
    # True for a process whose sampler runs the model's own generation loop (MAR's masked iterations):
    # it implements `sample_model` instead of `sample`.
    drives_model: bool = False
    # After `sample` or `sample_model`: (N,) the network evaluations each image took. A guided evaluation
    # (the conditional and null rows in one call) counts once; MAR counts its backbone passes.
    last_nfe: torch.Tensor | None = None

    # ------------------------------------------------------------------ description

    @abc.abstractmethod
    def record(self) -> dict:
        """Everything that rebuilds this process, as JSON values: {"name": ..., settings...}."""

    @abc.abstractmethod
    def time_domain(self) -> TimeDomain:
        """The process's time domain."""

    # ------------------------------------------------------------------ training

    @abc.abstractmethod
    def draw(self, generator: torch.Generator, batch_size: int, shape: Sequence[int], device: torch.device) -> Draws:
        """The random draws of a batch of training examples ((B, ...) tensors: time, noise, ...)."""

    @abc.abstractmethod
    def model_input(self, x: torch.Tensor, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """The training example the model sees, (x_t, t): the noisy input and its time."""

    def predict(self, model: nn.Module, x: torch.Tensor, draws: Draws, cond: Cond) -> Prediction:
        """The model called on the training example (x, draws) with conditioning `cond`."""
        x_t, t = self.model_input(x, draws)
        return Prediction(output=model(x_t, t, **cond), x_t=x_t, t=t)

    @abc.abstractmethod
    def losses(self, prediction: Prediction, x: torch.Tensor, draws: Draws) -> dict[str, torch.Tensor]:
        """Per-sample (N,) training loss terms of a prediction: "loss" and the terms it sums."""

    def training_losses(self, model: nn.Module, x: torch.Tensor, draws: Draws, cond: Cond) -> dict[str, torch.Tensor]:
        """Per-sample training losses of `model` on the clean batch x with the given draws."""
        return self.losses(self.predict(model, x, draws, cond), x, draws)

    @abc.abstractmethod
    def distillation_loss(self, student: Prediction, teacher: Prediction) -> torch.Tensor:
        """Per-sample (N,) distance between a student's and a teacher's predictions of one example."""

    # ------------------------------------------------------------------ calibration over time

    def calibration_times(self) -> torch.Tensor:
        """The process's time grid in order from the data end: what a criterion that walks the timesteps one by
        one visits (Diff-Pruning's Taylor loop, `tinyfusion.pruning.width`). (K,) times as the model takes them."""
        raise UserError(f"the {self.name} process has no time grid to walk: a criterion over timesteps (--width-"
                         "criterion taylor) does not apply to it")

    def with_time(self, draws: Draws, t: torch.Tensor | float) -> Draws:
        """`draws` with every example's time set to t (a point of `calibration_times`), the rest kept."""
        raise UserError(f"the {self.name} process has no time grid to walk: a criterion over timesteps (--width-"
                         "criterion taylor) does not apply to it")

    def calibration_loss(self, prediction: Prediction, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        """Per-sample (N,) loss that a calibration differentiates (the Taylor criterion's); default: the
        training loss."""
        return self.losses(prediction, x, draws)["loss"]

    # ------------------------------------------------------------------ sampling

    def check_sampler(self, sampler: str, num_steps: int) -> None:
        """Raises ValueError naming the fix when `sampler` or `num_steps` does not fit this process."""
        if sampler not in self.samplers:
            raise UserError(f"--sampler {sampler!r} is not a sampler of the {self.name} process; choose one of "
                             f"{', '.join(self.samplers)}")
        if num_steps < 1:
            raise UserError(f"--num-sampling-steps must be at least 1, got {num_steps}")

    def resolve_options(self, sampler: str, options: dict | None, data_shape: Sequence[int] | None = None) -> dict:
        """The options of `sampler` with its defaults filled in (None values count as not given).

        `data_shape` (the model's (c, h, w), when known) lets a process fit a default to the model, or refuse
        an option that the model cannot take (the masked-token sampler's iterations: at most one per token).

        Raises:
            UserError: an option the sampler does not take, named as its flag.
        """
        defaults = self.sampler_options.get(sampler, {})
        given = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
            takes = ", ".join("--" + k.replace("_", "-") for k in defaults) or "no options"
            raise UserError(f"{flags}: not an option of the {self.name} process's {sampler!r} sampler (it takes "
                             f"{takes}); drop it")
        return {**defaults, **given}

    @abc.abstractmethod
    def sample(self, denoise: Callable, noise: torch.Tensor, cond: Cond, *, sampler: str, num_steps: int,
               generators: Sequence[torch.Generator], progress: bool = False,
               options: dict | None = None) -> torch.Tensor:
        """Samples from noise with `denoise(x, t, **cond)`; image i draws step noise from generators[i].
        `options` are the sampler's (see `sampler_options`; `resolve_options` fills the defaults)."""

    def sample_model(self, model: nn.Module, labels: torch.Tensor, generators: Sequence[torch.Generator], *,
                     sampler: str, num_steps: int, cfg_scale: float, progress: bool = False,
                     options: dict | None = None) -> torch.Tensor:
        """Samples (N, ...) for the labels by the model's own loop (processes with `drives_model`); image i
        depends on generators[i] alone."""
        raise NotImplementedError(f"the {self.name} process samples from noise with `sample`")

    def evaluation_sweep(self, evaluations: Sequence[int], data_shape: Sequence[int]) -> list[SweepPoint]:
        """Every sampler of the process at about each number of network evaluations per image in `evaluations`
        (benchmarks.nfe), for a model of `data_shape`; a sampler skips the counts it cannot make. Default: every
        sampler makes one evaluation per step."""
        return [SweepPoint(s, s, n, {}, n) for s in self.samplers for n in evaluations]


#################################################################################
#                                     Registry                                  #
#################################################################################

_PROCESSES: dict[str, Callable[..., NoiseProcess]] = {}


def register_process(name: str, factory: Callable[..., NoiseProcess]) -> None:
    """Makes `create_process({"name": name, **settings})` call `factory(**settings)`."""
    _PROCESSES[name] = factory


def process_names() -> list[str]:
    return list(_PROCESSES)


def create_process(record: dict) -> NoiseProcess:
    """Rebuilds a process from its record (what `NoiseProcess.record` returned and checkpoints store)."""
    settings = dict(record)
    name = settings.pop("name", None)
    if name not in _PROCESSES:
        raise UserError(f"unknown noise process {name!r}; known: {', '.join(_PROCESSES)}")
    try:
        return _PROCESSES[name](**settings)
    except TypeError as e:
        raise UserError(f"the settings {settings} do not fit the {name} process: {e}") from None


def all_samplers() -> list[str]:
    """Every sampler name of every registered process (the choices of --sampler)."""
    names: list[str] = []
    for factory in _PROCESSES.values():
        for sampler in getattr(factory, "samplers", ()):
            if sampler not in names:
                names.append(sampler)
    return names
