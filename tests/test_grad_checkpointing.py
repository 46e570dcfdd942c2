"""Gradient checkpointing of DiT and SiT: the same loss and gradients as without it, in the model and
through train.py --grad-checkpointing, and prune_by_learning.py --grad-checkpointing: the same losses and decision.
(MAR's: tests/test_mar_reference.py; gated blocks: tests/test_gate_checkpointing.py.)"""

import json

import pytest
import torch
from helpers import run_cli, tiny_dit, tiny_sit, write_features

from processes import GaussianProcess, TransportProcess
from tinyfusion.checkpoint import load_model, read_checkpoint, save_model
from tinyfusion.engine import check_resumable
from tinyfusion.synthetic import class_pattern_latents

# Checkpointing recomputes each block with the same kernels on the same inputs: on one machine the results
# should agree to the last bits; this allows a few float32 roundings of the largest magnitude, no more.
TIGHT = 1e-6


def _assert_tight(actual, expected, msg=None):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=TIGHT * scale, rtol=0, msg=msg)


def _count_block_calls(model):
    """A counter of the calls of the model's blocks (checkpointing runs each again in the backward pass)."""
    calls = [0]
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


FAMILIES = {"dit": (tiny_dit, GaussianProcess), "sit": (tiny_sit, TransportProcess)}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_gives_the_same_loss_and_every_gradient(family):
    make, make_process = FAMILIES[family]
    process = make_process()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([1, 3, 5, 7])
    draws = process.draw(g, 4, (4, 8, 8), torch.device("cpu"))

    def step(checkpointing):
        model = make(depth=4).train()  # training mode: the label dropout draws from torch's global generator
        model.gradient_checkpointing = checkpointing
        calls = _count_block_calls(model)
        torch.manual_seed(1)
        loss = process.training_losses(model, x, draws, dict(y=y))["loss"].mean()
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}, calls[0]

    plain_loss, plain_grads, plain_calls = step(False)
    loss, grads, calls = step(True)
    assert (plain_calls, calls) == (4, 8)  # with checkpointing each block runs again in the backward pass
    assert torch.isfinite(plain_loss)
    _assert_tight(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert (grad is None) == (plain_grads[name] is None), name
        if grad is not None:
            _assert_tight(grad, plain_grads[name], msg=name)
    # the blocks' gradients are not all zero (adaLN-Zero randomized): the comparison covers them
    assert all(grads[f"blocks.{i}.attn.qkv.weight"].abs().max() > 0 for i in range(4))


def test_checkpointing_is_skipped_without_gradients():
    """Sampling and evaluation (no_grad) run each block once, with or without the flag, to the same output."""
    model = tiny_dit(depth=4).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([0, 9])
    calls = _count_block_calls(model)
    with torch.no_grad():
        plain = model(x, t, y)
        model.gradient_checkpointing = True
        flagged = model(x, t, y)
    assert calls[0] == 2 * 4  # two forwards, each block once
    assert torch.equal(flagged, plain)


# Runs a script (the first argument) as users do, counting the calls of torch's checkpoint function; prints
# the count when the script ends. Models import `checkpoint` from torch.utils.checkpoint when loaded, after this.
COUNT_CHECKPOINTS = """
import atexit, runpy, sys
import torch.utils.checkpoint as tc
calls, original = [0], tc.checkpoint
def counted(*args, **kwargs):
    calls[0] += 1
    return original(*args, **kwargs)
tc.checkpoint = counted
atexit.register(lambda: print(f"checkpointed calls: {calls[0]}"))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_train_py_with_grad_checkpointing_logs_the_same_losses(tmp_path):
    latents, labels = class_pattern_latents(64, (4, 8, 8))
    data = write_features(tmp_path / "features", latents, labels, 10)
    save_model(tmp_path / "start.pt", tiny_dit(depth=4))
    runs = {}
    for prefix, flag in (("plain", []), ("checkpointed", ["--grad-checkpointing"])):
        proc = run_cli(["-c", COUNT_CHECKPOINTS, "train.py", "--load-weight", str(tmp_path / "start.pt"),
                        "--data-path", str(data), "--results-dir", str(tmp_path), "--prefix", prefix,
                        "--global-batch-size", "8", "--num-workers", "0", "--max-steps", "6", "--log-every", "2",
                        "--ckpt-every", "6", "--lr", "1e-3", *flag])
        lines = (tmp_path / prefix / "metrics.jsonl").read_text().splitlines()
        runs[prefix] = {"losses": [json.loads(line)["loss"] for line in lines],
                        "calls": int(proc.stdout.rsplit("checkpointed calls: ", 1)[1].split()[0]),
                        "model": read_checkpoint(tmp_path / prefix / "checkpoints" / "step-0000006.pt")["model"]}
    plain, checkpointed = runs["plain"], runs["checkpointed"]
    # the flag reached the model: 4 blocks checkpointed in each of the 6 training forwards, none without it
    assert (plain["calls"], checkpointed["calls"]) == (0, 4 * 6)
    assert len(plain["losses"]) == 3 and plain["losses"][0] != plain["losses"][-1]
    assert checkpointed["losses"] == pytest.approx(plain["losses"], rel=1e-5, abs=0)
    for name, value in plain["model"].items():
        # A recomputed forward may round its last bits otherwise; a missed gradient moves a weight by ~lr (1e-3)
        # a step, 1000x this tolerance.
        torch.testing.assert_close(checkpointed["model"][name], value, atol=1e-6, rtol=1e-5, msg=name)  # see above


def test_prune_by_learning_with_grad_checkpointing_logs_the_same_losses_and_keeps_the_same_blocks(planted, tmp_path):
    def learn(prefix, *flag):
        return run_cli(["-c", COUNT_CHECKPOINTS, "prune_by_learning.py", "--load-weight", str(planted["ckpt"]),
                        "--groups", "3x1:2", "--data-path", str(planted["data"]), "--results-dir", str(tmp_path),
                        "--prefix", prefix, "--max-steps", "12", "--global-batch-size", "16", "--log-every", "4",
                        "--num-workers", "0", "--ema-decay", "0.8", "--delta-w", "--lora", "--lora-rank", "2",
                        "--save-model", str(tmp_path / f"{prefix}.pt"), *flag])

    runs = {}
    for prefix, flag in (("plain", []), ("checkpointed", ["--grad-checkpointing"])):
        proc = learn(prefix, *flag)
        run_dir = tmp_path / prefix
        runs[prefix] = {
            "calls": int(proc.stdout.rsplit("checkpointed calls: ", 1)[1].split()[0]),
            "logged": "gradient checkpointing" in (run_dir / "log.txt").read_text(),
            "losses": [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
            "decisions": (run_dir / "decisions.jsonl").read_text().splitlines(),
            "kept": load_model(tmp_path / f"{prefix}.pt").lineage["kept_indices"],
            "state": read_checkpoint(run_dir / "checkpoints" / "step-0000012.pt")["model"]}
    plain, checkpointed = runs["plain"], runs["checkpointed"]
    # the flag reached the gated model: its 6 blocks checkpointed in each of the 12 training forwards, and logged
    assert (plain["calls"], checkpointed["calls"]) == (0, 6 * 12)
    assert (plain["logged"], checkpointed["logged"]) == (False, True)
    # Exact, as in tests/test_gate_checkpointing.py: the recomputation runs the same CPU kernels on the same inputs
    # (one thread in both processes), so the losses, the gate logits and LoRA's weights are the same bits.
    assert len(plain["losses"]) == 3 and plain["losses"][0] != plain["losses"][-1]
    assert checkpointed["losses"] == plain["losses"]
    assert checkpointed["decisions"] == plain["decisions"]
    assert checkpointed["kept"] == plain["kept"] == planted["essential"]
    assert checkpointed["state"].keys() == plain["state"].keys()
    assert any(".lora_" in key for key in plain["state"]) and any("gates." in key for key in plain["state"])
    for key, value in plain["state"].items():
        assert torch.equal(checkpointed["state"][key], value), key


def test_a_run_resumes_with_or_without_grad_checkpointing(tmp_path):
    """The flag may change when a run is resumed (on a smaller GPU), and prune_by_learning.py runs that recorded
    no grad_checkpointing setting (before the script had the flag) resume with or without it."""
    recorded = {"lr": 1e-4, "max_steps": 12}
    for now in (False, True):
        check_resumable(recorded, {**recorded, "grad_checkpointing": now}, tmp_path)
        check_resumable({**recorded, "grad_checkpointing": not now}, {**recorded, "grad_checkpointing": now}, tmp_path)
