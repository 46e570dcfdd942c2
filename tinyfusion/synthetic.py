"""Synthetic latents for tests and benchmarks: one fixed pattern per class, plus Gaussian noise.

A model can learn such data in a few dozen CPU steps, so a run on it shows whether training, pruning and
distillation work without any real data set. Write the latents as a feature folder with
`tinyfusion.features.write_shard` and `write_index`.
"""

from __future__ import annotations

import numpy as np


def class_pattern_latents(num_images: int, shape: tuple[int, ...], num_classes: int = 10, seed: int = 0,
                          noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Images that are their class's pattern plus noise.

    Args:
        num_images: how many images.
        shape: (C, H, W) of one image.
        num_classes: how many classes (and patterns).
        seed: the seed of every draw; the same arguments give the same arrays.
        noise: the standard deviation of the noise added to each image.
    Returns:
        latents (num_images, 1, C, H, W) float32 (one copy per image, no mirror) and labels (num_images,) int64.
        The patterns are standard normal; the draws are, in order, the patterns, the labels (uniform), the noise.
    """
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((num_classes, *shape)).astype(np.float32)
    labels = rng.integers(0, num_classes, num_images)
    latents = patterns[labels][:, None] + noise * rng.standard_normal((num_images, 1, *shape)).astype(np.float32)
    return latents, labels


__all__ = ["class_pattern_latents"]
