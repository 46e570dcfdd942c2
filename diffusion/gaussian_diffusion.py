"""Gaussian diffusion of Ho et al. (2020) with the learned variances of Nichol & Dhariwal (2021).

The process and every constant follow ADM ("Improved DDPM", "Diffusion Models Beat GANs"), the
diffusion DiT was trained with: schedules, posteriors and constants are computed in float64
with NumPy and gathered per timestep into float32, so numbers match the official code.
Equation numbers refer to Ho et al. (DDPM) and Nichol & Dhariwal (IDDPM).
"""

from __future__ import annotations

import enum
import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

Generators = Sequence[torch.Generator] | torch.Generator | None


class ModelMeanType(enum.Enum):
    """What the network predicts."""
    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen."""
    FIXED_SMALL = enum.auto()  # the posterior variance beta-tilde_t
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED = enum.auto()  # the network predicts log sigma^2
    LEARNED_RANGE = enum.auto()  # the network interpolates between the two above in the log domain


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE on the mean prediction, plus the VB term when variances are learned
    RESCALED_MSE = enum.auto()  # the same with the VB term scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the variational bound times num_timesteps

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


#################################################################################
#                                 Noise schedules                               #
#################################################################################

def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas (T,) in float64 for a named schedule.

    "linear": DDPM's 1e-4..0.02 over 1000 steps, stretched so that any T has the same endpoints
    in continuous time. "cosine": IDDPM's alpha-bar(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2).
    """
    if name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise schedule {name!r}; choose 'linear' or 'cosine'")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise a continuous alpha-bar(t), t in [0, 1]; clipped at max_beta (IDDPM)."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def _extract(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape: Sequence[int]) -> torch.Tensor:
    """Gathers arr[timesteps] (float64 to float32) and broadcasts it to (N, 1, ..., 1) of the shape."""
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while res.dim() < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


class NoiseStream:
    """Noise drawn beforehand, handed out in order: the k-th `_randn_like` call of a loop given this as its
    generator returns draws[k]. Lets a caller draw a loop's noise in a few large calls."""

    def __init__(self, draws: Sequence[torch.Tensor]):
        self._draws = iter(draws)

    def next_like(self, x: torch.Tensor) -> torch.Tensor:
        draw = next(self._draws, None)
        if draw is None or draw.shape != x.shape:
            raise ValueError(f"the noise stream has no draw of shape {tuple(x.shape)} left")
        return draw.to(device=x.device, dtype=x.dtype)


def _randn_like(x: torch.Tensor, generator: Generators | NoiseStream) -> torch.Tensor:
    """Standard normal noise shaped like x; with a list of generators, sample i draws from generator i.

    Per-sample generators make a sample a function of its own seed, whatever batch it is in.
    """
    if isinstance(generator, NoiseStream):
        return generator.next_like(x)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]} samples")
    return torch.stack([
        torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device) for g in generator
    ])


def _model_device(model) -> torch.device:
    """The device of a module, or of the module a bound method (like forward_with_cfg) belongs to."""
    module = getattr(model, "__self__", model)
    if isinstance(module, torch.nn.Module):
        return next(module.parameters()).device
    return torch.device("cpu")


#################################################################################
#                               Gaussian diffusion                              #
#################################################################################

