"""Model registry: the only source of `--model` choices.

Plain and shallow DiTs come from `models.dit`; gated presets (a DiT wrapped in learnable N:M
layer gates) are names in the same registry, e.g. DiT-XL-1-2 keeps one block of every pair.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .dit import KNOWN_NUM_HEADS, DiT, DiT_models
from .gates import GatedModel, LayerGates, format_groups, kept_depth, parse_groups
from .surgery import compose_kept_indices, layer_map, prune_depth, validate_kept_indices

# Architecture name (the `arch` a checkpoint records) -> class.
ARCHITECTURES: dict[str, type[nn.Module]] = {"DiT": DiT}

# The reference presets of TinyFusion: base model and N:M groups.
GATED_PRESETS = {
    "DiT-XL-1-2": ("DiT-XL/2", "14x1:2"),
    "DiT-XL-2-4": ("DiT-XL/2", "7x2:4"),
    "DiT-XL-7-14": ("DiT-XL/2", "2x7:14"),
    "DiT-XL-1-4": ("DiT-XL/2", "7x1:4"),
    "DiT-D14-1-2": ("DiT-D14/2", "7x1:2"),
    "DiT-D14-2-4": ("DiT-D14/2", "3x2:4,1:2"),
}


def _gated_factory(base: str, groups: str) -> Callable[..., GatedModel]:
    def make(**kwargs) -> GatedModel:
        return GatedModel(DiT_models[base](**kwargs), groups)
    return make


DiT_models.update({name: _gated_factory(base, groups) for name, (base, groups) in GATED_PRESETS.items()})


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds a registry model by name; an unknown name is a ValueError listing the choices."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(DiT_models)}")
    return DiT_models[name](**kwargs)


def build_architecture(arch: str, config: dict) -> nn.Module:
    """Rebuilds a model from the architecture name and constructor arguments a checkpoint records."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**config)


__all__ = [
    "ARCHITECTURES", "DiT", "DiT_models", "GATED_PRESETS", "GatedModel", "KNOWN_NUM_HEADS", "LayerGates",
    "build_architecture", "compose_kept_indices", "create_model", "format_groups", "kept_depth", "layer_map",
    "parse_groups", "prune_depth", "validate_kept_indices",
]
