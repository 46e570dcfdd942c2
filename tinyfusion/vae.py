"""The map between images and what the diffusion model sees: a VAE's latents, or raw pixels.

`--vae ema|mse` names the stabilityai sd-vae-ft autoencoders DiT was trained with (from the local
Hugging Face cache, or downloaded when online), a folder holds a diffusers AutoencoderKL saved
with `save_pretrained`, `kl16` (or a path to a `.ckpt`) is MAR's KL-16 autoencoder
(`tinyfusion.klvae`, 16 channels, stride 16, scale 0.2325), and `none` means a pixel-space model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from .errors import UserError

HUB_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
PIXEL_CHANNELS = (1, 3)  # a pixel-space model sees grayscale or RGB images


class LatentCodec(nn.Module):
    """Encodes images in [-1, 1] (N, 3, H, W) to model inputs, and decodes them back.

    Args:
        vae: a diffusers AutoencoderKL, a `tinyfusion.klvae.KLAutoencoder`, or None for pixel space.
        name: the spec it was loaded from (recorded in output files).
        scaling_factor: what latents are multiplied by; None: the VAE's own (diffusers' config).
    """

    def __init__(self, vae: nn.Module | None, name: str, scaling_factor: float | None = None):
        super().__init__()
        self.vae = vae
        self.name = name
        self._ldm = vae is not None and hasattr(vae, "encode_moments")  # the KL-16 of tinyfusion.klvae
        if vae is None:
            self.scaling_factor = 1.0
            self.downsample = 1
        elif self._ldm:
            self.scaling_factor = float(scaling_factor if scaling_factor is not None else 1.0)
            self.downsample = vae.downsample
        else:
            # 0.18215 for the SD VAEs: scales latents to unit variance (LDM, section 4.3.2).
            self.scaling_factor = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)
            self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    def latent_channels(self, image_channels: int = 3) -> int:
        if self.vae is None:
            return image_channels
        return int(self.vae.embed_dim) if self._ldm else int(self.vae.config.latent_channels)

    def latent_size(self, image_size: int) -> int:
        if image_size % self.downsample:
            raise UserError(f"image size {image_size} is not divisible by the VAE's downsampling factor "
                             f"{self.downsample}")
        return image_size // self.downsample

    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None
               ) -> torch.Tensor:
        """Latents of (N, 3, H, W) images in [-1, 1]: a posterior sample times the scaling factor.

        With a list of generators, image i's posterior sample comes from generator i alone.
        """
        if self.vae is None:
            return images
        if self._ldm:
            mean, std = self.vae.encode_moments(images.to(self._dtype()))
        else:
            dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
            mean, std = dist.mean, dist.std
        if generator is None or isinstance(generator, torch.Generator):
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        else:
            noise = torch.stack([torch.randn(mean.shape[1:], generator=g, device=g.device)
                                 for g in generator]).to(mean)
        return (mean + std * noise).float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W), nominally in [-1, 1] (not clamped)."""
        if self.vae is None:
            return latents
        if self._ldm:
            return self.vae.decode((latents / self.scaling_factor).to(self._dtype())).float()
        return self.vae.decode((latents / self.scaling_factor).to(self.vae.dtype)).sample.float()


def is_kl16_spec(spec: str) -> bool:
    """Whether --vae names MAR's KL-16 autoencoder: "kl16", or a path to its .ckpt / .pt / .pth file."""
    return spec == "kl16" or (Path(spec).suffix in (".ckpt", ".pt", ".pth") and not os.path.isdir(spec))


def load_codec(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LatentCodec:
    """Loads `--vae`: "ema", "mse", a hub id, a local diffusers folder, or "none" (pixel space).

    Raises:
        UserError: the VAE is not on disk and cannot be downloaded, naming what to do instead.
    """
    if spec == "none":
        return LatentCodec(None, "none")
    if is_kl16_spec(spec):
        from .klvae import KL16_DEFAULT_PATH, KL16_SCALING_FACTOR, load_kl_autoencoder

        vae = load_kl_autoencoder(KL16_DEFAULT_PATH if spec == "kl16" else spec).to(dtype)
        return LatentCodec(vae, spec, scaling_factor=KL16_SCALING_FACTOR).to(device)
    from diffusers.models import AutoencoderKL

    source = HUB_VAES.get(spec, spec)
    local = os.path.isdir(source)
    if not local and "/" not in source:
        raise UserError(f"--vae {spec!r} is neither 'ema', 'mse', 'kl16', 'none', a folder, a .ckpt nor a hub id")
    try:
        vae = AutoencoderKL.from_pretrained(source, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        where = (f"the folder {source!r}" if local
                 else f"{source!r} (not in the local Hugging Face cache, and the hub is unreachable)")
        raise UserError(
            f"cannot load the VAE from {where}: {str(e).splitlines()[0]}. On a machine that is online, run "
            f"`python -c \"from diffusers.models import AutoencoderKL; AutoencoderKL.from_pretrained('{source}')"
            ".save_pretrained('vae')\"` and pass --vae vae") from None
    vae.eval().requires_grad_(False)
    return LatentCodec(vae, spec).to(device)


#################################################################################
#                          The codec a checkpoint records                       #
#################################################################################

def codec_record(vae: str, scaling_factor: float) -> dict:
    """What a model file records of its codec: the --vae spec ("none": pixels) and its scaling factor."""
    return {"vae": vae, "scaling_factor": float(scaling_factor)}


def resolve_codec(flag: str | None, recorded: dict | None, in_channels: int) -> tuple[str, str]:
    """The --vae spec to sample a model with, and why: the flag, else the file's record, else DiT's default.

    A file that records no codec (official weights, older toolkit files) is read by its input channels:
    4 are SD-VAE latents ("ema", as DiT's sample.py), 16 KL-16 latents (MAR), 3 or 1 pixels (RGB or gray).
    Raises:
        UserError: no flag, no record, and an input width that names no codec.
    """
    if flag not in (None, "auto"):
        return flag, "--vae"
    if recorded is not None:
        return recorded["vae"], "recorded in the checkpoint"
    if in_channels in PIXEL_CHANNELS:
        return "none", f"{in_channels} input channel(s): pixels (the checkpoint records no codec)"
    if in_channels == 4:
        return "ema", "4 input channels: SD-VAE latents, as DiT (the checkpoint records no codec)"
    if in_channels == 16:
        return "kl16", "16 input channels: KL-16 latents, as MAR (the checkpoint records no codec)"
    raise UserError(f"the checkpoint records no codec and its {in_channels} input channels name none: pass --vae "
                     "(a VAE folder or hub id, or none for pixels)")
