"""Block stacks: the ordered lists of transformer blocks that depth pruning works on.

A model names its prunable stacks in the class attribute `stacks`, name -> (attribute, config key
of the depth, config key of the per-block widths): DiT and SiT have one stack, "blocks"; MAR has
two, "encoder" and "decoder". Everything that works on blocks (gates, depth surgery, the score
criteria, the distillation layer map, LoRA targets, kept indices) sees the stacks concatenated in
their declared order, so block i of a model has one *flat index*: a single-stack model's flat
indices are its block indices, and MAR's decoder block j is flat index encoder_depth + j.

On the command line a multi-stack model takes either flat indices and groups, or per-stack terms:

    --kept-indices 0 2 4 6                      flat indices (any model)
    --kept-indices encoder=0,2 decoder=1,3      per stack (local indices within each stack)
    --groups 8x1:2                              N:M groups over the concatenated order
    --groups encoder=4x1:2 decoder=4x1:2        groups per stack, each covering its stack
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from tinyfusion.errors import UserError


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself under wrappers that add a capability: layer gates, DDP, torch.compile."""
    while True:
        if hasattr(model, "gates") and isinstance(getattr(model, "model", None), nn.Module):  # GatedModel
            model = model.model
        elif isinstance(getattr(model, "module", None), nn.Module):  # DistributedDataParallel
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def stack_names(model: nn.Module) -> list[str]:
    return list(type(unwrap(model)).stacks)


