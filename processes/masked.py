"""MAR's process: masked tokens, each modelled by a per-token Gaussian diffusion (Li et al. 2024).

A training example is an image's latent cut into L tokens (patches) with a random subset masked: a
random order per image, and the first ceil(L r) tokens of it masked, r from a Gaussian of mean 1
and std 0.25 truncated to [mask_ratio_min, 1] (one r per step, so every image of a step masks as many
tokens: the encoder needs equal counts). The model reads the visible tokens and the class and gives
a condition z per token; its diffusion MLP denoises `diffusion_batch_mul` noisy copies of every
token, each with its own timestep and noise, under the hybrid loss of the token process (a
`GaussianProcess` with the cosine schedule, 1000 steps, learned sigma). Only masked tokens count.

Draws of a batch of B images of L tokens (C channels each), R = diffusion_batch_mul * L rows per image:
- "orders" (B, L): a random permutation per image; "num_masked" (B,): the same count for all;
- "t" (B, R) timesteps and "noise" (B, R, C); row r of an image is a copy of its token r % L.

Distillation compares the diffusion MLP's predictions of student and teacher on the same masked
tokens, rows and noise (noise MSE, plus the KL of their learned-variance Gaussians), as the token
process compares DiT's. Sampling runs the model's own loop (`MAR.sample_tokens`): `num_iter`
iterations of the cosine masking schedule, each token drawn by the respaced ancestral sampler of
the token process (`num_steps` steps) with its noise scaled by `temperature`, guidance on the
linear schedule; image i's order and every noise come from generators[i].
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn

from models import unwrap
from models.mar import mask_by_order, patchify
from tinyfusion.errors import UserError

from .base import Cond, Draws, NoiseProcess, Prediction, SweepPoint, TimeDomain, register_process
from .gaussian import GaussianProcess

# scipy's truncnorm((min - 1) / std, 0, loc=1, scale=std) of the official code.
MASK_RATIO_STD = 0.25


def truncated_normal(u: torch.Tensor, low: float, high: float, mean: float, std: float) -> torch.Tensor:
    """Inverse-CDF draws of N(mean, std^2) truncated to [low, high] from uniforms u in [0, 1) (float64)."""
    a = torch.special.ndtr(torch.tensor((low - mean) / std, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((high - mean) / std, dtype=torch.float64))
    return (mean + std * torch.special.ndtri(a + u.double() * (b - a))).clamp(low, high)


class MaskedTokenProcess(NoiseProcess):
    """Masked tokens with a per-token diffusion; the model is called as `model(x, y, mask=..., noisy_tokens=...)`.

    Args:
        patch_size: latent pixels per token on a side (MAR's patch_size).
        mask_ratio_min: the lowest masking ratio of training.
        diffusion_batch_mul: noisy copies of every token in the loss.
        num_sampling_steps: the default steps of the token sampler (MAR's num_sampling_steps).
        noise_schedule, diffusion_steps: the token process (MAR: cosine, 1000).
    """

    name = "masked-tokens"
    samplers = ("mar",)
    default_steps = {"mar": 100}
    sampler_options = {"mar": {"num_iter": 64, "cfg_schedule": "linear", "temperature": 1.0}}
    drives_model = True

    def __init__(self, patch_size: int = 1, mask_ratio_min: float = 0.7, diffusion_batch_mul: int = 4,
                 num_sampling_steps: int = 100, noise_schedule: str = "cosine", diffusion_steps: int = 1000):
        if not 0.0 < mask_ratio_min <= 1.0:
            raise UserError(f"mask_ratio_min must be in (0, 1], got {mask_ratio_min}")
        if diffusion_batch_mul < 1 or patch_size < 1:
            raise UserError("diffusion_batch_mul and patch_size must be at least 1")
        self.settings = dict(patch_size=int(patch_size), mask_ratio_min=float(mask_ratio_min),
                             diffusion_batch_mul=int(diffusion_batch_mul), num_sampling_steps=int(num_sampling_steps),
                             noise_schedule=noise_schedule, diffusion_steps=int(diffusion_steps))
        self.tokens = GaussianProcess(noise_schedule=noise_schedule, diffusion_steps=diffusion_steps, learn_sigma=True)
        self.default_steps = {"mar": int(num_sampling_steps)}

    def record(self) -> dict:
        return {"name": self.name, **self.settings}

    def time_domain(self) -> TimeDomain:
        return self.tokens.time_domain()

    # ------------------------------------------------------------------ training

    def _token_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """(L, C) of latents of `shape` (c, h, w)."""
        c, h, w = shape
        p = self.settings["patch_size"]
        if h % p or w % p:
            raise UserError(f"latents of {h}x{w} do not split into patches of {p}")
        return (h // p) * (w // p), c * p * p

    def draw(self, generator: torch.Generator, batch_size: int, shape: Sequence[int], device: torch.device) -> Draws:
        seq_len, channels = self._token_shape(shape)
        rows = self.settings["diffusion_batch_mul"] * seq_len
        u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
        ratio = truncated_normal(u, self.settings["mask_ratio_min"], 1.0, 1.0, MASK_RATIO_STD)
        num_masked = min(seq_len, max(1, math.ceil(seq_len * float(ratio))))
        orders = torch.rand((batch_size, seq_len), generator=generator, device=device).argsort(dim=1)
        t = torch.randint(0, self.tokens.diffusion.num_timesteps, (batch_size, rows), generator=generator,
                          device=device)
        noise = torch.randn((batch_size, rows, channels), generator=generator, device=device)
        return {"orders": orders, "num_masked": torch.full((batch_size,), num_masked, device=device),
                "t": t, "noise": noise}

    def mask(self, draws: Draws) -> torch.Tensor:
        """(B, L) float, 1 at the masked tokens of the draws."""
        counts = draws["num_masked"]
        if len(counts) and bool((counts != counts[0]).any()):
            raise ValueError("every image of a batch must mask as many tokens (draw them together)")
        return mask_by_order(int(counts[0]) if len(counts) else 0, draws["orders"]).float()

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, R, C): the tokens of x, each repeated diffusion_batch_mul times (row r is token r % L)."""
        return patchify(x, self.settings["patch_size"]).repeat(1, self.settings["diffusion_batch_mul"], 1)

    def model_input(self, x: torch.Tensor, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t (B, R, C), t (B, R)): the noisy token copies."""
        rows = self._rows(x)
        bsz, count, channels = rows.shape
        x_t = self.tokens.diffusion.q_sample(rows.reshape(-1, channels), draws["t"].reshape(-1),
                                             noise=draws["noise"].reshape(-1, channels))
        return x_t.reshape(bsz, count, channels), draws["t"]

    def predict(self, model: nn.Module, x: torch.Tensor, draws: Draws, cond: Cond) -> Prediction:
        mask = self.mask(draws)
        x_t, t = self.model_input(x, draws)
        rest = {k: v for k, v in cond.items() if k != "y"}
        output = model(x, cond["y"], mask=mask, noisy_tokens=(x_t, t), **rest)  # (B, R, 2C)
        weight = mask.repeat(1, self.settings["diffusion_batch_mul"])  # (B, R)
        return Prediction(output=output, x_t=x_t, t=t, weight=weight)

    @staticmethod
    def _flat(prediction: Prediction) -> Prediction:
        """The prediction's rows as one batch of token rows, as the token process reads them."""
        out, x_t = prediction.output, prediction.x_t
        return Prediction(output=out.reshape(-1, out.shape[-1]), x_t=x_t.reshape(-1, x_t.shape[-1]),
                          t=prediction.t.reshape(-1))

    @staticmethod
    def _per_image(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(B R,) row values -> (B,) their mean over each image's masked rows."""
        rows = rows.reshape(weight.shape)
        return (rows * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)

    def losses(self, prediction: Prediction, x: torch.Tensor, draws: Draws) -> dict[str, torch.Tensor]:
        """Per-image hybrid loss (noise MSE + VB) over the masked tokens' rows. With as many masked tokens
        in every image, the batch mean is the official loss (the mean over all masked rows)."""
        flat = self._flat(prediction)
        target = self._rows(x).reshape(flat.x_t.shape)
        terms = self.tokens.losses(flat, target, {"t": flat.t, "noise": draws["noise"].reshape(flat.x_t.shape)})
        return {k: self._per_image(v, prediction.weight) for k, v in terms.items()}

    def distillation_loss(self, student: Prediction, teacher: Prediction) -> torch.Tensor:
        rows = self.tokens.distillation_loss(self._flat(student), self._flat(teacher))
        return self._per_image(rows, student.weight)

    # ------------------------------------------------------------------ sampling

    def check_sampler(self, sampler: str, num_steps: int) -> None:
        super().check_sampler(sampler, num_steps)
        self.tokens.check_sampler("ddpm", num_steps)

    def resolve_options(self, sampler: str, options: dict | None, data_shape: Sequence[int] | None = None) -> dict:
        """MAR's options; with the model's `data_shape`, the default of 64 iterations (the official one, for
        256 tokens) becomes the token count when the model has fewer, and more iterations than tokens are
        refused: every iteration reveals at least one token, so the schedule would run out of them."""
        given = (options or {}).get("num_iter")
        resolved = super().resolve_options(sampler, options, data_shape)
        if resolved["cfg_schedule"] not in ("linear", "constant"):
            raise UserError(f"--cfg-schedule {resolved['cfg_schedule']!r}: choose linear or constant")
        if int(resolved["num_iter"]) < 1:
            raise UserError(f"--num-iter must be at least 1, got {resolved['num_iter']}")
        if data_shape is not None:
            tokens = self._token_shape(data_shape)[0]
            if given is None:
                resolved["num_iter"] = min(int(resolved["num_iter"]), tokens)
            elif int(given) > tokens:
                raise UserError(f"--num-iter {given}: the model has {tokens} tokens and every iteration reveals at "
                                f"least one; give at most {tokens} (unset, it is min(64, tokens))")
        if float(resolved["temperature"]) <= 0:
            raise UserError(f"--temperature must be positive, got {resolved['temperature']}")
        return resolved

    def sample(self, denoise: Callable, noise: torch.Tensor, cond: Cond, *, sampler: str, num_steps: int,
               generators: Sequence[torch.Generator], progress: bool = False,
               options: dict | None = None) -> torch.Tensor:
        raise ValueError("masked-token sampling runs the model's own loop: use sample_model (the toolkit's "
                         "sampling does)")

    def sample_model(self, model: nn.Module, labels: torch.Tensor, generators: Sequence[torch.Generator], *,
                     sampler: str, num_steps: int, cfg_scale: float, progress: bool = False,
                     options: dict | None = None) -> torch.Tensor:
        """Latents (N, c, h, w) of `model` for the labels; image i depends on generators[i] alone."""
        self.check_sampler(sampler, num_steps)
        options = self.resolve_options(sampler, options, unwrap(model).data_shape)
        if hasattr(model, "gates"):
            raise UserError("a gated MAR is sampled after its decision is applied: prune it (prune_by_learning.py "
                             "writes the pruned model) and sample that")
        samples = unwrap(model).sample_tokens(
            len(labels), num_iter=int(options["num_iter"]), cfg=cfg_scale, cfg_schedule=options["cfg_schedule"],
            labels=labels, temperature=float(options["temperature"]), progress=progress, generators=generators,
            num_sampling_steps=num_steps)
        self.last_nfe = torch.full((len(labels),), int(options["num_iter"]), dtype=torch.long)
        return samples

    def evaluation_sweep(self, evaluations: Sequence[int], data_shape: Sequence[int]) -> list[SweepPoint]:
        """The masked iterations (one backbone pass each, then the token steps of the head on the tokens it
        reveals) at each count, a count above the model's tokens taken as one iteration per token; the head's
        steps stay the process's."""
        tokens = self._token_shape(data_shape)[0]
        counts = sorted({min(int(n), tokens) for n in evaluations})
        return [SweepPoint("mar", "mar", None, {"num_iter": n}, n) for n in counts]


register_process(MaskedTokenProcess.name, MaskedTokenProcess)
