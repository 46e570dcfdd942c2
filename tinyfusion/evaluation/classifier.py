"""A feature extractor of one's own for small images, where Inception features mean nothing
(8 x 8 digits upsampled to 299 x 299): a small CNN classifier, its training, and its files.

A feature-extractor file is self-describing: {"format", "version", "arch", "config", "name",
"state_dict", "extra"}, plain containers and tensors only, so it loads with weights_only=True and
rebuilds the network from the file alone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyfusion.checkpoint import atomic_save, read_checkpoint

from ..errors import UserError
from .extractors import match_channels
from .images import check_images

FORMAT = "tinyfusion-feature-extractor"
FORMAT_VERSION = 1


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SmallClassifier(nn.Module):
    """A small CNN classifier for small images, and a feature extractor (see `extractors`).

    Layout: a 3x3 stem at full resolution; stride-2 convolutions down to a grid of at most 8 x 8;
    a conv to 2*width channels (its first `spatial_channels` channels are the spatial features);
    2x2 max pooling; a conv to 4*width channels; global average pooling (the pool features, 4*width);
    a linear layer to the logits.

    Args:
        image_size: side of the square input images (>= 4).
        num_classes: number of classes.
        in_channels: channels of the images (1 or 3).
        width: channels of the first convolutions.
        spatial_channels: channels kept for the spatial features (at most 2 * width).
    """

    arch = "SmallClassifier"
    adm_statistics = False

    def __init__(self, image_size: int, num_classes: int, in_channels: int = 3, width: int = 32,
                 spatial_channels: int = 4):
        super().__init__()
        if image_size < 4 or num_classes < 2 or in_channels not in (1, 3) or width < 1 \
                or not 1 <= spatial_channels <= 2 * width:
            raise UserError(f"SmallClassifier needs image_size >= 4, num_classes >= 2, in_channels 1 or 3, and "
                             f"1 <= spatial_channels <= 2 * width; got image_size={image_size}, num_classes="
                             f"{num_classes}, in_channels={in_channels}, width={width}, "
                             f"spatial_channels={spatial_channels}")
        self.config = dict(image_size=image_size, num_classes=num_classes, in_channels=in_channels, width=width,
                           spatial_channels=spatial_channels)
        self.name = "small-classifier"
        self.in_channels, self.spatial_channels = in_channels, spatial_channels
        grid, downsampling = image_size, []
        while grid > 8:
            downsampling.append(_conv(width, width, stride=2))
            grid = math.ceil(grid / 2)
        self.stem = nn.Sequential(_conv(in_channels, width), *downsampling)
        self.spatial_block = _conv(width, 2 * width)
        self.pool = nn.MaxPool2d(2)
        self.deep_block = _conv(2 * width, 4 * width)
        self.head = nn.Linear(4 * width, num_classes)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = self.config["image_size"]
        if images.shape[-2:] != (size, size):
            raise UserError(f"this {self.arch} takes {size} x {size} images, got {images.shape[-2]} x "
                             f"{images.shape[-1]}: resize the images to the size it was trained on")
        x = match_channels(images, self.in_channels).float() / 127.5 - 1  # (N, C, H, W) in [-1, 1]
        spatial = self.spatial_block(self.stem(x))  # (N, 2w, g, g), g <= 8
        pooled = self.deep_block(self.pool(spatial)).mean(dim=(2, 3))  # (N, 4w)
        return spatial, pooled, self.head(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) -> logits (N, num_classes)."""
        return self._forward(images)[2]

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 images (N, C, H, W) -> {"pool": (N, 4w), "logits": (N, K), "spatial": (N, s * g * g)}."""
        spatial, pooled, logits = self._forward(images)
        return {"pool": pooled, "logits": logits, "spatial": spatial[:, :self.spatial_channels].flatten(1)}


# The architectures a feature-extractor file may name.
FEATURE_EXTRACTORS = {"SmallClassifier": SmallClassifier}


#################################################################################
#                                    Files                                      #
#################################################################################

def save_feature_extractor(path: str | os.PathLike, model: nn.Module, *, name: str | None = None,
                           extra: dict | None = None) -> None:
    """Writes a self-describing feature-extractor file (atomically), for `evaluator.py --feature-extractor`.

    Args:
        path: the file to write (.pt).
        model: a model of FEATURE_EXTRACTORS (it has `arch` and `config`).
        name: the feature space, which labels the results (e.g. "digits-classifier"); default model.name.
        extra: anything to record beside it (e.g. {"test_accuracy": 0.98}): plain values only
            (dict, list, str, int, float, bool, None), so the file loads with weights_only=True.
    """
    arch = getattr(model, "arch", None)
    if arch not in FEATURE_EXTRACTORS:
        raise UserError(f"cannot save a {type(model).__name__}: feature-extractor files hold one of "
                         f"{', '.join(FEATURE_EXTRACTORS)}")
    atomic_save({
        "format": FORMAT, "version": FORMAT_VERSION, "arch": arch, "config": dict(model.config),
        "name": name or model.name, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }, path)


def load_feature_extractor(path: str | os.PathLike) -> nn.Module:
    """Rebuilds a feature extractor from a file written by `save_feature_extractor` (on CPU, eval mode).

    Its `name` (the feature space) and `extra` come from the file.
    """
    if not Path(path).is_file():
        raise UserError(f"--feature-extractor {path} does not exist; write one with "
                         "tinyfusion.evaluation.save_feature_extractor(path, model)")
    record = read_checkpoint(path)
    if record.get("format") != FORMAT:
        raise UserError(f"{path} is not a feature-extractor file: it does not record its architecture. Rebuild "
                         "the model and write it with tinyfusion.evaluation.save_feature_extractor(path, model)")
    if record["arch"] not in FEATURE_EXTRACTORS:
        raise UserError(f"{path} names the architecture {record['arch']!r}; known: {', '.join(FEATURE_EXTRACTORS)}")
    model = FEATURE_EXTRACTORS[record["arch"]](**record["config"])
    try:
        model.load_state_dict(record["state_dict"], strict=True)
    except RuntimeError as e:
        raise UserError(f"the weights in {path} do not fit {record['arch']}({record['config']}): "
                         f"{str(e).strip().splitlines()[0]}") from None
    model.name = record["name"]
    model.extra = record.get("extra", {})
    return model.eval()


#################################################################################
#                                   Training                                    #
#################################################################################

def _check_labelled(images: np.ndarray, labels: np.ndarray) -> None:
    check_images(images.dtype, images.shape, "images")
    if images.shape[1] != images.shape[2]:
        raise UserError(f"images must be square, got {images.shape[1]} x {images.shape[2]}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise UserError(f"labels must be {len(images)} non-negative integers (one per image), got "
                         f"{labels.dtype} {labels.shape}")


def train_classifier(images: np.ndarray, labels: np.ndarray, *, epochs: int = 10, batch_size: int = 64,
                     lr: float = 3e-3, seed: int = 0, device: str | torch.device = "cpu",
                     width: int = 32) -> SmallClassifier:
    """Trains a SmallClassifier with AdamW and a one-cycle schedule (warm-up, then cosine decay).

    On scikit-learn's 8 x 8 digits (1437 training images, 360 held out) the defaults reach 99.7-100%
    test accuracy in about 5 s on one CPU core (seeds 0-2); 5 epochs, 99.4-99.7% in 2.5 s.

    Args:
        images: uint8 (N, H, W, C), square, C = 1 or 3.
        labels: (N,) integers in [0, num_classes); num_classes = labels.max() + 1.
        epochs: passes over the data.
        batch_size: images per step.
        lr: peak learning rate.
        seed: seed of the initialisation and of the data order.
        device: where to train.
        width: the model's width (see SmallClassifier).
    Returns:
        the model, in eval mode, on `device`.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    _check_labelled(images, labels)
    if epochs < 1 or batch_size < 1:
        raise UserError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallClassifier(images.shape[1], int(labels.max()) + 1, in_channels=images.shape[3],
                                width=width).to(device)
    x = torch.tensor(images, device=device).permute(0, 3, 1, 2)  # (N, C, H, W) uint8
    y = torch.tensor(labels, dtype=torch.long, device=device)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=order).split(batch_size):
            batch = batch.to(device)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.inference_mode()
def classifier_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 256,
                        device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of a classifier on uint8 (N, H, W, C) images.

    Args:
        model: maps uint8 (N, C, H, W) images to logits (N, K).
        images: uint8 (N, H, W, C).
        labels: (N,) integers.
        batch_size: images per forward pass.
        device: where to run it.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    _check_labelled(images, labels)
    model.to(device).eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = torch.tensor(images[start:start + batch_size], device=device).permute(0, 3, 1, 2)
        prediction = model(x).argmax(dim=1).cpu().numpy()
        correct += int((prediction == labels[start:start + batch_size]).sum())
    return correct / len(images)


__all__ = ["FEATURE_EXTRACTORS", "SmallClassifier", "classifier_accuracy", "load_feature_extractor",
           "save_feature_extractor", "train_classifier"]
