"""The transport of SiT: what the model is trained to predict on a path, and what samplers see of it.

`Transport` owns a path (`path.py`), the model's prediction type and the loss weighting: it draws
training examples, computes the per-sample losses, and turns the model's output into the drift of
the probability-flow ODE and into the score. `Sampler` builds ODE and SDE samplers from those with
the solvers of `integrators.py`. The model is any `model(x, t, **model_kwargs)` with t an (N,)
tensor of times in [0, 1]; t = 0 is noise x0, t = 1 is data x1.
"""

from __future__ import annotations

import enum
from typing import Callable

import torch

from . import path
from .integrators import ODE, SDE

# A model call as the transport makes it: model(x, t, **model_kwargs), t of shape (N,).
Model = Callable[..., torch.Tensor]


class ModelType(enum.Enum):
    """What the model predicts."""

    NOISE = enum.auto()  # the noise x0 (epsilon)
    SCORE = enum.auto()  # the score grad log p_t(x_t)
    VELOCITY = enum.auto()  # the velocity u_t


class PathType(enum.Enum):
    """Which interpolant joins noise and data."""

    LINEAR = enum.auto()
    GVP = enum.auto()
    VP = enum.auto()


class WeightType(enum.Enum):
    """How the score and noise losses are weighted over time (the velocity loss is never weighted)."""

    NONE = enum.auto()
    VELOCITY = enum.auto()  # (drift_var / sigma_t)^2: the score loss becomes a velocity loss
    LIKELIHOOD = enum.auto()  # drift_var / sigma_t^2: maximum-likelihood weighting


