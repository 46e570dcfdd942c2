"""SiT's transport (flow matching on an interpolant path) as a noise process.

Training draws a continuous time t, uniform on the transport's training interval, and the noise x0;
the model sees x_t on the path from x0 (t = 0) to the data x1 (t = 1) and is trained to predict the
velocity (or the score, or the noise) with the transport's loss. Distillation compares the
probability-flow velocities of student and teacher (their outputs, for velocity models). Samplers:
"ode" (the probability-flow ODE: fixed-grid euler / heun or adaptive dopri5 through torchdiffeq) and
"sde" (Euler-Maruyama or Heun on the SDE with the same marginals, then a noiseless last step).

Every sample depends only on its own noise and generator, whatever batch it is in: the fixed-grid
solvers treat rows independently, dopri5 integrates each image alone (its adaptive steps are its
own), and the SDE draws each image's step noise from that image's generator.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from tinyfusion.errors import UserError
from transport import Sampler, create_transport
from transport.integrators import ADAPTIVE_METHODS, FIXED_GRID_METHODS, SDE_METHODS
from transport.transport import mean_flat

from .base import Cond, Draws, NoiseProcess, Prediction, SweepPoint, TimeDomain, counted, register_process

# What `--sampling-method` may name for the ODE: torchdiffeq's methods, "heun" being its "heun2".
ODE_METHOD_ALIASES = {"heun": "heun2"}
# The tolerances of dopri5 in a sweep over evaluation counts: about 20, 40 and 70 evaluations on the quickstart's
# SiT teacher.
SWEEP_RTOLS = (1e-1, 1e-2, 1e-3)
# The time grid a criterion over timesteps walks (`calibration_times`): as many points as DiT's diffusion has
# steps, evenly spaced over the training interval from its data end.
CALIBRATION_POINTS = 1000
# SBDM's diffusion is infinite at t = 0; where the transport samples from t = 0 (Linear and GVP with
# velocity prediction), the SDE starts here instead (the official default for the other predictions).
SDE_START_EPS = 1e-3


class TransportProcess(NoiseProcess):
    """The transport of `transport.create_transport(path_type, prediction, loss_weight, train_eps, sample_eps)`.

    Args:
        path_type: "Linear" (alpha_t = t, sigma_t = 1 - t), "GVP" or "VP".
        prediction: "velocity", "score" or "noise".
        loss_weight: None, "velocity" or "likelihood" (score and noise predictions).
        train_eps, sample_eps: distances from the singular ends; None takes the official defaults.
    """

    name = "transport"
    samplers = ("ode", "sde")
    default_steps = {"ode": 250, "sde": 250}
    # The options of each sampler and their defaults (the official ones; `--sampling-method` and friends).
    sampler_options = {
        "ode": {"sampling_method": "dopri5", "atol": 1e-6, "rtol": 1e-3},
        "sde": {"sampling_method": "Euler", "diffusion_form": "SBDM", "diffusion_norm": 1.0, "last_step": "Mean",
                "last_step_size": 0.04},
    }

    def __init__(self, path_type: str = "Linear", prediction: str = "velocity", loss_weight: str | None = None,
                 train_eps: float | None = None, sample_eps: float | None = None):
        self.transport = create_transport(path_type, prediction, loss_weight, train_eps, sample_eps)
        self.settings = dict(path_type=path_type, prediction=prediction, loss_weight=loss_weight,
                             train_eps=train_eps, sample_eps=sample_eps)

    def record(self) -> dict:
        return {"name": self.name, **self.settings}

    def time_domain(self) -> TimeDomain:
        t0, t1 = self.transport.check_interval()
        return TimeDomain("continuous", start=t0, end=t1)

    # ------------------------------------------------------------------ training

    def draw(self, generator: torch.Generator, batch_size: int, shape: Sequence[int], device: torch.device) -> Draws:
        t0, t1 = self.transport.check_interval()
        t = torch.rand(batch_size, generator=generator, device=device) * (t1 - t0) + t0
        noise = torch.randn((batch_size, *shape), generator=generator, device=device)
        return {"t": t, "noise": noise}

    def _plan(self, x: torch.Tensor, draws: Draws) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.transport.path_sampler.plan(draws["t"].to(x.dtype), draws["noise"].to(x.dtype), x)

    def model_input(self, x: torch.Tensor, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        t, x_t, _ = self._plan(x, draws)
        return x_t, t

    def losses(self, prediction: Prediction, x: torch.Tensor, draws: Draws) -> dict[str, torch.Tensor]:
        t, x_t, u_t = self._plan(x, draws)
        output = _shaped_like(prediction.output.float(), x)
        return {"loss": self.transport.loss_from_output(output, t, draws["noise"].to(x.dtype), x_t, u_t)}

    # ------------------------------------------------------------------ calibration over time

    def calibration_times(self) -> torch.Tensor:
        """CALIBRATION_POINTS evenly spaced times of the training interval [t0, t1], from the data end t1 down to t0
        (the Linear path's velocity model: 1, 1 - 1/999, ..., 0)."""
        t0, t1 = self.transport.check_interval()
        return torch.linspace(t1, t0, CALIBRATION_POINTS, dtype=torch.float64).float()

    def with_time(self, draws: Draws, t: torch.Tensor | float) -> Draws:
        return {**draws, "t": torch.full_like(draws["t"], float(t))}

    def distillation_loss(self, student: Prediction, teacher: Prediction) -> torch.Tensor:
        """MSE between the probability-flow velocities the two models imply at the student's (x_t, t)."""
        x_t, t = student.x_t.float(), student.t
        v_student = self.transport.drift_from_output(student.output.float(), x_t, t)
        v_teacher = self.transport.drift_from_output(teacher.output.detach().float(), x_t, t)
        return mean_flat((v_student - v_teacher) ** 2)

    # ------------------------------------------------------------------ sampling

    def resolve_options(self, sampler: str, options: dict | None, data_shape: Sequence[int] | None = None) -> dict:
        """The sampler's options with defaults filled in and checked; raises ValueError naming the flag."""
        resolved = super().resolve_options(sampler, options, data_shape)
        if sampler == "ode":
            method = ODE_METHOD_ALIASES.get(resolved["sampling_method"], resolved["sampling_method"])
            if method not in FIXED_GRID_METHODS + ADAPTIVE_METHODS:
                raise UserError(f"--sampling-method {resolved['sampling_method']!r} is not an ODE method; choose "
                                 f"one of: {', '.join(['heun', *FIXED_GRID_METHODS, *ADAPTIVE_METHODS])}")
            resolved["sampling_method"] = method
            for key in ("atol", "rtol"):
                if not resolved[key] > 0:
                    raise UserError(f"--{key} must be positive, got {resolved[key]}")
        else:
            if resolved["sampling_method"] not in SDE_METHODS:
                raise UserError(f"--sampling-method {resolved['sampling_method']!r} is not an SDE method; choose "
                                 f"one of: {', '.join(SDE_METHODS)}")
            if resolved["last_step"] in ("None", "none"):
                resolved["last_step"] = None
        return resolved

    def check_sampler(self, sampler: str, num_steps: int) -> None:
        super().check_sampler(sampler, num_steps)
        if num_steps < 2:
            raise UserError(f"--num-sampling-steps counts the time grid's points including both ends: at least 2, "
                             f"got {num_steps}")

    def _sde_transport(self, diffusion_form: str):
        """The transport the SDE samples with: the same, starting at SDE_START_EPS where SBDM would start at
        its singular t = 0."""
        t0, _ = self.transport.check_interval(sde=True, sampling=True, diffusion_form=diffusion_form)
        if t0 == 0.0 and diffusion_form == "SBDM" and self.transport.path_type.name != "VP":
            return create_transport(**{**self.settings, "sample_eps": SDE_START_EPS})
        return self.transport

    def sample(self, denoise: Callable, noise: torch.Tensor, cond: Cond, *, sampler: str, num_steps: int,
               generators: Sequence[torch.Generator], progress: bool = False,
               options: dict | None = None) -> torch.Tensor:
        self.check_sampler(sampler, num_steps)
        opts = self.resolve_options(sampler, options)
        model = denoise

        def denoise(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
            return _shaped_like(model(x, t, **kwargs), x)

        if sampler == "ode":
            solve = Sampler(self.transport).sample_ode(sampling_method=opts["sampling_method"], num_steps=num_steps,
                                                       atol=opts["atol"], rtol=opts["rtol"])
            samples = solve(noise, denoise, **cond)[-1]
            self.last_nfe = solve.nfe
            return samples
        solve = Sampler(self._sde_transport(opts["diffusion_form"])).sample_sde(
            sampling_method=opts["sampling_method"], diffusion_form=opts["diffusion_form"],
            diffusion_norm=opts["diffusion_norm"], last_step=opts["last_step"],
            last_step_size=opts["last_step_size"], num_steps=num_steps)
        denoise, calls = counted(denoise)
        samples = solve(noise, denoise, generator=list(generators), **cond)[-1]
        self.last_nfe = torch.full((len(noise),), calls[0], dtype=torch.long)
        return samples

    def evaluation_sweep(self, evaluations: Sequence[int], data_shape: Sequence[int]) -> list[SweepPoint]:
        """The ODE with Euler (one evaluation per step) and Heun (two), the SDE with Euler-Maruyama and Heun (one
        and two per step, and one for the default last step), each at the grid nearest each count; and dopri5 at
        SWEEP_RTOLS (atol rtol / 1000), whose counts are measured per image."""
        points = []
        for n in evaluations:
            heun = max(1, round(n / 2))
            sde_heun = max(1, round((n - 1) / 2))
            points += [SweepPoint("ode-euler", "ode", n + 1, {"sampling_method": "euler"}, n),
                       SweepPoint("ode-heun", "ode", heun + 1, {"sampling_method": "heun2"}, 2 * heun)]
            if n >= 2:
                points.append(SweepPoint("sde-euler", "sde", n, {"sampling_method": "Euler"}, n))
            points.append(SweepPoint("sde-heun", "sde", sde_heun + 1, {"sampling_method": "Heun"}, 2 * sde_heun + 1))
        for rtol in SWEEP_RTOLS:
            points.append(SweepPoint(f"ode-dopri5 rtol {rtol:g}", "ode", 2,
                                     {"sampling_method": "dopri5", "rtol": rtol, "atol": rtol * 1e-3}, None))
        return points


def _shaped_like(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The model's output, which the transport needs shaped like its input x: a file whose model is a DiT (its
    learn_sigma output has 2C channels) but whose record names the transport is a bad input, named here."""
    if output.shape != x.shape:
        raise UserError(f"the model returned {tuple(output.shape)} for inputs {tuple(x.shape)}; the transport "
                        "needs outputs shaped like its inputs (a learn_sigma DiT returns 2C channels: load the "
                        "weights as a SiT, --model SiT-..., or sample the DiT with its Gaussian process)")
    return output


register_process(TransportProcess.name, TransportProcess)
