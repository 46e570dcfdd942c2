"""Mixed precision: one switch (fp32, bf16, fp16) that means the same thing in every script."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from models.inference import held_dtype, hold_weights

from .errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
# The dtype each precision computes in: autocast's for bf16 and fp16 (the weights stay fp32).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_precision(device: torch.device) -> str:
    """bf16 on CUDA GPUs that support it (Ampere and newer), else fp32.

    On CPU, bf16 autocast makes large models faster but small ones slower (tiny matmuls), so CPU
    runs ask for it explicitly.
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_precision(precision: str | None, device: torch.device) -> str:
    if precision is None or precision == "auto":
        return default_precision(device)
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)} (or auto), got {precision!r}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bf16; use --precision fp16 (with loss scaling) or fp32")
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context of a precision (a no-op for fp32). Weights stay fp32 (mixed precision)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def for_inference(model: nn.Module, precision: str) -> nn.Module:
    """Puts a sampling model on the inference path of `precision` (in place; see models/inference.py): the blocks'
    heavy weights held once in bf16 or fp16, the numerically delicate parts float32. fp32 changes nothing."""
    return hold_weights(model, DTYPES[precision])


def inference_context(model: nn.Module, precision: str, device: torch.device):
    """The context a sampling call runs `model` in: nothing for a model on the inference path of `precision` (or for
    fp32), autocast for a float32 model sampled in bf16 or fp16 (mixed precision, the weights re-cast every call).

    Raises:
        ValueError: the model's weights are held in another precision's dtype (a bug: the caller mixed them).
    """
    held = held_dtype(model)
    if held is None:
        return autocast(precision, device)
    if held != DTYPES[precision]:
        raise ValueError(f"the model's weights are held in {held}, but it is sampled in {precision}")
    return contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (bf16 has fp32's exponent range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def enable_tf32() -> None:
    """TF32 matmuls and convolutions on Ampere+ GPUs: ~fp32 accuracy for diffusion training, much faster."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