PATHS = {PathType.LINEAR: path.ICPlan, PathType.GVP: path.GVPCPlan, PathType.VP: path.VPCPlan}


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (N, ...) to (N,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


class Transport:
    """A path, a prediction type and a loss weighting (build one with `transport.create_transport`).

    Args:
        model_type: what the model predicts.
        path_type: the interpolant.
        loss_type: the weighting of the score and noise losses.
        train_eps: how far training keeps from the ends where the path is singular (see `check_interval`).
        sample_eps: the same for sampling.
    """

    def __init__(self, *, model_type: ModelType, path_type: PathType, loss_type: WeightType, train_eps: float,
                 sample_eps: float):
        self.model_type = model_type
        self.path_type = path_type
        self.loss_type = loss_type
        self.train_eps = train_eps
        self.sample_eps = sample_eps
        self.path_sampler = PATHS[path_type]()

    def check_interval(self, *, sde: bool = False, sampling: bool = False, reverse: bool = False,
                       diffusion_form: str = "SBDM", last_step_size: float = 0.0) -> tuple[float, float]:
        """The time interval [t0, t1] that training (or sampling) covers, with the official rules.

        eps is `train_eps`, or `sample_eps` when `sampling`.
        - VP: t0 = 0 (the noise end is regular: alpha_0 is small but sigma_0 > 0), t1 = 1 - eps, or
          1 - last_step_size for an SDE with a last step.
        - Linear and GVP with velocity prediction, ODE or training: [0, 1] (stable everywhere).
        - Linear and GVP otherwise (score or noise prediction, or any SDE): t0 = eps for score/noise
          prediction or an SDE with the SBDM diffusion (infinite at t = 0), else 0; t1 = 1 - eps,
          or 1 - last_step_size for an SDE with a last step.
        `reverse` swaps the ends (integrating from data to noise). The official code maps them to
        1 - t0 and 1 - t1, the same for every interval but VP's, where it would start at the singular
        t = 1 and stop at eps.
        """
        t0, t1 = 0.0, 1.0
        eps = self.sample_eps if sampling else self.train_eps
        end = 1 - last_step_size if (sde and last_step_size != 0) else 1 - eps
        if self.path_type == PathType.VP:
            t1 = end
        elif self.model_type != ModelType.VELOCITY or sde:
            t0 = eps if (diffusion_form == "SBDM" and sde) or self.model_type != ModelType.VELOCITY else 0.0
            t1 = end
        return (t1, t0) if reverse else (t0, t1)

    def sample(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draws a training time (N,), uniform on the training interval, and noise x0 for data x1 (N, ...).

        Returns:
            (t, x0, x1).
        """
        t0, t1 = self.check_interval()
        t = torch.rand(x1.shape[0], device=x1.device, dtype=x1.dtype) * (t1 - t0) + t0
        return t, torch.randn_like(x1), x1

    def training_losses(self, model: Model, x1: torch.Tensor, model_kwargs: dict | None = None,
                        t: torch.Tensor | None = None, x0: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The per-sample training loss at x_t on the path from x0 to x1.

        Velocity prediction: |v - u_t|^2. Noise prediction: w_t |eps - x0|^2. Score prediction:
        w_t |sigma_t s + x0|^2 (the score target is -x0 / sigma_t). w_t is the loss weighting.

        Args:
            model: model(x_t, t, **model_kwargs), returning (N, ...) like x1.
            x1: (N, ...) data.
            model_kwargs: conditioning, e.g. dict(y=labels).
            t: (N,) times in the training interval (`check_interval()`); drawn uniformly when None.
            x0: (N, ...) noise; drawn when None. Pass both to use your own random draws.
        Returns:
            "loss": (N,) per-sample losses, "pred": the model's output.
        """
        if t is not None:
            self._check_times(t, x1)
        if x0 is not None and x0.shape != x1.shape:
            raise ValueError(f"x0 must be shaped like x1 {tuple(x1.shape)}, got {tuple(x0.shape)}")
        if t is None or x0 is None:
            drawn_t, drawn_x0, _ = self.sample(x1)
            t = drawn_t if t is None else t
            x0 = drawn_x0 if x0 is None else x0
        t, xt, ut = self.path_sampler.plan(t, x0, x1)
        pred = _call(model, xt, t, model_kwargs or {})
        return {"loss": self.loss_from_output(pred, t, x0, xt, ut), "pred": pred}

    def loss_from_output(self, pred: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
                         ut: torch.Tensor) -> torch.Tensor:
        """The per-sample (N,) loss of the model's output `pred` at (xt, t) on the path from noise x0, whose
        target velocity is ut (`path_sampler.plan`): what `training_losses` computes after its model call."""
        if self.model_type == ModelType.VELOCITY:
            return mean_flat((pred - ut) ** 2)
        _, drift_var = self.path_sampler.compute_drift(xt, t)
        sigma_t, _ = self.path_sampler.compute_sigma_t(path.expand_t_like_x(t, xt))
        if self.loss_type == WeightType.VELOCITY:
            weight = (drift_var / sigma_t) ** 2
        elif self.loss_type == WeightType.LIKELIHOOD:
            weight = drift_var / sigma_t ** 2
        else:
            weight = 1
        if self.model_type == ModelType.NOISE:
            return mean_flat(weight * (pred - x0) ** 2)
        return mean_flat(weight * (pred * sigma_t + x0) ** 2)

    def _check_times(self, t: torch.Tensor, x1: torch.Tensor) -> None:
        if t.shape != (x1.shape[0],):
            raise ValueError(f"t must be of shape ({x1.shape[0]},), one time per sample, got {tuple(t.shape)}")
        t0, t1 = self.check_interval()
        if not bool(((t >= t0) & (t <= t1)).all()):
            raise ValueError(f"training times must lie in [{t0:g}, {t1:g}] for this transport (the path is singular "
                             f"beyond); got [{t.min().item():g}, {t.max().item():g}]")

    # ------------------------------------------------------------------ the model's output, converted

    def drift_from_output(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The probability-flow velocity at (x, t) given the model's output there."""
        if self.model_type == ModelType.VELOCITY:
            return output
        drift_mean, drift_var = self.path_sampler.compute_drift(x, t)
        return -drift_mean + drift_var * self.score_from_output(output, x, t)

    def score_from_output(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score grad log p_t(x) given the model's output at (x, t)."""
        if self.model_type == ModelType.SCORE:
            return output
        if self.model_type == ModelType.NOISE:
            return output / -self.path_sampler.compute_sigma_t(path.expand_t_like_x(t, x))[0]
        return self.path_sampler.get_score_from_velocity(output, x, t)

    def get_drift(self) -> Callable[..., torch.Tensor]:
        """drift(x, t, model, **model_kwargs): the velocity of the probability-flow ODE (one model call)."""
        def drift(x: torch.Tensor, t: torch.Tensor, model: Model, **model_kwargs) -> torch.Tensor:
            return self.drift_from_output(_call(model, x, t, model_kwargs), x, t)
        return drift

    def get_score(self) -> Callable[..., torch.Tensor]:
        """score(x, t, model, **model_kwargs): grad log p_t(x) (one model call)."""
        def score(x: torch.Tensor, t: torch.Tensor, model: Model, **model_kwargs) -> torch.Tensor:
            return self.score_from_output(_call(model, x, t, model_kwargs), x, t)
        return score


def _call(model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
    """model(x, t, **model_kwargs), whose output must be shaped like x."""
    out = model(x, t, **model_kwargs)
    if out.shape != x.shape:
        raise ValueError(f"the model returned {tuple(out.shape)} for inputs {tuple(x.shape)}; a transport needs "
                         "outputs shaped like its inputs (a learn_sigma DiT returns 2C channels: use SiT)")
    return out


class Sampler:
    """ODE and SDE samplers of a transport: each method returns `fn(x, model, **model_kwargs)`, whose x is
    the noise at t = 0 (N, ...) and whose result is the trajectory, last entry the samples."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self.drift = transport.get_drift()
        self.score = transport.get_score()

    def _sde_drift_and_diffusion(self, diffusion_form: str, diffusion_norm: float):
        """The SDE drift v + w_t * score (one model call) and diffusion w_t with the same marginals
        as the ODE for any w_t (SiT eq. 9)."""
        transport, path_sampler = self.transport, self.transport.path_sampler

        def diffusion(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return path_sampler.compute_diffusion(x, t, form=diffusion_form, norm=diffusion_norm)

        def sde_drift(x: torch.Tensor, t: torch.Tensor, model: Model, **model_kwargs) -> torch.Tensor:
            out = _call(model, x, t, model_kwargs)
            return transport.drift_from_output(out, x, t) + diffusion(x, t) * transport.score_from_output(out, x, t)

        return sde_drift, diffusion

    def _last_step(self, sde_drift: Callable, last_step: str | None, last_step_size: float) -> Callable:
        """The step from t1 to (about) 1 that the SDE takes without noise."""
        if last_step is None:
            return lambda x, t, model, **model_kwargs: x
        if last_step == "Mean":
            return lambda x, t, model, **model_kwargs: x + sde_drift(x, t, model, **model_kwargs) * last_step_size
        if last_step == "Euler":
            return lambda x, t, model, **model_kwargs: x + self.drift(x, t, model, **model_kwargs) * last_step_size
        if last_step == "Tweedie":
            path_sampler = self.transport.path_sampler

            def tweedie(x, t, model, **model_kwargs):
                # E[x1 | x_t] = (x_t + sigma_t^2 score) / alpha_t
                alpha_t = path_sampler.compute_alpha_t(path.expand_t_like_x(t, x))[0]
                sigma_t = path_sampler.compute_sigma_t(path.expand_t_like_x(t, x))[0]
                return x / alpha_t + sigma_t ** 2 / alpha_t * self.score(x, t, model, **model_kwargs)
            return tweedie
        raise ValueError(f"unknown last step {last_step!r}; choose one of: Mean, Tweedie, Euler, None")

    def sample_sde(self, *, sampling_method: str = "Euler", diffusion_form: str = "SBDM", diffusion_norm: float = 1.0,
                   last_step: str | None = "Mean", last_step_size: float = 0.04, num_steps: int = 250) -> Callable:
        """An SDE sampler: `fn(x, model, generator=None, **model_kwargs)` returns the list of num_steps states.

        num_steps - 1 steps of `sampling_method` ("Euler": Euler-Maruyama, "Heun") on an even grid over
        [t0, t1] (`Transport.check_interval(sde=True, sampling=True)`; t1 = 1 - last_step_size), then
        the noiseless last step ("Mean": a drift step of last_step_size; "Tweedie": the posterior mean
        of x1; "Euler": an ODE step; None: none).

        `generator` draws every step's noise: one torch.Generator, or a list of one per row of x, in
        which case row i's noise comes from generator i alone, so a sample depends only on its own
        initial noise and generator, whatever batch it is in. A generator may live on the CPU while
        x is on the GPU (the noise is drawn on the generator's device). None uses torch's global RNG.

        Raises:
            ValueError: the diffusion is infinite where the interval starts (SBDM at t = 0 on the Linear
                and GVP paths, which velocity prediction reaches since its sample_eps is 0).
        """
        if last_step is None:
            last_step_size = 0.0
        sde_drift, diffusion = self._sde_drift_and_diffusion(diffusion_form, diffusion_norm)
        t0, t1 = self.transport.check_interval(sde=True, sampling=True, diffusion_form=diffusion_form,
                                               last_step_size=last_step_size)
        probe = torch.full((1,), t0)
        if not torch.isfinite(diffusion(torch.zeros(1, 1), probe)).all():
            raise ValueError(f"the {diffusion_form} diffusion is infinite at t = {t0:g}, where sampling starts; create "
                             "the transport with sample_eps > 0 (e.g. 1e-3) or choose another diffusion_form")
        solver = SDE(sde_drift, diffusion, t0=t0, t1=t1, num_steps=num_steps, method=sampling_method)
        last_step_fn = self._last_step(sde_drift, last_step, last_step_size)

        def sample(x: torch.Tensor, model: Model, generator: torch.Generator | list[torch.Generator] | None = None,
                   **model_kwargs) -> list[torch.Tensor]:
            xs = solver(x, model, generator=generator, **model_kwargs)
            t = torch.full((x.shape[0],), t1, device=x.device, dtype=x.dtype)
            xs.append(last_step_fn(xs[-1], t, model, **model_kwargs))
            return xs

        return sample

    def sample_ode(self, *, sampling_method: str = "dopri5", num_steps: int = 50, atol: float = 1e-6,
                   rtol: float = 1e-3, reverse: bool = False) -> ODE:
        """A probability-flow ODE sampler: `fn(x, model, **model_kwargs)` returns (num_steps, N, ...).

        Fixed-grid methods ("euler", "heun2", ...) take num_steps - 1 steps on the even grid over
        [t0, t1] (`Transport.check_interval(sampling=True)`); adaptive ones ("dopri5", ...) return
        num_steps interpolated points and choose their steps per image (see `integrators.ODE`).
        `fn.nfe` holds the (N,) number of model calls each image took in the last call.
        `reverse` integrates from data (t = 1) to noise.
        """
        t0, t1 = self.transport.check_interval(sampling=True, reverse=reverse)
        return ODE(self.drift, t0=t0, t1=t1, method=sampling_method, num_steps=num_steps, atol=atol, rtol=rtol)

