"""The inference path: a model's heavy weights held once in the sampling precision (bf16 or fp16).

Autocast keeps the weights in float32 and casts each one to the low precision on every call (on a CPU with AMX
that re-cast was a quarter of DiT-XL/2's bf16 forward). Here the weights of the blocks' attention and MLP linears
are converted once; each of those linears casts its *input* to its dtype and returns its output in it, so a
block's matmuls, its attention and its GELU run in the low precision. Everything else stays float32, where the
numerics need it: the residual stream (a float32 tensor plus a bf16 branch promotes to float32, as the official
code's residual is float32 under autocast), the LayerNorms, the timestep and class embeddings, the adaLN
modulation (its scales and gates multiply every token) and the final layer. Which modules take the path is data
of the family: its class attribute `low_precision_modules`, glob patterns over module names.

The activation that follows a held linear (GELU, exact or tanh, and SiLU: an MLP's `fc1` then `act`, timm's layout, or
a Linear then its activation in an nn.Sequential) is fused into that linear. On a CPU with oneDNN's bf16 kernels the
linear, its bias and the activation are then one oneDNN call (`torch.ops.mkldnn._linear_pointwise`, the kernel
inductor emits for the same pattern), the activation applied to the float32 accumulator before the one rounding to
bf16; elsewhere (CUDA, fp16, with autograd recording, or traced by torch.compile, whose inductor lowers that op only
for frozen weights and fuses the activation itself) the same module calls F.linear and then the activation.
Measured on DiT-XL/2 at batch 8, bf16, on an AMX Xeon: torch's separate tanh GELU took 10% of the forward and the
bias copies of addmm another 5% (README, Speed).

Sampling only: the model is changed in place and is not meant to be trained or saved afterwards (training keeps
float32 master weights under autocast).
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F

from .stacks import unwrap


def _onednn_bf16() -> bool:
    """Whether this torch has oneDNN's bf16 linear kernels for this CPU."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


ONEDNN_BF16 = _onednn_bf16()  # read by HeldLinear at every call; a module constant so that torch.compile folds it

# The activations a held linear can apply itself: module type to (oneDNN post-op, its algorithm).
_POST_OPS = {nn.GELU: lambda act: ("gelu", act.approximate), nn.SiLU: lambda act: ("swish", "")}


class HeldLinear(nn.Linear):
    """A Linear whose weight and bias are held in a low precision: the input is cast to that dtype (an activation
    cast, a no-op when it already is), the output stays in it. The weights are never re-cast. `post_op`, when set,
    is the activation that follows it (("gelu", "tanh" | "none") or ("swish", "")), applied here."""

    post_op: tuple[str, str] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if (ONEDNN_BF16 and x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            attr, algorithm = self.post_op or ("none", "")
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, attr, [], algorithm)
        y = F.linear(x, self.weight, self.bias)
        if self.post_op is None:
            return y
        attr, algorithm = self.post_op
        return F.gelu(y, approximate=algorithm) if attr == "gelu" else F.silu(y)


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
        _fuse_activation(parent, child)
    inner._held_dtype = dtype
    return model


def _fuse_activation(parent: nn.Module, child: str) -> None:
    """Moves the activation that follows the held linear `parent.<child>` into it, leaving nn.Identity in its place:
    `act` after `fc1` (timm's Mlp layout: fc1, act, then dropout and fc2), or the next module of an nn.Sequential."""
    if isinstance(parent, nn.Sequential) and child.isdigit():
        follower = str(int(child) + 1)
    elif child == "fc1":
        follower = "act"
    else:
        return
    act = getattr(parent, follower, None)
    post_op = next((make(act) for kind, make in _POST_OPS.items() if type(act) is kind), None)
    if post_op is None:
        return
    getattr(parent, child).post_op = post_op
    setattr(parent, follower, nn.Identity())


def held_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype `hold_weights` put the model's weights in, or None (float32 weights)."""
    return getattr(unwrap(model), "_held_dtype", None)