def block_stacks(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The model's prunable stacks in order: name -> its ModuleList of blocks."""
    inner = unwrap(model)
    return {name: getattr(inner, attr) for name, (attr, _, _) in type(inner).stacks.items()}


def stack_depths(model: nn.Module) -> dict[str, int]:
    return {name: len(blocks) for name, blocks in block_stacks(model).items()}


def flat_blocks(model: nn.Module) -> list[nn.Module]:
    """Every prunable block, the stacks concatenated in order (position = flat index)."""
    return [block for blocks in block_stacks(model).values() for block in blocks]


def total_depth(model: nn.Module) -> int:
    return sum(stack_depths(model).values())


def split_indices(flat: Sequence[int], depths: dict[str, int]) -> dict[str, list[int]]:
    """Flat indices -> each stack's local indices (sorted)."""
    out, offset = {}, 0
    for name, depth in depths.items():
        out[name] = sorted(i - offset for i in flat if offset <= i < offset + depth)
        offset += depth
    return out


def join_indices(per_stack: dict[str, Sequence[int]], depths: dict[str, int]) -> list[int]:
    """Each stack's local indices -> flat indices (sorted), checked against the stack depths."""
    unknown = [name for name in per_stack if name not in depths]
    if unknown:
        raise UserError(f"unknown block stack {unknown[0]!r}; this model's stacks are {', '.join(depths)}")
    flat, offset = [], 0
    for name, depth in depths.items():
        for i in per_stack.get(name, []):
            if not 0 <= i < depth:
                raise UserError(f"block {i} of stack {name!r} is out of range (it has blocks 0 to {depth - 1})")
            flat.append(offset + i)
        offset += depth
    return sorted(flat)


def _stack_terms(tokens: Sequence[str] | str) -> dict[str, str] | None:
    """{"stack": "text"} when the tokens are written per stack (NAME=...), else None."""
    tokens = tokens.split() if isinstance(tokens, str) else list(tokens)
    if not any("=" in t for t in tokens):
        return None
    terms = {}
    for token in tokens:
        name, sep, text = token.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*", name):
            raise UserError(f"cannot read {token!r}: write per-stack terms as STACK=VALUES, e.g. encoder=0,2,4")
        if name in terms:
            raise UserError(f"stack {name!r} is given twice")
        terms[name] = text
    return terms


def parse_stack_indices(tokens: Sequence[str] | str, depths: dict[str, int], flag: str = "--kept-indices"
                        ) -> list[int]:
    """Flat block indices from flat integers (`0 2 4`, `"[0, 2, 4]"`) or per-stack terms (`encoder=0,2`)."""
    terms = _stack_terms(tokens)
    if terms is None:
        return _integers(tokens, flag)
    try:
        return join_indices({name: _integers(text, flag) for name, text in terms.items()}, depths)
    except ValueError as e:
        raise UserError(f"{flag}: {e}") from None


def parse_stack_groups(tokens: Sequence[str] | str, depths: dict[str, int]):
    """N:M groups over the concatenated order, from one layout or from per-stack layouts (`encoder=4x1:2`).

    Per-stack layouts must each cover their stack; the result is their concatenation.
    """
    from .gates import parse_groups

    text = tokens if isinstance(tokens, str) else ",".join(tokens or [])
    if not text.replace(",", "").strip():
        depth = sum(depths.values())
        pairs = f"'{depth // 2}x1:2' (keep one block of each pair) or " if depth % 2 == 0 else ""
        raise UserError(f"--groups is empty: give N:M groups covering all {depth} blocks of the model, e.g. "
                         f"{pairs}'{depth // 2}:{depth}' (one group over all blocks)")
    terms = _stack_terms(tokens)
    if terms is None:
        return parse_groups(text, depth=sum(depths.values()))
    unknown = [name for name in terms if name not in depths]
    if unknown:
        raise UserError(f"--groups: unknown block stack {unknown[0]!r}; this model's stacks are {', '.join(depths)}")
    missing = [name for name in depths if name not in terms]
    if missing:
        raise UserError(f"--groups: give groups for every stack ({', '.join(depths)}); {missing[0]!r} has none")
    groups = []
    for name, depth in depths.items():
        try:
            groups += parse_groups(terms[name], depth=depth)
        except ValueError as e:
            raise UserError(f"--groups {name}=...: {e}") from None
    return groups


def _integers(tokens: Sequence[str] | str, flag: str) -> list[int]:
    text = tokens if isinstance(tokens, str) else " ".join(tokens)
    parts = [p for p in re.split(r"[\s,\[\]]+", text) if p]
    bad = [p for p in parts if not re.fullmatch(r"-?\d+", p)]
    if bad:
        raise UserError(f"{flag}: {bad[0]!r} is not a block index; write integers such as 0 2 4 or \"[0, 2, 4]\"")
    return [int(p) for p in parts]


#################################################################################
#                                Checkpointed blocks                            #
#################################################################################

def checkpoint_block(block: nn.Module, *args) -> torch.Tensor:
    """`block(*args)` with activation checkpointing: its activations are recomputed in the backward pass.

    A family runs the blocks of its stacks through this under `gradient_checkpointing`. The recomputation calls
    the block again, forward hooks included, but in the backward pass, outside whatever context the forward ran
    in. A hook whose result depends on such a context (the gates' mask, set only inside `GatedModel.gating`) has
    a method `recompute_context()`: called here at forward time, it returns a context manager that restores what
    the hook read, and the recomputation runs inside it, so it computes what the forward computed.
    """
    hooks = recompute_hooks(block)
    if not hooks:  # torch's default context: what torch.compile traces (it refuses a context_fn of ours)
        return checkpoint(block, *args, use_reentrant=False)

    def contexts():  # torch calls this once per checkpointed call, at forward time
        return nullcontext(), _entered_together([hook.recompute_context() for hook in hooks])

    return checkpoint(block, *args, use_reentrant=False, context_fn=contexts)


def recompute_hooks(block: nn.Module) -> list:
    """The forward hooks of `block` whose recomputation needs the context of its call (`recompute_context`)."""
    # Forward hooks are kept in the module's `_forward_hooks` (torch has no public accessor); the hooks that
    # qualify are the toolkit's own (models.gates._GateHook).
    return [hook for hook in block._forward_hooks.values() if hasattr(hook, "recompute_context")]


@contextmanager
def _entered_together(contexts: list):
    with ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


#################################################################################
#                                  Block recorder                               #
#################################################################################

class BlockRecorder:
    """Keeps the input and output tokens of chosen blocks during forward passes (forward hooks).

    Use as a context manager, or call `remove()`: the hooks never outlive it.

    Args:
        blocks: the blocks to watch, by index (e.g. `flat_blocks(model)`).
        indices: which of them to record (default: all).
        inputs: also keep each block's input (the first positional argument).
    """

    def __init__(self, blocks: Sequence[nn.Module], indices: Sequence[int] | None = None, inputs: bool = False):
        self.outputs: dict[int, torch.Tensor] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        chosen = range(len(blocks)) if indices is None else sorted(set(indices))
        self._keep_inputs = inputs
        self._handles = [blocks[i].register_forward_hook(_Record(self, i)) for i in chosen]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "BlockRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class _Record:
    """One block's hook; an object (not a closure) so that it names its index in reprs."""

    def __init__(self, recorder: BlockRecorder, index: int):
        self.recorder, self.index = recorder, index

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.recorder.outputs[self.index] = output
        if self.recorder._keep_inputs:
            self.recorder.inputs[self.index] = args[0]
