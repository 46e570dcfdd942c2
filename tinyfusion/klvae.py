"""MAR's KL-16 autoencoder (the KL-regularised VAE of latent diffusion, LDM's "kl-f16" shape).

MAR generates 16-channel latents of stride 16 (256 px images -> 16x16x16), scaled by 0.2325 to about
unit variance; the released `kl16.ckpt` holds the weights under "model", in LDM's parameter names
(`encoder.down.0.block.0.conv1.weight`, `encoder.mid.attn_1.q.weight`, `quant_conv.weight`, ...),
which this module keeps so the file loads strict (its discriminator / loss tensors, if any, are
skipped). The sizes are read from the weights: base width `ch`, the width multipliers of the
levels, residual blocks per level, the latent channels, and which encoder levels attend.

Layout (LDM): the encoder runs conv_in, then per level `num_res_blocks` residual blocks (each
followed by self-attention on attending levels) and a stride-2 downsampling (all levels but the
last), a middle block (res, attention, res), GroupNorm + swish + conv_out to 2 x latent channels
(mean and log-variance, then the 1x1 quant_conv). The decoder mirrors it with `num_res_blocks + 1`
blocks per level, nearest-neighbour upsampling and attention in the middle only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

KL16_SCALING_FACTOR = 0.2325
# Where the official code keeps it (util/download.py): pretrained_models/vae/kl16.ckpt.
KL16_DEFAULT_PATH = Path("pretrained_models/vae/kl16.ckpt")
KL16_URL = "https://huggingface.co/jadechoghari/mar/resolve/main/kl16.ckpt"


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm, swish, 3x3 conv, twice, with a 1x1 `nin_shortcut` where the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels, with 1x1 convs as projections, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))  # (b,1,hw,c)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """A stride-2 3x3 conv after padding right and bottom by one (LDM's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), \
        ResnetBlock(channels, channels)
    return mid


def _run_middle(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_levels: set[int],
                 z_channels: int, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(width, ch * mult))
                width = ch * mult
                if level in attn_levels:
                    stage.attn.append(AttnBlock(width))
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(width)
            self.down.append(stage)
        self.mid = _middle(width)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return self.conv_out(F.silu(self.norm_out(_run_middle(self.mid, h))))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, out_channels: int = 3):
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _middle(width)
        levels = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()  # LDM's slot; the KL-16 decoder attends in the middle only
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(width, ch * ch_mult[level]))
                width = ch * ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(width)
            levels.insert(0, stage)
        self.up = nn.ModuleList(levels)  # up[0] is the finest level, run last
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_middle(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class KLAutoencoder(nn.Module):
    """LDM's KL autoencoder in its parameter layout.

    Args:
        embed_dim: latent channels (KL-16: 16).
        ch, ch_mult, num_res_blocks: base width, width multiplier per level, residual blocks per level.
        attn_levels: encoder levels with self-attention after each block (KL-16: the last).
    """

    def __init__(self, embed_dim: int = 16, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, attn_levels: tuple[int, ...] = (4,)):
        super().__init__()
        self.config = dict(embed_dim=embed_dim, ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                           attn_levels=tuple(attn_levels))
        self.encoder = Encoder(ch, tuple(ch_mult), num_res_blocks, set(attn_levels), embed_dim)
        self.decoder = Decoder(ch, tuple(ch_mult), num_res_blocks, embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        self.embed_dim = embed_dim
        self.downsample = 2 ** (len(ch_mult) - 1)

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the posterior of (N, 3, H, W) images in [-1, 1]; log-variance clamped to [-30, 20]."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images, nominally in [-1, 1], of unscaled latents z."""
        return self.decoder(self.post_quant_conv(z))

    @classmethod
    def config_from_state_dict(cls, state_dict: dict) -> dict:
        """The constructor arguments the weights' shapes imply (raises ValueError for another layout)."""
        if "encoder.conv_in.weight" not in state_dict or "quant_conv.weight" not in state_dict:
            raise UserError("not an LDM KL autoencoder (no encoder.conv_in / quant_conv weights)")
        ch = state_dict["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        mult = tuple(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
        blocks = len({k.split(".")[4] for k in state_dict if k.startswith("encoder.down.0.block.")})
        attn = tuple(i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state_dict)
        return dict(embed_dim=state_dict["post_quant_conv.weight"].shape[0], ch=ch, ch_mult=mult,
                    num_res_blocks=blocks, attn_levels=attn)


def load_kl_autoencoder(path: str | os.PathLike) -> KLAutoencoder:
    """The autoencoder of a `kl16.ckpt`-style file ({"model": state dict}, or a bare state dict), strict.

    Raises:
        UserError: the file is missing, unreadable or not such an autoencoder; says where to get it.
    """
    from .checkpoint import read_checkpoint

    path = Path(path)
    if not path.is_file():
        raise UserError(f"the KL-16 VAE {str(path)!r} does not exist: download MAR's kl16.ckpt ({KL16_URL}) to "
                         f"{KL16_DEFAULT_PATH} (where the official code keeps it), or pass --vae PATH/kl16.ckpt")
    obj = read_checkpoint(path)  # safe unpickling; a file that is no checkpoint is named as such
    state = obj.get("model", obj.get("state_dict", obj))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{str(path)!r} holds no state dict of tensors (expected {{'model': ...}} as kl16.ckpt)")
    # The training loss's tensors (discriminator, perceptual net) are not the autoencoder's.
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    try:
        model = KLAutoencoder(**KLAutoencoder.config_from_state_dict(state))
    except (ValueError, KeyError) as e:
        raise UserError(f"{str(path)!r} is not a KL autoencoder of LDM's layout: {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"the weights in {str(path)!r} do not fit the KL autoencoder: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return model.eval().requires_grad_(False)
