"""Shared fixtures: the reference vectors of the official DiT, tiny models, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "data" / "dit_tiny"
sys.path.insert(0, str(ROOT))

from models import DiT  # noqa: E402

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=10)


@pytest.fixture(scope="session")
def reference():
    """The reference DiT's inputs and outputs (tests/data/dit_tiny/README.md), and its config."""
    from safetensors.torch import load_file

    expected = load_file(str(REFERENCE / "expected.safetensors"))
    config = json.loads((REFERENCE / "config.json").read_text())
    return {"expected": expected, "config": config, "ckpt": REFERENCE / "dit_tiny.pt"}


def tiny_dit(seed: int = 0, randomize: bool = True, **overrides) -> DiT:
    """A tiny DiT; with `randomize`, the zero-initialised adaLN and output layers get random values
    so that every path of the forward pass matters."""
    torch.manual_seed(seed)
    model = DiT(**{**TINY, **overrides})
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name or "final_layer.linear" in name:
                    p.normal_(0, 0.05)
    return model


def run_cli(args: list[str], cwd: Path | None = None, nproc: int = 1, timeout: float = 600,
            check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs a script of the repository as users do: python, or torchrun with `nproc` processes."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc
