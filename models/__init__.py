"""Models: the families, their registry (the only source of `--model` choices), gates and surgery.

Plain and shallow DiTs come from `models.dit`; gated presets (a model wrapped in learnable N:M
layer gates) are names in the same registry, e.g. DiT-XL-1-2 keeps one block of every pair.
A new family registers itself in this file (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from .dit import KNOWN_NUM_HEADS, DiT, DiT_models
from .gates import GatedModel, LayerGates, format_groups, kept_depth, parse_groups
from .mar import MAR, OFFICIAL_NAMES, MAR_models
from .registry import (
    ARCHITECTURES,
    GATED_PRESETS,
    MODELS,
    build_architecture,
    create_model,
    plain_names,
    register_family,
    registry_spec,
)
from .sit import SiT, SiT_models
from .stacks import (
    BlockRecorder,
    block_stacks,
    flat_blocks,
    join_indices,
    parse_stack_groups,
    parse_stack_indices,
    split_indices,
    stack_depths,
    total_depth,
    unwrap,
)
from .surgery import (
    block_units,
    compose_kept_indices,
    compose_kept_units,
    layer_map,
    prunable_layers,
    prune_depth,
    prune_width,
    unit_sums,
    validate_kept_indices,
    width_stack_keys,
)

# The reference presets of TinyFusion: base model and N:M groups.
register_family(DiT, DiT_models, {
    "DiT-XL-1-2": ("DiT-XL/2", "14x1:2"),
    "DiT-XL-2-4": ("DiT-XL/2", "7x2:4"),
    "DiT-XL-7-14": ("DiT-XL/2", "2x7:14"),
    "DiT-XL-1-4": ("DiT-XL/2", "7x1:4"),
    "DiT-D14-1-2": ("DiT-D14/2", "7x1:2"),
    "DiT-D14-2-4": ("DiT-D14/2", "3x2:4,1:2"),
})
# SiT: DiT's network on the flow-matching transport; TinyFusion's SiT presets mirror DiT's.
register_family(SiT, SiT_models, {
    "SiT-XL-1-2": ("SiT-XL/2", "14x1:2"),
    "SiT-XL-2-4": ("SiT-XL/2", "7x2:4"),
    "SiT-XL-7-14": ("SiT-XL/2", "2x7:14"),
    "SiT-XL-1-4": ("SiT-XL/2", "7x1:4"),
    "SiT-D14-1-2": ("SiT-D14/2", "7x1:2"),
    "SiT-D14-2-4": ("SiT-D14/2", "3x2:4,1:2"),
})
# MAR: two stacks (encoder, decoder). TinyMAR-D16 is the paper's setting: MAR-L's 16 + 16 blocks cut to
# 8 + 8, one of every pair in each stack.
register_family(MAR, MAR_models, {
    "TinyMAR-D16": ("MAR-L", "encoder=8x1:2 decoder=8x1:2"),
    "MAR-L-1-2": ("MAR-L", "encoder=8x1:2 decoder=8x1:2"),
    "MAR-B-1-2": ("MAR-B", "encoder=6x1:2 decoder=6x1:2"),
    "MAR-H-1-2": ("MAR-H", "encoder=10x1:2 decoder=10x1:2"),
    "MAR-Nano-1-2": ("MAR-Nano", "encoder=2x1:2 decoder=2x1:2"),
})
# Users know DiT_models and SiT_models from the official code; they list the gated presets too.
for _registry in (DiT_models, SiT_models, MAR_models):
    _registry.update({name: MODELS[name] for name, (base, _) in GATED_PRESETS.items() if base in _registry})

__all__ = [
    "ARCHITECTURES", "BlockRecorder", "DiT", "DiT_models", "GATED_PRESETS", "GatedModel", "KNOWN_NUM_HEADS",
    "MAR", "MAR_models", "OFFICIAL_NAMES", "SiT", "SiT_models",
    "LayerGates", "MODELS", "block_stacks", "block_units", "build_architecture", "compose_kept_indices",
    "compose_kept_units", "create_model",
    "flat_blocks", "format_groups", "join_indices", "split_indices", "kept_depth", "layer_map", "parse_groups",
    "parse_stack_groups", "parse_stack_indices", "plain_names", "prunable_layers", "prune_depth", "prune_width",
    "register_family", "registry_spec", "stack_depths", "total_depth", "unit_sums", "unwrap", "validate_kept_indices",
    "width_stack_keys",
]
