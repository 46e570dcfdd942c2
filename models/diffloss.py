"""Diffusion loss of MAR (Li et al. 2024, "Autoregressive Image Generation without Vector Quantization").

Each token is a continuous vector x (C channels). A small MLP with adaLN, conditioned on the
backbone's output z for that token, is trained as the denoiser of a per-token diffusion (paper
eq. 2), and tokens are sampled with the reverse process of that diffusion (eq. 6), whose noise is
scaled by a temperature (section 3.3). The process is the toolkit's ADM `diffusion` package, reused
unchanged, with the cosine schedule: 1000 steps for training, `num_sampling_steps` respaced steps
for sampling. Parameter names and shapes follow the official release, so its checkpoints load with
`strict=True`.

Randomness: `forward` takes the timesteps `t` and the noise; `sample` takes the starting noise and
one torch.Generator, or one generator per row of z (a row then depends on its own generator alone).
With none given, both draw from torch's global generator in the order of the official code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from diffusion import create_diffusion
from diffusion import gaussian_diffusion as gd

from .dit import TimestepEmbedder


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of token rows: x, shift and scale all (N, W)."""
    return x * (1 + scale) + shift


#################################################################################
#                            The denoising MLP (adaLN)                          #
#################################################################################

class ResBlock(nn.Module):
    """Residual MLP block whose LayerNorm is modulated by the conditioning y, with a gated output."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels, bias=True),
            nn.SiLU(),
            nn.Linear(channels, channels, bias=True),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels, bias=True))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)  # each (N, W)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))  # (N, W)


class FinalLayer(nn.Module):
    """DiT's final layer on token rows: modulated LayerNorm, then a linear map to the outputs."""

    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels, bias=True))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)  # each (N, W)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, C_out)


