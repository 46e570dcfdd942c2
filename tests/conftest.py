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

# Tiny models run fastest on one thread, and several test processes share the CPU.
torch.set_num_threads(1)

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


def interrupt_with_sigterm(args: list[str], metrics: Path, after_lines: int, timeout: float = 300) -> str:
    """Starts a script, sends it SIGTERM once its metrics.jsonl has `after_lines` lines, and returns its
    output; asserts that it saved and exited with 143 (preempted)."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= after_lines) and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 143, output
    assert "stopped by SIGTERM" in output
    return output


def write_features(root: Path, latents, labels, num_classes: int) -> Path:
    """A feature folder in the sharded layout from (N, copies, C, H, W) latents and (N,) labels."""
    from tinyfusion.features import write_index, write_shard

    write_shard(root, 0, latents, labels)
    write_index(root, 1, num_classes=num_classes, class_names=[str(i) for i in range(num_classes)], source={})
    return root


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """A tiny DiT of depth 6 trained on class patterns with blocks 1, 2 and 5 frozen at the identity
    (adaLN-Zero): blocks 0, 3 and 4 carry the model, one in each pair; the others cost nothing.

    Returns a dict with the features folder ("data"), the checkpoint ("ckpt"), the blocks that
    matter ("essential") and the training diffusion's inputs for direct checks.
    """
    import numpy as np

    from diffusion import create_diffusion
    from tinyfusion.checkpoint import save_model

    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal((10, 4, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 10, 256)
    latents = patterns[labels][:, None] + 0.3 * rng.standard_normal((256, 1, 4, 8, 8)).astype(np.float32)
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
