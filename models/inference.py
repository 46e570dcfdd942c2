"""The inference path: a model's heavy weights held once in the sampling precision (bf16 or fp16).

Autocast keeps the weights in float32 and casts each one to the low precision on every call (on a CPU with AMX
that re-cast was a quarter of DiT-XL/2's bf16 forward). Here the weights of the blocks' attention and MLP linears
are converted once; each of those linears casts its *input* to its dtype and returns its output in it, so a
block's matmuls, its attention and its GELU run in the low precision. Everything else stays float32, where the
numerics need it: the residual stream (a float32 tensor plus a bf16 branch promotes to float32, as the official
code's residual is float32 under autocast), the LayerNorms, the timestep and class embeddings, the adaLN
modulation (its scales and gates multiply every token) and the final layer. Which modules take the path is data
of the family: its class attribute `low_precision_modules`, glob patterns over module names.

Sampling only: the model is changed in place and is not meant to be trained or saved afterwards (training keeps
float32 master weights under autocast).
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F

from .stacks import unwrap


class HeldLinear(nn.Linear):
    """A Linear whose weight and bias are held in a low precision: the input is cast to that dtype (an activation
    cast, a no-op when it already is), the output stays in it. The weights are never re-cast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


def _held_copy(linear: nn.Linear, dtype: torch.dtype) -> HeldLinear:
    held = HeldLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      device=linear.weight.device, dtype=dtype)
    with torch.no_grad():
        held.weight.copy_(linear.weight)
        if linear.bias is not None:
            held.bias.copy_(linear.bias)
    held.train(linear.training)
    return held


def held_linear_names(model: nn.Module) -> list[str]:
    """Names (in `model`, unwrapped) of the nn.Linear modules the family puts on the inference path."""
    inner = unwrap(model)
    patterns = getattr(type(inner), "low_precision_modules", None)
    if patterns is None:
        raise ValueError(f"{type(inner).__name__} declares no low_precision_modules")
    parents = [name for name, _ in inner.named_modules() if any(_matches(name, p) for p in patterns)]
    return [f"{parent}.{name}" for parent in parents
            for name, module in inner.get_submodule(parent).named_modules() if type(module) is nn.Linear and name]


def _matches(name: str, pattern: str) -> bool:
    """A module name against a pattern, part by part ("blocks.*.mlp" is blocks.3.mlp, not blocks.3.mlp.fc1)."""
    parts, wanted = name.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def hold_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Puts `model` (unwrapped; in place) on the inference path in `dtype`; returns it. float32 leaves it as is.

    Raises:
        ValueError: the model is on the path already in another dtype (a bug: convert once).
    """
    inner = unwrap(model)
    current = held_dtype(inner)
    if current is not None and current != dtype:
        raise ValueError(f"the model's weights are held in {current} already; cannot hold them in {dtype}")
    if dtype == torch.float32 or current == dtype:
        return model
    for name in held_linear_names(inner):
        parent_name, _, child = name.rpartition(".")
        parent = inner.get_submodule(parent_name)
        setattr(parent, child, _held_copy(getattr(parent, child), dtype))
    inner._held_dtype = dtype
    return model


def held_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype `hold_weights` put the model's weights in, or None (float32 weights)."""
    return getattr(unwrap(model), "_held_dtype", None)
