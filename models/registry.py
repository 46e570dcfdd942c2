"""The model registry: every family registers its classes and names here, and nothing else lists them.

A *family* is a model class (its `arch` is recorded in checkpoints); a *name* (`DiT-XL/2`,
`DiT-XL-1-2`) is a factory of one size of a family, possibly wrapped in N:M layer gates.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from tinyfusion.errors import UserError

from .gates import GatedModel

# Architecture name (the `arch` a checkpoint records) -> class.
ARCHITECTURES: dict[str, type[nn.Module]] = {}
# Registry name -> factory taking constructor keyword arguments. Plain factories carry `.fixed`
# (what the name determines) and `.arch`.
MODELS: dict[str, Callable[..., nn.Module]] = {}
# Gated names -> (base name, N:M groups).
GATED_PRESETS: dict[str, tuple[str, str]] = {}


def register_family(cls: type[nn.Module], names: dict[str, Callable[..., nn.Module]],
                    gated_presets: dict[str, tuple[str, str]] | None = None) -> None:
    """Registers a model class, its sized names and its gated presets."""
    ARCHITECTURES[cls.arch] = cls
    MODELS.update(names)
    for name, (base, groups) in (gated_presets or {}).items():
        GATED_PRESETS[name] = (base, groups)
        MODELS[name] = _gated_factory(base, groups)


def _gated_factory(base: str, groups: str) -> Callable[..., GatedModel]:
    def make(**kwargs) -> GatedModel:
        return GatedModel(MODELS[base](**kwargs), groups)
    make.arch = MODELS[base].arch
    return make


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds a registry model by name; an unknown name is a ValueError listing the choices."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def build_architecture(arch: str, config: dict) -> nn.Module:
    """Rebuilds a model from the architecture name and constructor arguments a checkpoint records."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**config)


def registry_spec(name: str) -> tuple[str, dict, str | None]:
    """What a registry name fixes: (architecture, constructor fields, N:M groups or None).

    A family's name alone ("DiT", "SiT") fixes the family and no size: for a bare state dict of a size
    the registry does not list (its sizes then come from the tensor shapes)."""
    if name in ARCHITECTURES:
        return name, {}, None
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    groups = None
    if name in GATED_PRESETS:
        name, groups = GATED_PRESETS[name]
    return MODELS[name].arch, dict(MODELS[name].fixed), groups


def plain_names(families: bool = False) -> list[str]:
    """The registry names without gates; with `families`, the family names alone too (see `registry_spec`)."""
    return [name for name in MODELS if name not in GATED_PRESETS] + (list(ARCHITECTURES) if families else [])
