"""Weight updates that simulate the fine-tuning to come: LoRA (through peft) or full weights.

TinyFusion trains these jointly with the layer gates and then throws them away: they only make
the decision aware of how well each candidate recovers.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch.nn as nn

from models import flat_blocks

from .errors import UserError

# The Linears of a DiT block: attention, MLP and the adaLN modulation (a MAR block has no adaLN).
BLOCK_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
# What `--lora-targets` may say besides layer names: "all" adapts every Linear of the model (the
# embedders and the final layer too), as the reference TinyFusion does; "blocks" those of the blocks.
TARGET_SETS = ("all", "blocks")
DEFAULT_TARGETS = ("all",)


def lora_linear_names(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Full names of the Linear layers LoRA adapts: `targets` is ["all"] (every Linear of the model),
    ["blocks"] (every Linear of its blocks) or names within a block (see `block_linear_names`)."""
    targets = list(targets)
    if targets == ["all"]:
        return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if targets == ["blocks"]:
        return block_linear_names(model, ["re:.*"])  # every Linear of the blocks, whatever the family
    if set(targets) & set(TARGET_SETS):
        raise UserError(f"--lora-targets {' '.join(targets)}: 'all' and 'blocks' stand alone; give one of them, or "
                         "layer names within a block (e.g. attn.qkv mlp.fc1)")
    return block_linear_names(model, targets)


def block_linear_names(model: nn.Module, targets: Sequence[str] = BLOCK_TARGETS) -> list[str]:
    """Full names of the Linear layers inside the model's blocks (every stack) whose name within the block
    matches a target.

    A target matches the end of the name within its block ("attn.qkv", "fc1") or, written as
    "re:<pattern>", a regular expression over that name.
    Raises:
        UserError: when a target matches no Linear layer (a typo would otherwise train nothing).
    """
    names, hits = [], {t: 0 for t in targets}
    prefixes = _module_names(model)
    for block in flat_blocks(model):
        for name, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            matched = [t for t in targets if _matches(t, name)]
            for t in matched:
                hits[t] += 1
            if matched:
                names.append(f"{prefixes[id(block)]}.{name}")
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        raise UserError(f"LoRA targets {missing} match no Linear layer of the blocks; "
                         f"the block Linears are named like {_example_names(model)}")
    return names


def add_lora(model: nn.Module, rank: int = 8, alpha: float | None = None,
             targets: Sequence[str] = DEFAULT_TARGETS) -> list[nn.Parameter]:
    """Injects LoRA adapters (peft) into the chosen Linears, in place; returns the adapter parameters.

    Every other parameter of `model` is frozen. The update of a layer is (alpha / rank) * B A with
    B zero-initialised, so the model's output is unchanged until training moves B.

    Args:
        model: the model to adapt (modified in place).
        rank: the LoRA rank r.
        alpha: the LoRA scale numerator; 2 * rank by default, as in TinyFusion.
        targets: which Linears to adapt (see `lora_linear_names`; default every Linear of the model).
    """
    from peft import LoraConfig, inject_adapter_in_model  # heavy import, only when LoRA is used

    if rank < 1:
        raise UserError(f"the LoRA rank must be at least 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=0.0,
                        target_modules=lora_linear_names(model, targets), bias="none")
    inject_adapter_in_model(config, model)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for name, p in model.named_parameters() if ".lora_" in name]
    for p in params:
        p.requires_grad_(True)
    return params


def strip_lora(model: nn.Module) -> nn.Module:
    """Removes every LoRA adapter without merging: the base weights come back as they were."""
    for name, module in list(model.named_modules()):
        if not _is_lora_layer(module):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model


def has_lora(model: nn.Module) -> bool:
    return any(_is_lora_layer(m) for m in model.modules())


def trainable_fraction(model: nn.Module, params: Iterable[nn.Parameter] | None = None) -> tuple[int, int]:
    """(trainable, total) parameter counts; total counts the base model without LoRA adapters."""
    all_params = dict(model.named_parameters())
    total = sum(p.numel() for name, p in all_params.items() if ".lora_" not in name)
    chosen = [p for p in all_params.values() if p.requires_grad] if params is None else list(params)
    return sum(p.numel() for p in chosen), total


#################################################################################
#                                     Helpers                                   #
#################################################################################

def _module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its full name in `model`."""
    return {id(module): name for name, module in model.named_modules()}


def _matches(target: str, name: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def _example_names(model: nn.Module) -> list[str]:
    return [n for n, m in flat_blocks(model)[0].named_modules() if isinstance(m, nn.Linear)]


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")
