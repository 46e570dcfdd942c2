"""Scalable Interpolant Transformer (SiT), Ma et al., "SiT: Exploring Flow and Diffusion-based Generative
Models with Scalable Interpolant Transformers" (2024).

SiT is DiT's network trained on a continuous-time interpolant (the `transport` package) instead of
DiT's discrete Gaussian diffusion. The network is unchanged: same constructor, same parameter names
and shapes (official SiT checkpoints load into this class, and a SiT-S/2 has exactly the state dict
of a DiT-S/2). Two things differ from DiT:
- t is a continuous time in [0, 1] (t = 1 is data), fed straight to the timestep embedder;
- with `learn_sigma` the network still has 2C output channels (for the official layout), but the
  forward returns only the first C: the transport has no variance to learn.

Example:
    model = SiT_models["SiT-XL/2"](input_size=32)
    velocity = model(x, t, y)  # x (N, 4, 32, 32), t (N,) in [0, 1], y (N,)
"""

from __future__ import annotations

import torch

from .dit import DiT, size_registry


class SiT(DiT):
    """DiT's class-conditional transformer as a velocity (or score, or noise) model of continuous time.

    The constructor is DiT's (official defaults: input_size=32, patch_size=2, in_channels=4,
    hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1,
    num_classes=1000, learn_sigma=True). `forward_with_cfg` is DiT's, which is the official SiT's:
    it guides the first 3 channels of the forward's output (`guide_all_channels=True`: all C).
    """

    arch = "SiT"

    @classmethod
    def default_process(cls, config: dict) -> dict:
        """The noise process a SiT trains with when its file records none: the official default,
        a linear interpolant with velocity prediction (`transport.create_transport()`)."""
        return {"name": "transport", "path_type": "Linear", "prediction": "velocity"}

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicts the velocity (or whatever the transport trains it to predict) at x_t.

        Args:
            x: (N, C, H, W) inputs x_t.
            t: (N,) continuous times in [0, 1]; t = 1 is data, t = 0 noise.
            y: (N,) class labels; `num_classes` is the null class.
            force_drop_ids: (N,) 1 where the label is replaced by the null class (see `DiT.forward`).
        Returns:
            (N, C, H, W): the first `in_channels` output channels (the learned-sigma half is dropped).
        """
        out = super().forward(x, t, y, force_drop_ids=force_drop_ids)  # (N, C_out, H, W)
        return out[:, : self.in_channels] if self.learn_sigma else out  # (N, C, H, W)


#################################################################################
#                                   SiT Configs                                 #
#################################################################################
# The official SiT-{S,B,L,XL}/{2,4,8} sizes are DiT's; the shallow SiT-D*/2 (XL's width) and the small
# Nano and Ti follow DiT's registry, so every DiT name has a SiT twin.

SiT_models = size_registry(SiT, "SiT")
