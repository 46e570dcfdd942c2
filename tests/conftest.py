"""Shared fixtures: the reference vectors of the official DiT and a planted model (helpers live in tests/helpers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "data" / "dit_tiny"
sys.path.insert(0, str(ROOT))

from helpers import fit_tiny, tiny_dit, write_features  # noqa: E402

# Tiny models run fastest on one thread, and several test processes share the CPU.
torch.set_num_threads(1)

@pytest.fixture(scope="session")
def reference():
    """The reference DiT's inputs and outputs (tests/data/dit_tiny/README.md), and its config."""
    from safetensors.torch import load_file

    expected = load_file(str(REFERENCE / "expected.safetensors"))
    config = json.loads((REFERENCE / "config.json").read_text())
    return {"expected": expected, "config": config, "ckpt": REFERENCE / "dit_tiny.pt"}


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """A tiny DiT of depth 6 trained on class patterns with blocks 1, 2 and 5 frozen at the identity
    (adaLN-Zero): blocks 0, 3 and 4 carry the model, one in each pair; the others cost nothing.

    Returns a dict with the features folder ("data"), the checkpoint ("ckpt"), the blocks that
    matter ("essential") and the training diffusion's inputs for direct checks.
    """
    from tinyfusion.checkpoint import save_model
    from tinyfusion.synthetic import class_pattern_latents

    root = tmp_path_factory.mktemp("planted")
    latents, labels = class_pattern_latents(256, (4, 8, 8))
    write_features(root / "features", latents, labels, 10)

    torch.manual_seed(0)
    model = tiny_dit(depth=6, randomize=False)
    for i in (1, 2, 5):
        model.blocks[i].requires_grad_(False)  # adaLN-Zero: gates stay 0, the block is the identity
    fit_tiny(model, latents, labels, 150, params=[p for p in model.parameters() if p.requires_grad])
    model.requires_grad_(True).eval()
    save_model(root / "planted.pt", model)
    return {"data": root / "features", "ckpt": root / "planted.pt", "essential": [0, 3, 4], "model": model}
