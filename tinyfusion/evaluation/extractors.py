"""The one interface every feature extractor implements, and the batched loop that runs it.

A feature extractor is a module with
- `name`: the feature space, which labels the results ("inception-v3", "digits-classifier");
- `adm_statistics`: whether the precomputed statistics of ADM's reference batches (Inception
  features) describe its features;
- `features(images)`: uint8 images (N, C, H, W) -> {"pool": (N, D), "logits": (N, K), "spatial": (N, S)}:
  pooled features (FID, precision/recall), class logits (Inception Score) and flattened spatial
  features (sFID).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

import numpy as np
import torch
from tqdm import tqdm

from ..errors import UserError
from .images import ImageSet

FEATURE_KINDS = ("pool", "logits", "spatial")


class FeatureExtractor(Protocol):
    name: str
    adm_statistics: bool

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def to(self, device: torch.device) -> FeatureExtractor: ...


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 images (N, C, H, W) with `channels` channels: grayscale repeated to RGB, or RGB to
    grayscale with the ITU-R 601-2 luma weights (what PIL's convert("L") uses).

    Args:
        images: (N, C, H, W) uint8, C = 1 or 3.
        channels: 1 or 3.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise UserError(f"feature extractors take uint8 images (N, C, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        weights = torch.tensor([299, 587, 114], dtype=torch.float32, device=images.device) / 1000
        luma = (images.float() * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)  # (N, 1, H, W)
        return luma.round().clamp(0, 255).to(torch.uint8)
    raise UserError(f"images have {have} channels, but the feature extractor takes {channels}")


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Turns off TF32 in matmuls and convolutions for the block: cuDNN allows it by default on
    Ampere+ GPUs, and its 10-bit mantissa would move the features away from the reference ones."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.inference_mode()
def embed_images(images: ImageSet, extractor: FeatureExtractor, *, batch_size: int = 64,
                 device: str | torch.device = "cpu", progress: bool = True) -> dict[str, np.ndarray]:
    """Runs `extractor` over every image of a set, in batches.

    Args:
        images: the set (an ImageSet: see `open_images`).
        extractor: a FeatureExtractor; it is moved to `device`.
        batch_size: images per forward pass.
        device: where the extractor runs.
        progress: show a progress bar.
    Returns:
        {"pool": (N, D), "logits": (N, K), "spatial": (N, S)} float32 arrays.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    if images.num_images == 0:
        raise UserError(f"{images.name} holds no images to extract features from")
    device = torch.device(device)
    extractor.to(device)
    out = {kind: [] for kind in FEATURE_KINDS}
    with full_fp32(), tqdm(total=images.num_images, desc=f"{extractor.name} features of {images.name}",
                           unit="img", disable=not progress) as bar:
        for batch in images.batches(batch_size):
            # torch.tensor copies: an .npz batch is a read-only view of the bytes read.
            x = torch.tensor(batch, device=device).permute(0, 3, 1, 2)  # (n, C, H, W) uint8
            features = extractor.features(x)
            for kind in FEATURE_KINDS:
                value = features.get(kind) if isinstance(features, dict) else None
                if value is None or value.ndim != 2 or value.shape[0] != len(batch):
                    raise UserError(f"the feature extractor {extractor.name!r} must return {{'pool', 'logits', "
                                     f"'spatial'}}, each a ({len(batch)}, dim) tensor for {len(batch)} images; "
                                     f"{kind!r} is {None if value is None else tuple(value.shape)}")
                out[kind].append(value.float().cpu().numpy())
            bar.update(len(batch))
    return {kind: np.concatenate(parts) for kind, parts in out.items()}


__all__ = ["FEATURE_KINDS", "FeatureExtractor", "embed_images", "full_fp32", "match_channels"]
