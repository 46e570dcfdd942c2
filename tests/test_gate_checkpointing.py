"""Layer gates under activation checkpointing: a checkpointed block is recomputed in the backward pass, after the
gated call has ended, and must be gated by the mask of its own call (models.stacks.checkpoint_block hands it over).
One learned-pruning step gives the same loss and every gradient (gate logits, LoRA, weights) with and without
checkpointing, for DiT and for MAR's two stacks. (The CLI: tests/test_grad_checkpointing.py.)

The comparisons are exact. Checkpointing (non-reentrant) keeps the autograd graph of the forward and only refills
the tensors it saved by running the block again: the same CPU kernels on the same inputs, in the same order, in
the same process, so the saved tensors, and with them the loss and the gradients, are the same bits. A tolerance
would let a recomputation that differs slightly (a mask of another call) pass.
"""

import pytest
import torch
from helpers import tiny_dit, tiny_mar

from models import GatedModel, flat_blocks, unwrap
from processes import create_process
from tinyfusion.engine import Batch
from tinyfusion.lora import add_lora
from tinyfusion.training import DiffusionTask

# name -> (the model, its N:M groups; MAR's per stack, one of each stack's two blocks kept)
SETUPS = {
    "dit-full": (lambda: tiny_dit(depth=4), "2x1:2"),
    "dit-lora": (lambda: tiny_dit(depth=4), "2x1:2"),
    "mar": (lambda: tiny_mar(), "encoder=1:2 decoder=1:2"),
}


def _gated(setup: str, checkpointing: bool) -> GatedModel:
    """The gated model as learned pruning trains it (tinyfusion.pruning.learned): gates and weight updates,
    LoRA's B randomised so that every adapter gets a gradient (zero-initialised, A would get none)."""
    make, groups = SETUPS[setup]
    gated = GatedModel(make(), groups).train()
    if setup == "dit-lora":
        add_lora(gated.model, rank=2)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in gated.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=g)
    gated.gates.requires_grad_(True)
    gated.model.gradient_checkpointing = checkpointing
    return gated


def _batch(gated: GatedModel, process, seed: int = 0) -> Batch:
    """A training micro-batch of 4 as the loop makes it: data, the process's draws, label dropout, the gate noise.

    The gate noise of the 1:2 groups alternates (0.9 on one option, 0.1 on the other): samples 0 and 2 keep the
    first block of every pair, samples 1 and 3 the second, so every block is both kept and dropped in the batch.
    """
    g = torch.Generator().manual_seed(seed)
    shape = tuple(unwrap(gated).data_shape)
    options = sum(gated.gates.num_options)
    uniform = torch.tensor([[0.9 if (k + b) % 2 == 0 else 0.1 for k in range(options)] for b in range(4)])
    return Batch(x=torch.randn(4, *shape, generator=g), y=torch.tensor([1, 3, 5, 7]),
                 draws=process.draw(g, 4, shape, torch.device("cpu")), drop_ids=torch.tensor([0, 1, 0, 0]),
                 gate_uniform=uniform, step=0)


def _count_block_calls(gated: GatedModel) -> list[int]:
    calls = [0]
    for block in flat_blocks(gated):
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _trained_grads(gated: GatedModel) -> dict:
    return {name: p.grad for name, p in gated.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("setup", SETUPS)
def test_one_learned_pruning_step_is_the_same_with_checkpointing(setup):
    def step(checkpointing):
        gated = _gated(setup, checkpointing)
        process = create_process(type(gated.model).default_process(gated.model.config))
        batch = _batch(gated, process)
        calls = _count_block_calls(gated)
        torch.manual_seed(1)  # whatever a forward draws from torch's global generator, it draws alike
        loss = DiffusionTask(process).loss(gated, batch, total_steps=1)["loss"]  # learned pruning's loss
        loss.backward()
        return loss.detach(), _trained_grads(gated), calls[0], batch

    plain_loss, plain_grads, plain_calls, batch = step(False)
    loss, grads, calls, _ = step(True)
    depth = len(flat_blocks(_gated(setup, False)))
    assert (plain_calls, calls) == (depth, 2 * depth)  # checkpointed: every gated block again in the backward pass
    assert torch.isfinite(plain_loss)
    assert torch.equal(loss, plain_loss)  # exact: see the module's text
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name

    # what the comparison covers: every block kept by some samples and dropped by others, a gradient on every gate
    # logit and on every trained tensor of the blocks
    gates = _gated(setup, False).gates
    mask = gates.sample(4, batch.gate_uniform)
    assert (mask.amax(dim=0) == 1).all() and (mask.amin(dim=0) == 0).all()
    assert all(grads[f"gates.logits.{g}"].abs().max() > 0 for g in range(len(gates.logits)))
    trained = [name for name in grads if not name.startswith("gates.")]
    if setup == "dit-lora":
        assert trained and all(".lora_" in name for name in trained)
    else:
        assert any("blocks.0." in name for name in trained)  # the full weights, the blocks' included
    dead = [name for name in trained if plain_grads[name].abs().max() == 0 and "blocks." in name]
    assert not dead, dead


def test_each_recomputation_is_gated_by_its_own_call():
    """Two gated calls with different masks and an ungated call of the wrapped model, then one backward pass: each
    recomputed block takes the mask of the call that ran it (none for the ungated call), not the latest one."""
    x, t, y = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([5, 500, 900]), \
        torch.tensor([0, 4, 9])
    first = torch.rand(3, 4, generator=torch.Generator().manual_seed(3))  # 2 groups of 2 options
    second = 1 - first  # the opposite Gumbel noise: the other block of each pair

    def step(checkpointing):
        gated = _gated("dit-full", checkpointing)
        outputs = [gated(x, t, y, gate_uniform=first), gated(x, t, y, gate_uniform=second), gated.model(x, t, y)]
        sum(out.square().mean() * (i + 1) for i, out in enumerate(outputs)).backward()
        return [out.detach() for out in outputs], _trained_grads(gated), gated

    plain_outputs, plain_grads, gated = step(False)
    outputs, grads, _ = step(True)
    assert not torch.equal(gated.gates.sample(3, first), gated.gates.sample(3, second))
    assert not torch.equal(plain_outputs[0], plain_outputs[1])
    for out, plain in zip(outputs, plain_outputs):
        assert torch.equal(out, plain)
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name
    assert gated._mask is None  # nothing of a call stays behind


def test_an_eval_pass_under_checkpointing_is_the_pruned_model():
    """With gradients on (e.g. a criterion that differentiates the decided model), a checkpointed eval call gates
    by the argmax mask in the recomputation as in the forward."""
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([2, 6])

    def grads(checkpointing):
        gated = _gated("dit-full", checkpointing).eval()
        with torch.no_grad():
            gated.gates.logits[0].copy_(torch.tensor([0.0, 1.0]))
        gated(x, t, y).square().mean().backward()
        return _trained_grads(gated)

    plain, checkpointed = grads(False), grads(True)
    assert plain["model.blocks.0.attn.qkv.weight"].abs().max() == 0  # block 0 is dropped by the decision
    assert plain["model.blocks.1.attn.qkv.weight"].abs().max() > 0
    assert checkpointed["gates.logits.0"] is None  # the decision is not differentiated
    for name, grad in checkpointed.items():
        assert (grad is None) == (plain[name] is None), name
        if grad is not None:
            assert torch.equal(grad, plain[name]), name