class SimpleMLPAdaLN(nn.Module):
    """The denoiser of the diffusion loss: eps and variance values of x_t given t and the condition z.

    Args:
        in_channels: C, the token's channels.
        model_channels: W, the MLP's width.
        out_channels: 2C (eps, then the variance interpolation values of learned-range sigma).
        z_channels: the width of the condition (the backbone's decoder width).
        num_res_blocks: depth of the MLP.
        grad_checkpointing: recompute each block in the backward pass to save memory.
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.grad_checkpointing = grad_checkpointing

        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: Xavier linears, N(0, 0.02) time MLP, zeroed adaLN and output."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.res_blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.constant_(layer.weight, 0)
            nn.init.constant_(layer.bias, 0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Denoiser output for token rows.

        Args:
            x: (N, C) noisy tokens x_t.
            t: (N,) timesteps of the 1000-step process.
            c: (N, z_channels) conditions from the backbone.
        Returns:
            (N, 2C): eps, then the variance values.
        """
        x = self.input_proj(x)  # (N, W)
        y = self.time_embed(t) + self.cond_embed(c)  # (N, W)
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)  # (N, 2C)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance on rows [cond; uncond] (N = 2M): both halves denoise the first half's x.

        The guided eps, uncond + cfg_scale * (cond - uncond), is returned for both halves; each half
        keeps its own variance values.
        """
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, c)  # (2M, 2C)
        eps, rest = model_out[:, :self.in_channels], model_out[:, self.in_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)  # each (M, C)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)  # (2M, 2C)


#################################################################################
#                                 Diffusion loss                                #
#################################################################################

class DiffLoss(nn.Module):
    """Per-token diffusion loss and sampler.

    Args:
        target_channels: C, the channels of a token.
        z_channels: the width of the condition z.
        depth: residual blocks of the MLP.
        width: width of the MLP.
        num_sampling_steps: timestep respacing of the sampler, e.g. "100" (see `create_diffusion`).
        grad_checkpointing: recompute the MLP's blocks in the backward pass.
    """

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int, num_sampling_steps: str,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(
            in_channels=target_channels,
            model_channels=width,
            out_channels=target_channels * 2,  # eps and the learned-range variance (IDDPM hybrid loss)
            z_channels=z_channels,
            num_res_blocks=depth,
            grad_checkpointing=grad_checkpointing,
        )
        self.train_diffusion = create_diffusion(timestep_respacing="", noise_schedule="cosine")
        self.gen_diffusion = create_diffusion(timestep_respacing=num_sampling_steps, noise_schedule="cosine")
        self._respaced = {str(num_sampling_steps): self.gen_diffusion}

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
                t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The diffusion loss (mse + vb per row), averaged over the rows where mask is 1.

        Args:
            target: (N, C) clean tokens.
            z: (N, z_channels) their conditions.
            mask: (N,) weights (1 for the tokens to learn); None averages over every row.
            t: (N,) timesteps; drawn uniformly from [0, 1000) when None.
            noise: (N, C) the noise of x_t; drawn when None.
        Returns:
            the scalar loss.
        """
        if t is None:
            t = torch.randint(0, self.train_diffusion.num_timesteps, (target.shape[0],), device=target.device)
        loss = self.train_diffusion.training_losses(self.net, target, t, dict(c=z), noise=noise)["loss"]  # (N,)
        if mask is not None:
            loss = (loss * mask).sum() / mask.sum()
        return loss.mean()

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float = 1.0, noise: torch.Tensor | None = None,
               generator: gd.Generators = None, num_steps: int | None = None) -> torch.Tensor:
        """Samples one token per row of z with the respaced ancestral sampler.

        Args:
            z: (N, z_channels) conditions; with cfg != 1, N = 2M rows [cond; uncond].
            temperature: scales the noise of every reverse step.
            cfg: classifier-free guidance scale; 1 samples every row on its own.
            noise: the starting x_T, (N, C), or with cfg != 1 (M, C), shared by a row and its uncond
                twin as in the official code. Drawn when None.
            generator: None (torch's global generator), one torch.Generator, or a sequence of N, one
                per row: row i then draws its start noise (with cfg, row i < M; row M + i shares it)
                and its step noises from generator i alone. Consecutive rows of one generator (an
                image's tokens) draw together: first the start noise of its rows, then all the step
                noises of its rows at once (num_steps, k, C), so a loop costs a few draws per image.
            num_steps: respaced steps of the sampler; None: `num_sampling_steps` (gen_diffusion).
        Returns:
            (N, C) sampled tokens; with cfg != 1 both halves are returned, the first is the guided sample.
        """
        n, channels = z.shape[0], self.in_channels
        if cfg != 1.0:
            if n % 2:
                raise ValueError(f"guided sampling needs rows [cond; uncond], got an odd count {n}")
            n //= 2
            model_fn, model_kwargs = self.net.forward_with_cfg, dict(c=z, cfg_scale=cfg)
        else:
            model_fn, model_kwargs = self.net.forward, dict(c=z)
        per_row = generator is not None and not isinstance(generator, torch.Generator)
        if per_row and len(generator) != z.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {z.shape[0]} rows; pass one per row")
        if noise is None:
            if per_row:
                noise = _grouped_randn(list(generator)[:n], (channels,), z.device, z.dtype)
            else:
                noise = gd._randn_like(torch.empty(n, channels, device=z.device, dtype=z.dtype), generator)
        if tuple(noise.shape) != (n, channels):
            raise ValueError(f"the starting noise must have shape {(n, channels)}, got {tuple(noise.shape)}")
        if cfg != 1.0:
            noise = torch.cat([noise, noise], dim=0)  # (2M, C)
        diffusion = self.gen_diffusion if num_steps is None else self._respaced_diffusion(num_steps)
        if per_row:  # every step's noise at once, per image: (steps, N, C), used in loop order
            steps = diffusion.num_timesteps
            draws = _grouped_randn(list(generator), (steps, channels), z.device, z.dtype).transpose(0, 1)
            generator = gd.NoiseStream(list(draws))
        return diffusion.p_sample_loop(model_fn, noise.shape, noise, clip_denoised=False,
                                       model_kwargs=model_kwargs, progress=False, generator=generator,
                                       temperature=temperature)  # (N, C)

    def _respaced_diffusion(self, num_steps: int):
        """The sampler's diffusion respaced to `num_steps` of the 1000 (built once per count)."""
        key = str(int(num_steps))
        if key not in self._respaced:
            self._respaced[key] = create_diffusion(timestep_respacing=key, noise_schedule="cosine")
        return self._respaced[key]


def _grouped_randn(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """(N, *shape) standard normal rows, row i from generators[i]; a run of consecutive rows sharing one
    generator is drawn in one call, (k, *shape)."""
    parts, start = [], 0
    while start < len(generators):
        end = start
        while end < len(generators) and generators[end] is generators[start]:
            end += 1
        g = generators[start]
        parts.append(torch.randn((end - start, *shape), generator=g, device=g.device, dtype=dtype).to(device))
        start = end
    return torch.cat(parts) if parts else torch.empty((0, *shape), device=device, dtype=dtype)
