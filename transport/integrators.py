"""Solvers of the sampling ODE and SDE: they integrate any drift(x, t, model, **model_kwargs) from t0 to t1.

ODEs go through torchdiffeq (fixed-grid "euler", "heun2", ... and adaptive "dopri5", ...); the SDE
solvers (Euler-Maruyama and Heun) are written here, drawing every step's noise per image when given
one generator per image.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

# torchdiffeq's methods on a fixed grid (one step between consecutive output times) and adaptive ones.
FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
SDE_METHODS = ("Euler", "Heun")

Generators = torch.Generator | Sequence[torch.Generator] | None


def _times(t: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    """A solver's scalar time as the (n,) tensor a model takes."""
    return t.to(device=like.device, dtype=like.dtype).reshape(1).repeat(n)


def _row_kwargs(model_kwargs: dict, i: int, n: int) -> dict:
    """The keyword arguments of row i alone: tensors with a batch dimension of n are sliced to [i:i+1]."""
    return {k: v[i:i + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in model_kwargs.items()}


class ODE:
    """The probability-flow ODE dx/dt = drift(x, t), from t0 to t1, with a torchdiffeq method.

    Calling it, `ode(x, model, **model_kwargs)`, returns the solution at num_steps evenly spaced times,
    (num_steps, N, ...), the first entry x itself. Fixed-grid methods step between those times, the
    whole batch at once. Adaptive methods choose their steps from an error estimate; a batched solve
    would take the steps its worst image needs, so an image would depend on its batch-mates. Each
    image is therefore integrated alone (its own torchdiffeq solve, with its rows of the tensor
    model_kwargs: those whose first dimension is N), which makes it a function of its initial noise
    and conditioning only, at the price of N solves of batch size 1. A model that doubles its batch
    for guidance must do so inside the call (one row per image here), as `tinyfusion.sampling` does.
    The last adaptive step ends at t1 rather than past it, so the model only sees times in [t0, t1].

    After a call, `nfe` is the (N,) number of drift evaluations (model calls) each image took.

    Args:
        drift: drift(x, t, model, **model_kwargs) with t of shape (N,).
        t0, t1: the interval (t1 < t0 integrates backwards).
        method: one of FIXED_GRID_METHODS or ADAPTIVE_METHODS.
        num_steps: number of output times (fixed grid: num_steps - 1 steps).
        atol, rtol: error tolerances of the adaptive methods.
    """

    def __init__(self, drift: Callable, *, t0: float, t1: float, method: str, num_steps: int, atol: float,
                 rtol: float):
        if method not in FIXED_GRID_METHODS + ADAPTIVE_METHODS:
            raise ValueError(f"unknown ODE method {method!r}; choose one of: "
                             f"{', '.join(FIXED_GRID_METHODS + ADAPTIVE_METHODS)}")
        if num_steps < 2:
            raise ValueError(f"num_steps counts the output times including both ends: at least 2, got {num_steps}")
        self.drift = drift
        self.t0, self.t1 = t0, t1
        self.method = method
        self.num_steps = num_steps
        self.atol, self.rtol = atol, rtol
        self.nfe: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, model: Callable, **model_kwargs) -> torch.Tensor:
        """x (N, ...) at t0 to the trajectory (num_steps, N, ...)."""
        t = torch.linspace(self.t0, self.t1, self.num_steps, device=x.device)
        n = x.shape[0]
        if self.method in FIXED_GRID_METHODS:
            xs, nfe = self._solve(x, t, model, model_kwargs)
            self.nfe = torch.full((n,), nfe, dtype=torch.long)
            return xs
        rows, nfes = [], []
        for i in range(n):
            xs, nfe = self._solve(x[i:i + 1], t, model, _row_kwargs(model_kwargs, i, n))
            rows.append(xs)
            nfes.append(nfe)
        self.nfe = torch.tensor(nfes, dtype=torch.long)
        return torch.cat(rows, dim=1)  # (num_steps, N, ...)

    def _solve(self, x: torch.Tensor, t: torch.Tensor, model: Callable, model_kwargs: dict
               ) -> tuple[torch.Tensor, int]:
        calls = 0

        def f(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return self.drift(y, _times(s, y.shape[0], y), model, **model_kwargs)

        # Adaptive steps end exactly at t1 instead of overshooting it (torchdiffeq's default, kept by the
        # official code): the model is never called outside [t0, t1], where the VP path has sigma_t^2 < 0.
        options = dict(step_t=t[-1:]) if self.method in ADAPTIVE_METHODS else None
        from torchdiffeq import odeint  # imported when sampling: it pulls in scipy (0.5 s a process start)

        xs = odeint(f, x, t, method=self.method, atol=self.atol, rtol=self.rtol, options=options)  # (num_steps, n, ...)
        return xs, calls


def draw_noise(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like x (N, ...): row i from generator i when given a list of N."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device).to(x)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; give one per row")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device) for g in generator]).to(x)


class SDE:
    """The SDE dx = drift(x, t) dt + sqrt(2 w_t) dW on an even grid of num_steps times over [t0, t1].

    Calling it, `sde(x, model, generator=None, **model_kwargs)`, takes num_steps - 1 steps and returns
    the list of the states after each (the last step to t = 1 is the caller's, see `Sampler.sample_sde`).

    Args:
        drift: drift(x, t, model, **model_kwargs) with t of shape (N,).
        diffusion: diffusion(x, t), the coefficient w_t, broadcastable against x.
        t0, t1: the interval, t0 < t1 (the SDE runs forward, from noise to data).
        num_steps: grid points, including both ends.
        method: "Euler" (Euler-Maruyama) or "Heun" (noise first, then a Heun step of the drift).
    """

    def __init__(self, drift: Callable, diffusion: Callable, *, t0: float, t1: float, num_steps: int, method: str):
        if method not in SDE_METHODS:
            raise ValueError(f"unknown SDE method {method!r}; choose one of: {', '.join(SDE_METHODS)}")
        if not t0 < t1:
            raise ValueError(f"the SDE runs forward in time: need t0 < t1, got [{t0:g}, {t1:g}]")
        if num_steps < 2:
            raise ValueError(f"num_steps counts the grid points including both ends: at least 2, got {num_steps}")
        self.drift, self.diffusion = drift, diffusion
        self.t = torch.linspace(t0, t1, num_steps)
        self.dt = float(self.t[1] - self.t[0])
        self.method = method

    def __call__(self, x: torch.Tensor, model: Callable, generator: Generators = None,
                 **model_kwargs) -> list[torch.Tensor]:
        step = self._euler_maruyama_step if self.method == "Euler" else self._heun_step
        xs = []
        for ti in self.t[:-1].tolist():
            t = torch.full((x.shape[0],), ti, device=x.device, dtype=x.dtype)
            dw = draw_noise(x, generator) * self.dt ** 0.5  # Brownian increment, (N, ...)
            x = step(x, t, dw, model, model_kwargs)
            xs.append(x)
        return xs

    def _euler_maruyama_step(self, x, t, dw, model, model_kwargs):
        mean = x + self.drift(x, t, model, **model_kwargs) * self.dt
        return mean + torch.sqrt(2 * self.diffusion(x, t)) * dw

    def _heun_step(self, x, t, dw, model, model_kwargs):
        x_hat = x + torch.sqrt(2 * self.diffusion(x, t)) * dw
        k1 = self.drift(x_hat, t, model, **model_kwargs)
        k2 = self.drift(x_hat + self.dt * k1, t + self.dt, model, **model_kwargs)
        return x_hat + 0.5 * self.dt * (k1 + k2)
