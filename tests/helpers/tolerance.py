"""Float32 tolerances, each sized from what float32 can promise across CPUs and kernels.

A float32 value holds about eps = 2**-23 = 1.2e-7 of its magnitude, but a matmul, convolution or attention
sums K products in an order its kernel chooses: MKL and oneDNN pick the blocking, the vector width (AVX2,
AVX-512, AMX) and the use of FMA per CPU and per batch size, so the same tensors computed on an Intel Xeon
and on an AMD EPYC (or as one batch and as a row alone) differ in their last bits. A reordered sum of K
terms moves by up to K * eps of the terms' magnitude (typically sqrt(K) * eps), and a forward pass chains a
few dozen such sums. An element that is a difference of large terms (guidance at scale s is
s * cond - (s - 1) * uncond; a posterior mean subtracts scaled terms) keeps only the absolute precision of
those terms, not a relative one, so every tolerance here is relative to the largest magnitude of the
tensor compared, never per element.

Measured on the official code's vectors (tests/data/dit_tiny): bit-exact on the Xeon they were made on; on
an AMD EPYC at most 1.8e-6 of the largest magnitude for a forward pass, 2.0e-6 after guidance at scale 4
and through the ten steps of a respaced posterior, and 1.1e-6 after ten DDIM steps, under the default
kernels, MKL_CBWR=COMPATIBLE and ATEN_CPU_CAPABILITY=default alike.
"""

from __future__ import annotations

import torch

# One evaluation (a forward pass, a loss, a posterior step, a batch against a row alone): 84 eps of the
# largest magnitude, 5x the largest difference measured across CPUs, while an error of 1e-3 of the scale
# (a wrong constant, a misplaced term) still fails by a factor of 100.
KERNEL_REL = 1e-5

# A sampling loop of many steps compounds each step's rounding, and an adaptive ODE solver may accept other
# step sizes when a rounding moves its error estimate: 10x the one-evaluation tolerance (ten DDIM steps
# measured 1.1e-6), still 10x below an error of 1e-3 of the scale.
LOOP_REL = 1e-4


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = KERNEL_REL, msg: str | None = None):
    """`actual` equals `expected` up to `rel` times the largest magnitude of `expected` (see the module's text)."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, atol=rel * scale, rtol=0, msg=msg)
