"""Diffusion Transformer (DiT), Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023).

The parameter names and shapes follow the official release exactly, so `DiT-XL-2-256x256.pt` and
every checkpoint trained from it load with `strict=True`. Attention runs through
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA).

Every model here exposes the same small protocol that the rest of the toolkit relies on:
- `model.blocks`: the ordered `nn.ModuleList` of transformer blocks (what depth pruning removes),
- `model.config`: the constructor's keyword arguments (what a checkpoint stores to rebuild it),
- `model.arch`: the architecture's name in `models.ARCHITECTURES`.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn as nn

from tinyfusion.errors import AmbiguousWeights, UserError

from .attention import ATTENTION_KINDS, Attention, attention_spec
from .stacks import checkpoint_block


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (N, T, D), shift and scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                 Embedding Layers for Timesteps and Class Labels               #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar (possibly fractional) timesteps: sinusoidal features, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal embedding of t (N,) into (N, dim): [cos(t w_i), sin(t w_i)], w_i = P^(-i/half)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, F)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; label dropout (to the extra "null" class) enables classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drop_ids(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random label-dropout decisions (N,) as 0/1 integers, at the configured probability."""
        u = torch.rand(labels.shape[0], device=labels.device, generator=generator)
        return (u < self.dropout_prob).long()

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Returns the embeddings (N, D)."""
        if force_drop_ids is None and train and self.dropout_prob > 0:
            force_drop_ids = self.drop_ids(labels)
        if force_drop_ids is not None:
            if self.embedding_table.num_embeddings == self.num_classes:
                raise UserError("label dropout needs a model built with class_dropout_prob > 0 "
                                 "(it has no null-class embedding)")
            labels = torch.where(force_drop_ids == 1, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Mlp(nn.Module):
    """Two-layer feed-forward network with tanh-approximated GELU (timm's parameter layout)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Image (N, C, H, W) to patch tokens (N, T, D) with one strided convolution."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise UserError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class DiTBlock(nn.Module):
    """A transformer block whose LayerNorms are modulated by the conditioning (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *, head_dim: int | None = None,
                 mlp_hidden: int | None = None, attention: dict | None = None, grid: tuple[int, int] | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, head_dim, kind=attention, grid=grid)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_hidden if mlp_hidden is not None else int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (N, T, D) tokens, c (N, D) conditioning; returns (N, T, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map of each token to its patch of outputs."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p * p * C_out)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone, class-conditional.

    The official constructor, plus two keyword arguments that make a config complete:
    `block_widths` (one {"num_heads", "head_dim", "mlp_hidden"} per block; uniform from hidden_size,
    num_heads and mlp_ratio when None, as every official model) and `attention` (the attention kind of
    every block, `models.attention`: {"kind": "global"}, the official models and the default, or CLEAR's
    {"kind": "local", "radius": r, "pool": f}). `config` always records both explicitly.
    """

    arch = "DiT"
    # The prunable block stacks: name -> (attribute, config key of its depth, config key of its widths).
    stacks = {"blocks": ("blocks", "depth", "block_widths")}
    # The inference path (models/inference.py): the blocks' attention and MLP linears run in the sampling precision;
    # the embedders, the adaLN modulation and the final layer stay float32.
    low_precision_modules = ("blocks.*.attn", "blocks.*.mlp")
    # What a teacher must share with its student for Masked KD (tinyfusion.kd.check_teacher_fits): the classes,
    # the width the feature loss compares, the patches and the output (with or without the learned variance).
    teacher_compatible_keys = ("num_classes", "hidden_size", "learn_sigma", "patch_size")
    # The attention kinds its blocks build (models/attention.py); no state dict shows the kind, so our files
    # record it in the config.
    ATTENTION_KINDS = ATTENTION_KINDS

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        block_widths: list[dict] | None = None,
        attention: dict | None = None,
    ):
        super().__init__()
        if depth < 1:
            raise UserError(f"depth must be at least 1, got {depth}")
        block_widths = uniform_block_widths(depth, hidden_size, num_heads, mlp_ratio) if block_widths is None \
            else [dict(w) for w in block_widths]
        if len(block_widths) != depth:
            raise UserError(f"block_widths lists {len(block_widths)} blocks but depth is {depth}")
        attention = attention_spec(attention)
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, block_widths=block_widths, attention=attention,
        )
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed 2D sin-cos position embedding; a persistent buffer keeps the official key `pos_embed`.
        self.register_buffer("pos_embed", torch.zeros(1, self.x_embedder.num_patches, hidden_size))
        grid = (input_size // patch_size, input_size // patch_size)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, w["num_heads"], head_dim=w["head_dim"], mlp_hidden=w["mlp_hidden"],
                     attention=attention, grid=grid)
            for w in block_widths])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------ the family's description

    @property
    def label_dropout(self) -> float:
        """Probability of replacing a training label by the null class (classifier-free guidance)."""
        return self.config["class_dropout_prob"]

    @property
    def data_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's inputs: latents, or pixels for a pixel-space model."""
        return (self.config["in_channels"], self.config["input_size"], self.config["input_size"])

    @classmethod
    def default_process(cls, config: dict) -> dict:
        """The noise process a model of this family trains with, when its file records none."""
        return {"name": "gaussian", "learn_sigma": bool(config["learn_sigma"])}

    @classmethod
    def config_from_state_dict(cls, state_dict: dict, num_heads: int | None = None) -> dict:
        """Constructor arguments read from the tensor shapes of an official-layout state dict.

        The head count leaves no trace in the shapes: it comes from `num_heads`, else from the
        registry's widths (official: 384: 6, 768: 12, 1024 and 1152: 16; small: 64: 4, 192: 3).
        Raises:
            UserError: a state dict that is not of this layout, or an unknown width and no head count.
            AmbiguousWeights: attention widths that differ per block (a width-pruned model's bare weights).
        """
        required = ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                    "final_layer.linear.weight", "blocks.0.attn.qkv.weight"]
        missing = [k for k in required if k not in state_dict]
        if missing:
            raise UserError(f"the weights are not a {cls.arch}'s: missing {missing}")
        proj = state_dict["x_embedder.proj.weight"]  # (D, C_in, p, p)
        hidden_size, in_channels, patch_size = proj.shape[0], proj.shape[1], proj.shape[2]
        grid = math.isqrt(state_dict["pos_embed"].shape[1])
        depth = len({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
        out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch_size * patch_size)
        if num_heads is None:
            num_heads = KNOWN_NUM_HEADS.get(hidden_size)
            if num_heads is None:
                raise UserError(f"a {cls.arch} of width {hidden_size} is not an official size, and the head count "
                                 "cannot be read from the weights: pass it with --num-heads")
        attn_widths = [state_dict[f"blocks.{i}.attn.qkv.weight"].shape[0] // 3 for i in range(depth)]
        if len(set(attn_widths)) > 1:
            raise AmbiguousWeights(
                f"these {cls.arch} weights have attention widths {attn_widths} per block: a bare state dict whose "
                "widths differ per block cannot describe its heads (a block's head count is not in its shapes); load "
                "the file that pruning wrote, which records every block's widths")
        widths = []
        for i, attn_width in enumerate(attn_widths):
            if attn_width % num_heads:
                raise UserError(f"block {i} has an attention width of {attn_width}, not divisible by {num_heads} "
                                 "heads: pass the right --num-heads")
            widths.append({"num_heads": num_heads, "head_dim": attn_width // num_heads,
                           "mlp_hidden": state_dict[f"blocks.{i}.mlp.fc1.weight"].shape[0]})
        return dict(
            input_size=grid * patch_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=widths[0]["mlp_hidden"] / hidden_size,
            class_dropout_prob=0.1, num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
            learn_sigma=out_channels == 2 * in_channels, block_widths=widths, attention={"kind": "global"},
        )

    def initialize_weights(self) -> None:
        """The official initialisation: Xavier linears, N(0, 0.02) embeddings, zeroed adaLN (adaLN-Zero)."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        grid_size = int(self.x_embedder.num_patches ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size)
        self.pos_embed.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Patch embedding initialised like a linear layer, not a convolution.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p * p * C) tokens to (N, C, H, W) images."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicts noise (and the variance interpolation with learn_sigma).

        Args:
            x: (N, C, H, W) noisy latents.
            t: (N,) diffusion timesteps.
            y: (N,) class labels; `num_classes` is the null class.
            force_drop_ids: (N,) 1 where the label is replaced by the null class. When None, labels
                are dropped at random with `class_dropout_prob` in training mode only.
        Returns:
            (N, C_out, H, W).
        """
        # The patch embedding's tokens come out transposed (stride 1 along the tokens); an element-wise op keeps that
        # layout, so without the copy every block's LayerNorm and matmuls would read strided memory (measured on an
        # AMX Xeon: the same values, bitwise, and 1.09x faster in bf16 with the copy).
        x = (self.x_embedder(x) + self.pos_embed).contiguous()  # (N, T, D)
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        c = t + y  # (N, D)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint_block(block, x, c)
            else:
                x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p * p * C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, guide_all_channels: bool = False
    ) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half carries the null label.

        Only the first half of `x` is used: both halves are run on it, and the guided prediction is
        returned for both. Guidance applies to the first 3 channels by default, as the official
        sampling code does for reproducibility of its FID numbers; `guide_all_channels=True` guides
        every noise channel (the learned-variance channels are never guided).
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self(combined, t, y)
        n_guided = self.in_channels if guide_all_channels else 3
        eps, rest = model_out[:, :n_guided], model_out[:, n_guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# MAE's 2D sin-cos embedding, computed in float64 as the official code does.

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size * grid_size, embed_dim): half the channels encode the row, half the column."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H * W, D / 2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H * W, D / 2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (H * W, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions to (M, embed_dim): [sin(p w_i), cos(p w_i)], w_i = 10000^(-2i / D)."""
    if embed_dim % 2:
        raise UserError(f"the sin-cos embedding needs an even width, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega  # (D / 2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D / 2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################
# Each entry is a factory taking the constructor's keyword arguments. The shallow DiT-D* models
# have DiT-XL's width and head count with fewer blocks: the shapes TinyFusion prunes XL into.
# Ti (DeiT-Tiny's widths) and Nano are not official: small models for small data and CPU runs.

def uniform_block_widths(depth: int, hidden_size: int, num_heads: int, mlp_ratio: float) -> list[dict]:
    """The per-block widths of an unpruned model: every block alike."""
    if hidden_size % num_heads:
        raise UserError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    width = {"num_heads": num_heads, "head_dim": hidden_size // num_heads, "mlp_hidden": int(hidden_size * mlp_ratio)}
    return [dict(width) for _ in range(depth)]


def size_factory(cls: type, depth: int, hidden_size: int, patch_size: int, num_heads: int):
    """A registry factory of `cls` at one size; `fixed` is what the name determines (checked on load)."""
    fixed = dict(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads)

    def make(**kwargs) -> nn.Module:
        return cls(**fixed, **kwargs)
    make.fixed = fixed
    make.arch = cls.arch
    return make


def size_registry(cls: type, prefix: str) -> dict:
    """The registry names of a DiT-shaped family: S/B/L/XL (and Nano/Ti) at patch 2/4/8, and the shallow D*."""
    models = {f"{prefix}-{size}/{patch}": size_factory(cls, depth, width, patch, heads)
              for size, (depth, width, heads) in _SIZES.items() for patch in (2, 4, 8)}
    models.update({f"{prefix}-D{depth}/2": size_factory(cls, depth, 1152, 2, 16) for depth in (19, 14, 7)})
    return models


_SIZES = {"Nano": (8, 64, 4), "Ti": (12, 192, 3), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
          "XL": (28, 1152, 16)}

# Head counts of the registry's widths: a plain state dict stores no head count, so loading one
# infers it from the width (DiT.config_from_state_dict).
KNOWN_NUM_HEADS = {width: heads for _, width, heads in _SIZES.values()}

DiT_models = size_registry(DiT, "DiT")
