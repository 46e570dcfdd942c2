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

from helpers import tiny_dit, write_features  # noqa: E402

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
    from diffusion import create_diffusion
    from tinyfusion.checkpoint import save_model
    from tinyfusion.synthetic import class_pattern_latents

    root = tmp_path_factory.mktemp("planted")
    latents, labels = class_pattern_latents(256, (4, 8, 8))
    write_features(root / "features", latents, labels, 10)

    torch.manual_seed(0)
    model = tiny_dit(depth=6, randomize=False)
    for i in (1, 2, 5):
        model.blocks[i].requires_grad_(False)  # adaLN-Zero: gates stay 0, the block is the identity
    diffusion = create_diffusion("")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    x_all, y_all = torch.from_numpy(latents[:, 0]), torch.from_numpy(labels)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, 256, (32,), generator=g)
        t = torch.randint(0, 1000, (32,), generator=g)
        loss = diffusion.training_losses(model, x_all[idx], t, dict(y=y_all[idx]))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(True).eval()
    save_model(root / "planted.pt", model)
    return {"data": root / "features", "ckpt": root / "planted.pt", "essential": [0, 3, 4], "model": model}
