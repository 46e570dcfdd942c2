"""The FID InceptionV3: torch-fidelity's port of the TensorFlow graph that ADM's evaluator runs.

torch-fidelity (`FeatureExtractorInceptionV3`) reproduces the 2015-12-05 TF graph: it takes uint8
images of any size, resizes them to 299 x 299 with TF1's bilinear resize and scales them to
[-1, 1] as the graph does. Its weights are the TF weights converted to PyTorch.

What ADM reads from the graph, and where it is in the port:
- "pool_3" (2048 features: FID, precision/recall) = the pooled output, torch-fidelity's "2048";
- the softmax of pool_3 times the logits weights without the bias (Inception Score) = softmax of
  torch-fidelity's "logits_unbiased" (1008 classes);
- "mixed_6/conv" (sFID): the TF graph's blocks are named mixed, mixed_1, mixed_2 (Mixed_5b/c/d),
  mixed_3 (Mixed_6a), mixed_4 to mixed_7 (Mixed_6b to 6e), so mixed_6 is Mixed_6d, and its "conv"
  is the 1x1 branch after batch norm and ReLU: `Mixed_6d.branch1x1`, (N, 768 -> 192, 17, 17). ADM
  keeps its first 7 channels, flattened in TF's (H, W, C) order: 17 * 17 * 7 = 2023 features. The
  order matters to match the `mu_s`/`sigma_s` stored in ADM's reference batches.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from tinyfusion.checkpoint import read_checkpoint, select_state_dict

from ..errors import UserError
from .extractors import match_channels

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# The URL torch-fidelity (v0.2.0 release and later) downloads its weights from; the file's SHA-256
# starts with the 8 hex digits of its name (torch.hub's convention).
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILENAME}"
INCEPTION_SHA256_PREFIX = "6726825d"
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]


def default_inception_path() -> Path:
    """Where torch-fidelity stores its weights: the torch hub checkpoints folder ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def resolve_inception_weights(path: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The InceptionV3 weights file: `path`, else the torch hub cache, else downloaded into the cache.

    Args:
        path: an explicit weights file.
        download: allow the download (from INCEPTION_URL, checked against its SHA-256 prefix).
    Raises:
        UserError: the file is missing and cannot be downloaded; the message says where to put it.
    """
    where = (f"Download {INCEPTION_URL} and pass it with --inception-weights PATH, or place it at "
             f"{default_inception_path()}")
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"--inception-weights {path} does not exist. {where}")
        return Path(path)
    cached = default_inception_path()
    if cached.is_file():
        return cached
    if not download:
        raise UserError(f"the InceptionV3 weights are not in the cache and downloading is off. {where}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading the InceptionV3 weights to {cached}", file=sys.stderr)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), hash_prefix=INCEPTION_SHA256_PREFIX)
    except (OSError, RuntimeError) as e:
        raise UserError(f"cannot download the InceptionV3 weights ({e}). {where}") from None
    return cached


class InceptionV3Features(nn.Module):
    """ADM's Inception features (pool, unbiased logits, mixed_6/conv) from torch-fidelity's InceptionV3.

    Args:
        state_dict: the weights of torch-fidelity's FeatureExtractorInceptionV3.
    Raises:
        UserError: weights that do not fit the architecture.
    """

    name = "inception-v3"
    adm_statistics = True

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        # Imported here: torch-fidelity takes seconds to import, which a custom extractor never needs.
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # Its constructor always loads weights itself: downloading them when given no path, or
        # unpickling the path with weights_only=False. We give it an in-memory copy of a state dict
        # read with weights_only=True, so no user file is unpickled unsafely; it loads it strictly.
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=buffer)
        except RuntimeError as e:
            # torch lists every missing key: keep the start of each of the first lines.
            lines = [line.strip() if len(line) < 240 else f"{line.strip()[:240]} ..." for line in
                     str(e).strip().splitlines()[:6]]
            raise UserError("the weights do not fit torch-fidelity's InceptionV3 (expected "
                             f"{INCEPTION_FILENAME}, from {INCEPTION_URL}):\n  " + "\n  ".join(lines)) from None
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 images (N, 3 or 1, H, W) -> {"pool": (N, 2048), "logits": (N, 1008), "spatial": (N, 2023)}."""
        pool, logits = self.net(match_channels(images, 3))
        spatial = self._spatial.permute(0, 2, 3, 1).flatten(1)  # TF's (H, W, C) order, (N, 2023)
        self._spatial = None
        return {"pool": pool, "logits": logits, "spatial": spatial.float()}


def load_inception(path: str | os.PathLike | None = None, *, download: bool = True) -> InceptionV3Features:
    """torch-fidelity's InceptionV3 with weights read safely (weights_only=True) and loaded strictly.

    Args:
        path: the weights file; by default the torch hub cache (see `resolve_inception_weights`).
        download: allow downloading the weights into the cache when they are not there.
    """
    path = resolve_inception_weights(path, download=download)
    state_dict, _ = select_state_dict(read_checkpoint(path), "model", str(path))
    return InceptionV3Features(state_dict).eval()


__all__ = ["INCEPTION_FILENAME", "INCEPTION_URL", "InceptionV3Features", "default_inception_path",
           "load_inception", "resolve_inception_weights"]