class GaussianDiffusion:
    """Training losses and sampling for a diffusion with the given betas.

    Args:
        betas: (T,) float64 noise levels.
        model_mean_type, model_var_type, loss_type: see the enums above.
    """

    def __init__(self, *, betas: np.ndarray, model_mean_type: ModelMeanType, model_var_type: ModelVarType,
                 loss_type: LossType):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array of values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0), DDPM eq. 4
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0), DDPM eqs. 6-7
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: the log is clipped to its value at t = 1.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1 else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod))

    # ----------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log variance of q(x_t | x_0)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draws x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start shape {tuple(x_start.shape)}")
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = _extract(self.posterior_variance, t, x_t.shape)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ----------------------------------------------------------------- reverse process

    def p_mean_variance(self, model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                        denoised_fn: Callable | None = None, model_kwargs: dict | None = None) -> dict:
        """The model's p(x_{t-1} | x_t) and its prediction of x_0.

        Args:
            model: called as model(x, t, **model_kwargs), returning (N, C or 2C, ...).
            x: (N, C, ...) samples at timestep t.
            t: (N,) timestep indices.
            clip_denoised: clamp the predicted x_0 to [-1, 1].
            denoised_fn: applied to the predicted x_0 before clipping.
        Returns:
            dict with "mean", "variance", "log_variance", "pred_xstart" and "extra" (whatever
            the model returned beside its output, or None).
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        model_output = model(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape[:2] != (B, C * 2):
                raise ValueError(f"a learned-variance model must output {C * 2} channels, got "
                                 f"{model_output.shape[1]}")
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                # IDDPM eq. 15: v in [-1, 1] interpolates log beta-tilde_t (v=-1) and log beta_t (v=1).
                min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract(np.log(self.betas), t, x.shape)
                frac = (model_var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # beta_t, with the posterior variance at t = 0 for a better decoder log-likelihood.
                variance = np.append(self.posterior_variance[1], self.betas[1:])
                log_variance = np.log(variance)
            else:
                variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
            model_variance = _extract(variance, t, x.shape)
            model_log_variance = _extract(log_variance, t, x.shape)

        def process_xstart(x0: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)

        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart, "extra": extra}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        # Inverting DDPM eq. 4: x_0 = x_t / sqrt(abar) - sqrt(1 / abar - 1) eps
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        return (_extract(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
                - _extract(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape) * x_t)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    # ----------------------------------------------------------------- ancestral sampling

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                 generator: Generators = None, temperature: float = 1.0) -> dict:
        """One ancestral step: x_{t-1} = mean + sigma z (no noise at t = 0).

        `temperature` scales the noise term, sigma z -> temperature sigma z (MAR's sampling temperature).
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = _randn_like(x, generator)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise * temperature
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False, generator: Generators = None,
                      temperature: float = 1.0) -> torch.Tensor:
        """Samples from the model with the ancestral sampler of DDPM (all timesteps, last to first).

        Args:
            model: the denoiser, called as model(x, t, **model_kwargs).
            shape: (N, C, ...) of the samples.
            noise: the starting x_T; drawn (from `generator`) when None.
            generator: one torch.Generator, or one per sample (each sample then depends on its
                own generator alone), used for x_T and every step's noise.
            temperature: scales every step's noise (see `p_sample`).
        """
        final = None
        for out in self.p_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn, model_kwargs,
                                                  device, progress, generator, temperature=temperature):
            final = out
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  model_kwargs=None, device=None, progress=False,
                                  generator: Generators = None, temperature: float = 1.0) -> Iterator[dict]:
        """Yields the output of every ancestral step."""
        yield from self._loop(self.p_sample, shape, noise, device, progress, generator,
                              dict(model=model, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs, temperature=temperature))

    # ----------------------------------------------------------------- DDIM

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0,
                    generator: Generators = None) -> dict:
        """One DDIM step (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        # Re-derive eps from the (possibly clipped) x_0 so that the update is consistent with it.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        mean_pred = (out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
                     + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        sample = mean_pred
        if eta > 0:
            sample = sample + nonzero_mask * sigma * _randn_like(x, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                         device=None, progress=False, eta=0.0, generator: Generators = None) -> torch.Tensor:
        """Samples with DDIM; the arguments are those of `p_sample_loop`, plus `eta`."""
        final = None
        for out in self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn, model_kwargs,
                                                     device, progress, eta, generator):
            final = out
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     model_kwargs=None, device=None, progress=False, eta=0.0,
                                     generator: Generators = None) -> Iterator[dict]:
        yield from self._loop(self.ddim_sample, shape, noise, device, progress, generator,
                              dict(model=model, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs, eta=eta))

    def _loop(self, step, shape, noise, device, progress, generator, step_kwargs) -> Iterator[dict]:
        if device is None:
            device = noise.device if noise is not None else _model_device(step_kwargs["model"])
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} differs from the requested shape {tuple(shape)}")
            img = noise.to(device)
        else:
            img = _randn_like(torch.empty(shape, device=device), generator)
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices, desc="sampling", leave=False)
        for i in indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(x=img, t=t, generator=generator, **step_kwargs)
            yield out
            img = out["sample"]

    # ----------------------------------------------------------------- losses

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None) -> dict:
        """The VB term of timestep t in bits per dimension: KL(q || p), or the decoder NLL at t = 0."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
                        noise: torch.Tensor | None = None) -> dict:
        """Per-sample training losses at timesteps t.

        With the default MSE loss and learned variances this is IDDPM's hybrid loss: the MSE of the
        mean prediction plus the VB term, whose gradient reaches only the variance output.
        Returns:
            dict of (N,) tensors: "loss", and with an MSE loss "mse" and (learned variances) "vb".
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, t, **model_kwargs)
        terms.update(self.losses_from_output(model_output, x_start, x_t, t, noise))
        return terms

    def losses_from_output(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                           t: torch.Tensor, noise: torch.Tensor) -> dict:
        """The MSE-type losses of `training_losses` for a model output computed by the caller.

        Lets a caller that needs the raw prediction too (distillation) run the model once.
        """
        terms = {}
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            if model_output.shape[:2] != (B, C * 2):
                raise ValueError(f"a learned-variance model must output {C * 2} channels, got "
                                 f"{model_output.shape[1]}")
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # The VB term learns the variance only: the mean is detached for it.
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *args, r=frozen_out: r, x_start, x_t, t,
                                             clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Divided by 1000 for equivalence with the original implementation (IDDPM).
                terms["vb"] = terms["vb"] * self.num_timesteps / 1000.0

        target = {
            ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start, x_t, t)[0],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
        }[self.model_mean_type]()
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
