"""Random weights for torch-fidelity's InceptionV3, made without a download (tests only)."""

from __future__ import annotations

import math

import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tfi


def inception_architecture() -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 with PyTorch's default initialisation.

    Its constructor always loads weights (downloading them when given no path), so for the
    duration of the call the download is replaced by an empty state dict and the loading is
    skipped; both are restored afterwards.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfi, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        return tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of the architecture with random values at a scale that keeps activations O(1)
    through the 40-odd layers: He-normal convolutions (std sqrt(2 / fan_in), He et al. 2015) and
    batch-norm statistics and affine parameters near identity."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in inception_architecture().state_dict().items():
        if key.endswith("num_batches_tracked"):
            out[key] = value.clone()
        elif key.endswith("conv.weight"):
            fan_in = math.prod(value.shape[1:])
            out[key] = torch.randn(value.shape, generator=generator) * math.sqrt(2 / fan_in)
        elif key.endswith(("bn.weight", "bn.running_var")):
            out[key] = 0.75 + 0.5 * torch.rand(value.shape, generator=generator)
        elif key.endswith(("bn.bias", "bn.running_mean")):
            out[key] = 0.1 * torch.randn(value.shape, generator=generator)
        elif key == "fc.weight":
            out[key] = torch.randn(value.shape, generator=generator) / math.sqrt(value.shape[1])
        elif key == "fc.bias":
            out[key] = torch.randn(value.shape, generator=generator)
        else:
            raise AssertionError(f"unexpected parameter {key} in torch-fidelity's InceptionV3")
    return out
