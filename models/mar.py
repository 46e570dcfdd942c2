"""MAR: masked autoregressive image generation with a diffusion loss (Li et al. 2024).

"Autoregressive Image Generation without Vector Quantization", arXiv:2406.11838. A bidirectional
MAE-style encoder-decoder (timm ViT blocks) reads the known tokens of a VAE latent and predicts a
condition z for every token; a per-token diffusion head (`models.diffloss.DiffLoss`) models
p(x | z). Training masks a random subset of tokens (ratio from a truncated Gaussian on
[mask_ratio_min, 1]); sampling unmasks tokens in a random order over `num_iter` iterations with a
cosine schedule (MaskGIT). Parameter names and shapes follow the official release, so its
checkpoints load with `strict=True`.

Randomness is injectable, so that reference draws can be fed in and every image is a function of
its own seed:
- `forward(imgs, labels, orders=None, mask=None, diffusion_t=None, diffusion_noise=None)`: each
  draw not given is made as in the official code (numpy shuffles for the orders, a scipy truncated
  normal for the masking ratio, torch's global generator for the timesteps and noise).
- `sample_tokens(..., orders=None, generators=None)`: `generators` holds one torch.Generator per
  image; image b's generation order and every diffusion noise of its tokens come from generators[b]
  alone, so an image does not depend on the batch it is sampled in. Without generators the orders
  come from numpy and the noises from torch's global generator, as in the official code. All the
  Gaussian draws of sampling go through `diffusion.gaussian_diffusion._randn_like`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from tinyfusion.errors import UserError

from .diffloss import DiffLoss
from .stacks import checkpoint_block

# The token sampler's steps of the official code (main_mar.py's --num_sampling_steps).
DEFAULT_SAMPLING_STEPS = 100


def mask_by_order(mask_len: int, orders: torch.Tensor) -> torch.Tensor:
    """(B, L) bool mask that is True at the first `mask_len` positions of each row's order."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :mask_len], True)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, c, h, w) latents -> (B, L, c p p) tokens, row-major over the (h / p, w / p) grid (MAR's layout)."""
    bsz, c, h, w = x.shape
    p = patch_size
    x = x.reshape(bsz, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwcpq", x)
    return x.reshape(bsz, (h // p) * (w // p), c * p ** 2)  # (B, L, C)


class MAR(nn.Module):
    """Masked autoregressive model over VAE latent tokens, with a per-token diffusion loss.

    The constructor takes the official arguments in the official order, except that the LayerNorm
    of the transformer blocks and of encoder_norm / decoder_norm is given by its epsilon `norm_eps`
    instead of a `norm_layer` callable, so that `config` is plain JSON. The official presets
    (mar_base / mar_large / mar_huge) pass LayerNorm with eps 1e-6, the default here (the official
    class's own default, nn.LayerNorm's 1e-5, is used by no released model).

    Args:
        img_size: image resolution in pixels.
        vae_stride: downsampling of the VAE; the latent is img_size / vae_stride on a side.
        patch_size: latent pixels per token on a side.
        encoder_embed_dim, encoder_depth, encoder_num_heads: the encoder's width, blocks and heads.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the decoder's.
        mlp_ratio: hidden width of the blocks' MLPs over their width.
        norm_eps: epsilon of the blocks' LayerNorms and of encoder_norm / decoder_norm.
        vae_embed_dim: channels of the VAE latent.
        mask_ratio_min: lowest masking ratio of training (truncated Gaussian on [min, 1], std 0.25).
        label_drop_prob: probability of replacing the class by the null class in training (for CFG).
        class_num: number of classes.
        attn_dropout, proj_dropout: dropouts of the blocks.
        buffer_size: class-embedding tokens prepended to the sequence.
        diffloss_d, diffloss_w: depth and width of the diffusion MLP.
        num_sampling_steps: respacing of the diffusion sampler of the model's own loop (`sample_tokens` without
            `num_sampling_steps`), e.g. "100". A setting of the process, not of the weights: `config` leaves it
            out, a toolkit file keeps it in its process record only, and `tinyfusion.checkpoint.load_model`
            builds the model with the record's value (see `process_arguments`).
        diffusion_batch_mul: times each token is repeated, with its own timestep and noise, in the loss.
        grad_checkpointing: recompute blocks in the backward pass to save memory; a runtime switch (the
            `gradient_checkpointing` property), not part of `config`.

    `config` holds what rebuilds the model (its JSON constructor arguments), without the runtime switch and
    the sampling default above; older files whose config carries them still load.
    """

    arch = "MAR"
    # The published training recipe's AdamW (main_mar.py): train.py and train_masked_kd.py default to it.
    optimizer_recipe = {"betas": (0.9, 0.95), "weight_decay": 0.02}
    # Two prunable stacks (models.stacks): the encoder's blocks, then the decoder's (flat index E + j).
    stacks = {"encoder": ("encoder_blocks", "encoder_depth", None),
              "decoder": ("decoder_blocks", "decoder_depth", None)}
    # The inference path (models/inference.py): the encoder's and decoder's attention and MLP linears, and the MLPs
    # of DiffLoss's residual blocks, run in the sampling precision; embeddings, adaLN and final layers stay float32.
    low_precision_modules = ("encoder_blocks.*.attn", "encoder_blocks.*.mlp", "decoder_blocks.*.attn",
                             "decoder_blocks.*.mlp", "diffloss.net.res_blocks.*.mlp")
    # Constructor arguments that are settings of the process (processes.masked), not of the weights: `config`
    # leaves them out, a checkpoint keeps them in its process record only, and load_model builds the model
    # with the record's values, so the model's own loop samples as the toolkit does.
    process_arguments = ("num_sampling_steps",)
    # Why torch.compile cannot trace it as one graph (models.compiling refuses --compile with this line).
    not_compilable = ("MAR keeps the visible tokens of a random masking order (shapes that depend on the data) and "
                      "samples in a Python loop over its iterations, so it does not compile as one graph: run it "
                      "without --compile (which is for DiT and SiT)")
    # What a teacher must share with its student for Masked KD (tinyfusion.kd.check_teacher_fits): the classes,
    # the widths the feature loss compares, the tokens and the diffusion head whose predictions are distilled.
    teacher_compatible_keys = ("class_num", "encoder_embed_dim", "decoder_embed_dim", "patch_size", "diffloss_d",
                               "diffloss_w")

    def __init__(
        self,
        img_size: int = 256,
        vae_stride: int = 16,
        patch_size: int = 1,
        encoder_embed_dim: int = 1024,
        encoder_depth: int = 16,
        encoder_num_heads: int = 16,
        decoder_embed_dim: int = 1024,
        decoder_depth: int = 16,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        vae_embed_dim: int = 16,
        mask_ratio_min: float = 0.7,
        label_drop_prob: float = 0.1,
        class_num: int = 1000,
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.1,
        buffer_size: int = 64,
        diffloss_d: int = 3,
        diffloss_w: int = 1024,
        num_sampling_steps: str = str(DEFAULT_SAMPLING_STEPS),
        diffusion_batch_mul: int = 4,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if img_size % (vae_stride * patch_size):
            raise UserError(f"img_size {img_size} must be a multiple of vae_stride * patch_size "
                             f"= {vae_stride * patch_size}")
        if not 0.0 < mask_ratio_min <= 1.0:
            raise UserError(f"mask_ratio_min must be in (0, 1], got {mask_ratio_min}")
        num_sampling_steps = str(num_sampling_steps)
        self.config = dict(
            img_size=img_size, vae_stride=vae_stride, patch_size=patch_size, encoder_embed_dim=encoder_embed_dim,
            encoder_depth=encoder_depth, encoder_num_heads=encoder_num_heads, decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
            vae_embed_dim=vae_embed_dim, mask_ratio_min=mask_ratio_min, label_drop_prob=label_drop_prob,
            class_num=class_num, attn_dropout=attn_dropout, proj_dropout=proj_dropout, buffer_size=buffer_size,
            diffloss_d=diffloss_d, diffloss_w=diffloss_w, diffusion_batch_mul=diffusion_batch_mul,
        )
        self.num_sampling_steps = num_sampling_steps  # the default of its own loop (not in config, see above)
        # timm's ViT block, as the official MAR; imported here, not at the top: timm takes seconds to import
        # and every script imports the registry.
        from timm.models.vision_transformer import Block

        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        # VAE latent and tokens
        self.vae_embed_dim = vae_embed_dim
        self.img_size = img_size
        self.vae_stride = vae_stride
        self.patch_size = patch_size
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size ** 2
        self.grad_checkpointing = grad_checkpointing

        # Class embedding; fake_latent is the null class of classifier-free guidance.
        self.num_classes = class_num
        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.label_drop_prob = label_drop_prob
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))

        # Masking ratio of training: a left-truncated Gaussian centred at 1 with std 0.25 (paper section 3.4).
        self.mask_ratio_min = mask_ratio_min
        self._mask_ratio_generator = None  # scipy's truncnorm, built on first use (`mask_ratio_generator`)

        # Encoder
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim, bias=True)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.buffer_size = buffer_size
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList([
            Block(encoder_embed_dim, encoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                  proj_drop=proj_dropout, attn_drop=attn_dropout) for _ in range(encoder_depth)])
        self.encoder_norm = norm_layer(encoder_embed_dim)

        # Decoder
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                  proj_drop=proj_dropout, attn_drop=attn_dropout) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))

        self.initialize_weights()

        # Diffusion loss (initialised by its own rules)
        self.diffloss = DiffLoss(
            target_channels=self.token_embed_dim,
            z_channels=decoder_embed_dim,
            width=diffloss_w,
            depth=diffloss_d,
            num_sampling_steps=num_sampling_steps,
            grad_checkpointing=grad_checkpointing,
        )
        self.diffusion_batch_mul = diffusion_batch_mul

    def initialize_weights(self) -> None:
        """The official initialisation: N(0, 0.02) embeddings and tokens, Xavier linears, unit LayerNorms."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)

        def _init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # as the official JAX ViT
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.LayerNorm):
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
                if m.weight is not None:
                    nn.init.constant_(m.weight, 1.0)
        self.apply(_init)

    # ----------------------------------------------------------------- the toolkit's model protocol

    @property
    def label_dropout(self) -> float:
        """Probability of the null class (fake_latent) in training, for classifier-free guidance."""
        return self.label_drop_prob

    @property
    def data_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the latents this model generates."""
        side = self.img_size // self.vae_stride
        return (self.vae_embed_dim, side, side)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.grad_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.grad_checkpointing = bool(value)
        self.diffloss.net.grad_checkpointing = bool(value)

    @classmethod
    def default_process(cls, config: dict) -> dict:
        """MAR's process: masked tokens with a per-token Gaussian diffusion (processes.masked)."""
        return {"name": "masked-tokens", "patch_size": config["patch_size"],
                "mask_ratio_min": config["mask_ratio_min"], "diffusion_batch_mul": config["diffusion_batch_mul"],
                # the official default; a config of an older file may still carry its own
                "num_sampling_steps": int(config.get("num_sampling_steps", DEFAULT_SAMPLING_STEPS))}

    @classmethod
    def default_cfg_scale(cls, config: dict) -> float:
        """The published guidance scale of the size of this width (B 2.9, L 3.0, H 3.2; others MAR-L's)."""
        return MAR_CFG_SCALES.get(OFFICIAL_WIDTHS.get(config["encoder_embed_dim"]), MAR_CFG_SCALES["MAR-L"])

    @classmethod
    def config_from_state_dict(cls, state_dict: dict, num_heads: int | None = None) -> dict:
        """Constructor arguments of a bare state dict in the official layout (`checkpoint-last.pth`).

        A state dict does not store the image size, VAE stride, buffer size or head count: the official
        values are taken (KL-16 latents of stride 16, a buffer of 64, the heads of the official widths),
        and the image size follows from the position embeddings.

        Raises:
            UserError: the keys are not MAR's (naming what they look like), or a width without a known
                head count and no `num_heads`.
        """
        needed = ("z_proj.weight", "encoder_pos_embed_learned", "decoder_embed.weight", "fake_latent",
                  "class_emb.weight", "diffloss.net.input_proj.weight")
        missing = [k for k in needed if k not in state_dict]
        if missing:
            looks = " (its keys are a DiT's or SiT's: x_embedder, blocks.N)" if "x_embedder.proj.weight" in \
                state_dict else ""
            raise UserError(f"not a MAR state dict{looks}: it lacks {', '.join(missing[:3])}")

        def depth(prefix: str) -> int:
            return len({k.split(".")[1] for k in state_dict if k.startswith(prefix + ".")})

        width, token_dim = state_dict["z_proj.weight"].shape
        decoder_width = state_dict["decoder_embed.weight"].shape[0]
        vae_embed_dim, vae_stride, buffer_size = 16, 16, 64
        patch_size = int(round(math.sqrt(token_dim / vae_embed_dim)))
        if vae_embed_dim * patch_size ** 2 != token_dim:
            raise UserError(f"the tokens have {token_dim} channels, which is no patch of 16-channel KL-16 latents; "
                             "load a self-describing file of this model instead")
        seq_len = state_dict["encoder_pos_embed_learned"].shape[1] - buffer_size
        side = int(round(math.sqrt(max(seq_len, 0))))
        if seq_len < 1 or side * side != seq_len:
            raise UserError(f"the position embeddings hold {seq_len + buffer_size} positions, which is no square "
                             f"token grid after the official buffer of {buffer_size}; load a self-describing file")
        heads = {}
        for name, w in (("encoder", width), ("decoder", decoder_width)):
            heads[name] = num_heads or MAR_NUM_HEADS.get(w)
            if heads[name] is None:
                raise UserError(f"the {name} width {w} is not an official MAR width: give its head count "
                                 "(--num-heads)")
        return dict(
            img_size=side * patch_size * vae_stride, vae_stride=vae_stride, patch_size=patch_size,
            encoder_embed_dim=width, encoder_depth=depth("encoder_blocks"), encoder_num_heads=heads["encoder"],
            decoder_embed_dim=decoder_width, decoder_depth=depth("decoder_blocks"),
            decoder_num_heads=heads["decoder"],
            mlp_ratio=state_dict["encoder_blocks.0.mlp.fc1.weight"].shape[0] / width, norm_eps=1e-6,
            vae_embed_dim=vae_embed_dim, class_num=state_dict["class_emb.weight"].shape[0],
            buffer_size=buffer_size, diffloss_d=depth("diffloss.net.res_blocks"),
            diffloss_w=state_dict["diffloss.net.input_proj.weight"].shape[0],
        )

    @property
    def mask_ratio_generator(self):
        """The official masking-ratio distribution: scipy's truncnorm((min - 1) / 0.25, 0, loc=1, scale=0.25)."""
        if self._mask_ratio_generator is None:
            import scipy.stats

            self._mask_ratio_generator = scipy.stats.truncnorm((self.mask_ratio_min - 1.0) / 0.25, 0, loc=1.0,
                                                               scale=0.25)
        return self._mask_ratio_generator

    # ----------------------------------------------------------------- tokens

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c, h, w) latents -> (B, L, c p p) tokens, row-major over the (h / p, w / p) grid."""
        return patchify(x, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C) tokens -> (B, c, h, w) latents; the inverse of `patchify`."""
        bsz, p, c = x.shape[0], self.patch_size, self.vae_embed_dim
        x = x.reshape(bsz, self.seq_h, self.seq_w, c, p, p)
        x = torch.einsum("nhwcpq->nchpwq", x)
        return x.reshape(bsz, c, self.seq_h * p, self.seq_w * p)  # (B, c, h, w)

    # ----------------------------------------------------------------- randomness

    def sample_orders(self, bsz: int, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """(B, L) int64: a random permutation of the token positions per image.

        Without generators, numpy's global generator shuffles each row (the official draws); with
        one generator per image, row b is `torch.randperm` of generators[b].
        """
        device = self.fake_latent.device
        if generators is None:
            orders = []
            for _ in range(bsz):
                order = np.arange(self.seq_len)
                np.random.shuffle(order)
                orders.append(order)
            return torch.from_numpy(np.array(orders)).long().to(device)
        _check_generators(generators, bsz)
        return torch.stack([torch.randperm(self.seq_len, generator=g, device=g.device) for g in generators]).to(device)

    def random_masking(self, x: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        """(B, L) float mask, 1 at the first ceil(L r) positions of each order, r ~ the masking ratio."""
        bsz, seq_len, _ = x.shape
        mask_rate = self.mask_ratio_generator.rvs(1)[0]
        num_masked_tokens = int(np.ceil(seq_len * mask_rate))
        return mask_by_order(num_masked_tokens, orders).to(x.dtype)

    # ----------------------------------------------------------------- encoder and decoder

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint_block(block, x)
            else:
                x = block(x)
        return x

    def forward_mae_encoder(self, x: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor,
                            drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Encodes the visible tokens.

        Args:
            x: (B, L, C) tokens.
            mask: (B, L), 1 at masked tokens; every row must mask the same number of tokens.
            class_embedding: (B, D_enc), written into every buffer slot.
            drop_ids: (B,) 1 where the class is replaced by fake_latent (the null class). None: in
                training mode each image drops its class with probability label_drop_prob (torch's
                global generator, as the official code); in eval mode none does.
        Returns:
            (B, buffer_size + L - #masked, D_enc): the buffer and the visible tokens, in position order.
        """
        x = self.z_proj(x)  # (B, L, D)
        bsz, _, embed_dim = x.shape
        visible = _visible_with_buffer(mask, self.buffer_size)  # (B, S)

        if drop_ids is None and self.training:  # label drop for classifier-free guidance
            drop_ids = torch.rand(bsz) < self.label_drop_prob
        if drop_ids is not None:
            drop = drop_ids.reshape(bsz, 1).to(device=x.device, dtype=x.dtype)
            class_embedding = drop * self.fake_latent + (1 - drop) * class_embedding
        buffer = class_embedding.unsqueeze(1).expand(bsz, self.buffer_size, embed_dim).to(x.dtype)
        x = torch.cat([buffer, x], dim=1)  # (B, S, D), S = buffer_size + L
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)

        x = x[visible].reshape(bsz, -1, embed_dim)  # (B, S_vis, D)
        x = self._run_blocks(self.encoder_blocks, x)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decodes the encoder's output into a condition z per token.

        Args:
            x: (B, S_vis, D_enc) output of `forward_mae_encoder` for the same mask.
            mask: (B, L), 1 at masked tokens.
        Returns:
            (B, L, D_dec) z.
        """
        x = self.decoder_embed(x)  # (B, S_vis, D)
        bsz, _, embed_dim = x.shape
        visible = _visible_with_buffer(mask, self.buffer_size)  # (B, S)
        canvas = self.mask_token.to(x.dtype).expand(bsz, visible.shape[1], embed_dim).clone()  # (B, S, D)
        canvas[visible] = x.reshape(-1, embed_dim)
        x = self._run_blocks(self.decoder_blocks, canvas + self.decoder_pos_embed_learned)
        x = self.decoder_norm(x)
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned  # (B, L, D)

    # ----------------------------------------------------------------- training

    def forward_loss(self, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Diffusion loss on the masked tokens, each repeated diffusion_batch_mul times.

        Args:
            z: (B, L, D_dec) conditions; target: (B, L, C) clean tokens; mask: (B, L).
            t, noise: (M,) timesteps and (M, C) noise of the M = diffusion_batch_mul * B * L rows
                (rows are the (b, l) tokens, repeated as a whole); drawn when None.
        """
        bsz, seq_len, _ = target.shape
        target = target.reshape(bsz * seq_len, -1).repeat(self.diffusion_batch_mul, 1)  # (M, C)
        z = z.reshape(bsz * seq_len, -1).repeat(self.diffusion_batch_mul, 1)  # (M, D_dec)
        mask = mask.reshape(bsz * seq_len).repeat(self.diffusion_batch_mul)  # (M,)
        return self.diffloss(target=target, z=z, mask=mask, t=t, noise=noise)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, diffusion_t: torch.Tensor | None = None,
                diffusion_noise: torch.Tensor | None = None, *, force_drop_ids: torch.Tensor | None = None,
                noisy_tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The training loss of a batch (official), or the diffusion MLP's predictions (`noisy_tokens`).

        Args:
            imgs: (B, c, h, w) VAE latents.
            labels: (B,) class labels.
            orders: (B, L) token orders; drawn when None (unused when mask is given).
            mask: (B, L), 1 at the masked tokens; drawn with `random_masking` when None.
            diffusion_t, diffusion_noise: the diffusion loss's draws (see `forward_loss`).
            force_drop_ids: (B,) 1 where the class is replaced by the null class (see `forward_mae_encoder`).
            noisy_tokens: (x_t, t), x_t (B, R, C) noisy copies of tokens and t (B, R) their timesteps, row r
                of an image being a copy of its token r % L (R a multiple of L). Needs `mask`. This is how
                the toolkit's masked-token process (processes.masked) calls the model: through its
                forward, so that DDP and layer gates see the call.
        Returns:
            the scalar loss; with noisy_tokens the MLP's output (B, R, 2C): eps, then the variance values.
        """
        class_embedding = self.class_emb(labels)  # (B, D_enc)
        x = self.patchify(imgs)  # (B, L, C)
        gt_latents = x.clone().detach()
        if mask is None:
            if noisy_tokens is not None:
                raise ValueError("noisy_tokens needs the mask of the tokens they copy")
            if orders is None:
                orders = self.sample_orders(bsz=x.shape[0])
            mask = self.random_masking(x, orders)
        x = self.forward_mae_encoder(x, mask, class_embedding, drop_ids=force_drop_ids)
        z = self.forward_mae_decoder(x, mask)  # (B, L, D_dec)
        if noisy_tokens is not None:
            x_t, t = noisy_tokens
            bsz, rows, channels = x_t.shape
            if rows % self.seq_len:
                raise ValueError(f"noisy_tokens hold {rows} rows per image, not a multiple of the {self.seq_len} "
                                 "tokens")
            z = z.repeat(1, rows // self.seq_len, 1)  # (B, R, D_dec): row r is token r % L
            out = self.diffloss.net(x_t.reshape(bsz * rows, channels), t.reshape(-1), z.reshape(bsz * rows, -1))
            return out.reshape(bsz, rows, -1)  # (B, R, 2C)
        return self.forward_loss(z=z, target=gt_latents, mask=mask, t=diffusion_t, noise=diffusion_noise)

    # ----------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample_tokens(self, bsz: int, num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                      labels: torch.Tensor | None = None, temperature: float = 1.0, progress: bool = False,
                      orders: torch.Tensor | None = None,
                      generators: Sequence[torch.Generator] | None = None,
                      num_sampling_steps: int | None = None) -> torch.Tensor:
        """Generates latents by unmasking tokens in a random order (paper section 3.3, MaskGIT schedule).

        At iteration k the tokens still masked are encoded and decoded, and those that leave the
        mask, floor(L cos(pi / 2 (k + 1) / num_iter)) tokens staying masked (at least 1 and fewer
        than now), are sampled from the diffusion head; the last iteration samples every token left.

        Args:
            bsz: number of images B.
            num_iter: autoregressive iterations.
            cfg: classifier-free guidance scale (1 disables guidance).
            cfg_schedule: "linear" (Muse: 1 + (cfg - 1) (L - mask_len) / L) or "constant".
            labels: (B,) classes; None samples unconditionally (the null class).
            temperature: scales the diffusion sampler's noise.
            progress: show a progress bar.
            orders: (B, L) generation orders; drawn when None.
            generators: one torch.Generator per image, the source of its order and of all its
                noises; None uses the global generators as the official code does.
            num_sampling_steps: steps of the token sampler; None: the model's num_sampling_steps.
        Returns:
            (B, c, h, w) latents.
        """
        if cfg_schedule not in ("linear", "constant"):
            raise UserError(f"unknown cfg_schedule {cfg_schedule!r}; choose 'linear' or 'constant'")
        if num_iter < 1:
            raise UserError(f"num_iter must be at least 1, got {num_iter}")
        device = self.fake_latent.device
        if generators is not None:
            _check_generators(generators, bsz)
        if orders is None:
            orders = self.sample_orders(bsz, generators)
        elif tuple(orders.shape) != (bsz, self.seq_len):
            raise ValueError(f"orders must have shape {(bsz, self.seq_len)}, got {tuple(orders.shape)}")
        orders = orders.to(device)
        if labels is not None and tuple(labels.shape) != (bsz,):
            raise ValueError(f"labels must have shape ({bsz},), got {tuple(labels.shape)}")
        guided = cfg != 1.0

        mask = torch.ones(bsz, self.seq_len, device=device)  # (B, L), 1 = still to generate
        tokens = torch.zeros(bsz, self.seq_len, self.token_embed_dim, device=device)  # (B, L, C)
        class_embedding = self.class_emb(labels) if labels is not None else self.fake_latent.repeat(bsz, 1)
        if guided:
            class_embedding = torch.cat([class_embedding, self.fake_latent.repeat(bsz, 1)], dim=0)  # (2B, D)

        steps = range(num_iter)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="MAR", leave=False)
        for step in steps:
            tokens_in, mask_in = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
            z = self.forward_mae_decoder(self.forward_mae_encoder(tokens_in, mask_in, class_embedding), mask_in)

            # Tokens that stay masked after this iteration (MaskGIT's cosine schedule, as in the official code).
            num_masked = int(mask[0].sum().item())
            mask_len = int(np.floor(self.seq_len * np.cos(math.pi / 2.0 * (step + 1) / num_iter)))
            mask_len = max(1, min(num_masked - 1, mask_len))
            mask_next = mask_by_order(mask_len, orders)  # (B, L) bool
            if step >= num_iter - 1:
                mask_to_pred = mask.bool()
            else:
                mask_to_pred = torch.logical_xor(mask.bool(), mask_next)
            mask = mask_next.float()

            rows = mask_to_pred.nonzero(as_tuple=True)  # (b, l) of the tokens to sample, row-major
            z = z[torch.cat([mask_to_pred, mask_to_pred]) if guided else mask_to_pred]  # (n or 2n, D_dec)
            cfg_iter = self._cfg_at(cfg, cfg_schedule, mask_len)
            row_generators = None
            if generators is not None:
                row_generators = [generators[b] for b in rows[0].tolist()]
                row_generators = row_generators * 2 if guided else row_generators
            sampled = self.diffloss.sample(z, temperature, cfg_iter, generator=row_generators,
                                           num_steps=num_sampling_steps)
            if guided:
                sampled = sampled[: len(sampled) // 2]  # drop the null-class samples
            tokens = tokens.clone()
            tokens[rows] = sampled.to(tokens.dtype)
        return self.unpatchify(tokens)

    def _cfg_at(self, cfg: float, cfg_schedule: str, mask_len: int) -> float:
        """The guidance scale of an iteration; float32 arithmetic as the official tensors."""
        if cfg_schedule == "constant":
            return cfg
        remaining = self.seq_len - torch.tensor([float(mask_len)], dtype=torch.float32)
        return (1 + (cfg - 1) * remaining / self.seq_len).item()


def _visible_with_buffer(mask: torch.Tensor, buffer_size: int) -> torch.Tensor:
    """(B, buffer_size + L) bool, True at the buffer and the visible tokens; checks equal counts per row."""
    visible = torch.cat([torch.ones(mask.shape[0], buffer_size, dtype=torch.bool, device=mask.device),
                         mask == 0], dim=1)
    counts = visible.sum(dim=1)
    if (counts != counts[0]).any():
        raise ValueError("every row of the mask must mask the same number of tokens")
    return visible


def _check_generators(generators: Sequence[torch.Generator], bsz: int) -> None:
    if len(generators) != bsz:
        raise ValueError(f"got {len(generators)} generators for {bsz} images; pass one per image")


#################################################################################
#                                   MAR Configs                                 #
#################################################################################

# Head counts of the official widths: a bare state dict stores none (`MAR.config_from_state_dict`).
MAR_NUM_HEADS = {768: 12, 1024: 16, 1280: 16}


def _factory(width: int, depth: int, num_heads: int, diffloss_d: int, diffloss_w: int, buffer_size: int = 64,
             **defaults) -> Callable[..., MAR]:
    """A registry factory of one MAR size. Besides MAR's own arguments it takes the toolkit's generic
    names (what training from scratch passes every family): input_size (the latent side), in_channels
    (the latent channels) and num_classes."""
    fixed = dict(
        encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=num_heads,
        decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=num_heads,
        mlp_ratio=4.0, norm_eps=1e-6, buffer_size=buffer_size, diffloss_d=diffloss_d, diffloss_w=diffloss_w,
    )

    def make(**kwargs) -> MAR:
        clash = sorted(set(kwargs) & set(fixed))
        if clash:
            raise UserError(f"the model name fixes {', '.join(clash)}; build MAR(...) directly to change them")
        kwargs = {**defaults, **kwargs}
        if "input_size" in kwargs:
            kwargs["img_size"] = kwargs.pop("input_size") * kwargs.get("vae_stride", 16)
        if "in_channels" in kwargs:
            kwargs["vae_embed_dim"] = kwargs.pop("in_channels")
        if "num_classes" in kwargs:
            kwargs["class_num"] = kwargs.pop("num_classes")
        return MAR(**fixed, **kwargs)
    make.fixed = fixed  # what the name determines; checkpoints are checked against it
    make.arch = MAR.arch
    return make


# The official presets (mar_base / mar_large / mar_huge) with the DiffLoss MLP of the released checkpoints
# (official README: 6 x 1024, 8 x 1280, 12 x 1536), buffer 64 and LayerNorm eps 1e-6. MAR-Nano is not
# official: a small pixel-space MAR (patches of 2x2 pixels) for small data and CPU runs, its diffusion MLP
# about a third of a training forward's cost, as MAR-L's.
MAR_models = {
    "MAR-B": _factory(768, 12, 12, diffloss_d=6, diffloss_w=1024),
    "MAR-L": _factory(1024, 16, 16, diffloss_d=8, diffloss_w=1280),
    "MAR-H": _factory(1280, 20, 16, diffloss_d=12, diffloss_w=1536),
    "MAR-Nano": _factory(64, 4, 4, diffloss_d=2, diffloss_w=64, vae_stride=1, patch_size=2, buffer_size=4,
                         attn_dropout=0.0, proj_dropout=0.0),
}
# The official training arguments name the sizes so (`--model mar_large`); a checkpoint's args say which.
OFFICIAL_NAMES = {"mar_base": "MAR-B", "mar_large": "MAR-L", "mar_huge": "MAR-H"}

# Guidance scales of the official evaluations (README: linear schedule, temperature 1.0, 256 iterations).
MAR_CFG_SCALES = {"MAR-B": 2.9, "MAR-L": 3.0, "MAR-H": 3.2}
OFFICIAL_WIDTHS = {768: "MAR-B", 1024: "MAR-L", 1280: "MAR-H"}
