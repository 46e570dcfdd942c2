"""Shared test helpers: tiny models, feature folders, and running the scripts as users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models import DiT  # noqa: E402

from .forkserver import forked_run  # noqa: E402

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=10)


def tiny_dit(seed: int = 0, randomize: bool = True, **overrides) -> DiT:
    """A tiny DiT; with `randomize`, the zero-initialised adaLN and output layers get random values
    so that every path of the forward pass matters."""
    return _tiny(DiT, seed, randomize, overrides)


def tiny_sit(seed: int = 0, randomize: bool = True, **overrides):
    """A tiny SiT (the sizes of `tiny_dit`, learn_sigma as in the official files), randomized alike."""
    from models import SiT

    return _tiny(SiT, seed, randomize, overrides)


# A tiny pixel-space MAR: 8x8 RGB images, 2x2 patches (16 tokens of 12 channels), 2 + 2 blocks.
TINY_MAR = dict(img_size=8, vae_stride=1, patch_size=2, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, vae_embed_dim=3, class_num=10,
                attn_dropout=0.0, proj_dropout=0.0, buffer_size=2, diffloss_d=1, diffloss_w=32,
                num_sampling_steps="4", diffusion_batch_mul=2)


def tiny_mar(seed: int = 0, randomize: bool = True, **overrides):
    """A tiny MAR (`TINY_MAR`), its zero-initialised DiffLoss layers randomized alike."""
    from models import MAR

    return _tiny(MAR, seed, randomize, overrides, base=TINY_MAR)


def _tiny(cls, seed: int, randomize: bool, overrides: dict, base: dict = TINY):
    torch.manual_seed(seed)
    model = cls(**{**base, **overrides})
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name or "final_layer.linear" in name:
                    p.normal_(0, 0.05)
    return model


def no_network_path(tmp_path: Path) -> str:
    """A PYTHONPATH for run_cli under which any network connection raises "network access attempted"
    (a sitecustomize module that replaces socket connects)."""
    guard = tmp_path / "no-network"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(
        "import socket\n"
        "def _refuse(*args, **kwargs):\n"
        "    raise RuntimeError('network access attempted')\n"
        "socket.socket.connect = _refuse\n"
        "socket.create_connection = _refuse\n")
    return f"{ROOT}{os.pathsep}{guard}"


# What the scripts' processes get: the repository importable, and one thread each (several run at once).
SCRIPT_ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# The environment of a run that asks for nothing else: single-process runs in it are forked from a process that has
# imported torch (helpers/forkserver.py), the same run without the 3.5 s of the import. scikit-learn adds KMP_*
# variables to os.environ when it is imported (the digits): imported first, so that a test loading them in this
# process leaves the environment of the runs after it as it was.
import sklearn  # noqa: E402,F401

BASE_ENV = {**os.environ, **SCRIPT_ENV}


def run_cli(args: list[str], cwd: Path | None = None, nproc: int = 1, timeout: float = 600,
            check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs a script of the repository as users do: python, or torchrun with `nproc` processes. A single-process
    run in the usual environment is forked from a process that has imported torch (helpers/forkserver.py)."""
    full_env = {**os.environ, **SCRIPT_ENV, **(env or {})}
    proc = None
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
        proc = forked_run(args, cwd or ROOT, full_env, BASE_ENV, timeout)
    if proc is None:
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

    env = {**os.environ, **SCRIPT_ENV}
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


def train_teacher(root: Path, start, max_steps: int, codec: dict | None = None) -> dict:
    """A tiny teacher trained from the model `start` by train.py (as users run it) on 128 images of 10 class
    patterns (`tinyfusion.synthetic`, seed 0) of the model's input shape: batch 16, lr 3e-3, a loss logged every
    20 steps. `codec` is the start file's (e.g. {"vae": "none", "scaling_factor": 1.0}; None: the default).

    Returns a dict with the folder ("root"), the features ("data"), the teacher file ("teacher") and the
    logged losses ("losses").
    """
    from tinyfusion.checkpoint import save_model
    from tinyfusion.synthetic import class_pattern_latents

    latents, labels = class_pattern_latents(128, tuple(start.data_shape))
    data = write_features(root / "features", latents, labels, 10)
    save_model(root / "start.pt", start, codec=codec)
    run_cli(["train.py", "--load-weight", str(root / "start.pt"), "--data-path", str(data), "--results-dir", str(root),
             "--prefix", "teacher", "--global-batch-size", "16", "--num-workers", "0", "--max-steps", str(max_steps),
             "--lr", "3e-3", "--log-every", "20", "--save-model", str(root / "teacher.pt")])
    losses = [json.loads(line)["loss"] for line in (root / "teacher" / "metrics.jsonl").read_text().splitlines()]
    return {"root": root, "data": data, "teacher": root / "teacher.pt", "losses": losses}


def fit_tiny(model, latents, labels, steps: int, params=None, lr: float = 2e-3, batch: int = 32) -> None:
    """Trains `model` in this process on (N, copies, C, H, W) latents with the official hybrid loss (1000-step
    linear diffusion): AdamW over `params` (default: all), `batch` images and timesteps a step from seed 0."""
    from diffusion import create_diffusion

    diffusion = create_diffusion("")
    opt = torch.optim.AdamW(list(model.parameters()) if params is None else params, lr=lr)
    x_all, y_all = torch.from_numpy(latents[:, 0]), torch.from_numpy(labels)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        loss = diffusion.training_losses(model, x_all[idx], t, dict(y=y_all[idx]))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def one_line_error(proc: subprocess.CompletedProcess, status: int, *needles: str) -> str:
    """The script exited with `status` (2: a user error, 1: a run that failed) printing one line on stderr,
    no traceback, naming each of `needles`; returns the line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == status, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
