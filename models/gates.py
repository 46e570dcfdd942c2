"""Learnable N:M layer gates: TinyFusion's differentiable choice of which blocks to keep.

The blocks of a model are split into consecutive groups; group g of M_g blocks keeps N_g of them.
Each group has one logit per option, over all C(M_g, N_g) ways of choosing the kept blocks. In
training every sample draws one option per group with a hard Gumbel-softmax (straight-through
gradients, temperature `tau`, logits multiplied by `scaling`), and a block that is not kept
passes its input through unchanged:

    h_out = m * block(h_in) + (1 - m) * h_in,    m in {0, 1} per sample and block.

In eval mode every sample takes the argmax option, so a gated model whose decision is made
computes exactly what the pruned model (the kept blocks alone) computes.

The gates attach to the model's block stacks (models.stacks, concatenated) through forward hooks,
so the wrapped model's class, forward signature and state-dict keys are untouched.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn as nn

from tinyfusion.errors import UserError

from .stacks import flat_blocks, parse_stack_groups, stack_depths

# C(28, 14) is 40 million options: enumerating a group that large is never what a user means.
MAX_OPTIONS_PER_GROUP = 100_000

Groups = list[tuple[int, int]]


#################################################################################
#                               Group specifications                            #
#################################################################################

def parse_groups(spec: str | Sequence[Sequence[int]], depth: int | None = None) -> Groups:
    """Reads an N:M group layout, from a list of [N, M] pairs or from its compact text form.

    The text form is comma-separated terms `N:M` or `KxN:M` (K repeats of the group), e.g.
    "14x1:2" (28 blocks, keep one of each pair), "7x2:4", "2x7:14", "2x2:4,3:4,...".

    Args:
        spec: the layout, as text or as [[N, M], ...].
        depth: when given, the groups must cover exactly this many blocks.
    Raises:
        UserError: unreadable text, N < 1, N > M, groups that do not cover `depth`, or a group
            with too many options to enumerate.
    """
    if isinstance(spec, str):
        groups: Groups = []
        for term in spec.replace(" ", "").split(","):
            match = re.fullmatch(r"(?:(\d+)[x*])?(\d+):(\d+)", term)
            if match is None:
                raise UserError(
                    f"cannot read the group term {term!r} of {spec!r}: write N:M or KxN:M terms separated "
                    "by commas, e.g. '14x1:2' or '2x2:4,3:4'")
            repeat = int(match.group(1) or 1)
            groups += [(int(match.group(2)), int(match.group(3)))] * repeat
    else:
        groups = []
        for pair in spec:
            if len(pair) != 2:
                raise UserError(f"each group is a pair [N, M]; got {list(pair)!r}")
            groups.append((int(pair[0]), int(pair[1])))
    if not groups:
        raise UserError("the group layout is empty: give at least one N:M group")
    for i, (n, m) in enumerate(groups):
        if n < 1:
            raise UserError(f"group {i} keeps N={n} of M={m} blocks: every group must keep at least one block")
        if n > m:
            raise UserError(f"group {i} keeps N={n} of M={m} blocks: N cannot exceed M")
        if math.comb(m, n) > MAX_OPTIONS_PER_GROUP:
            raise UserError(
                f"group {i} ({n}:{m}) has C({m},{n}) = {math.comb(m, n):,} options, more than the "
                f"{MAX_OPTIONS_PER_GROUP:,} that can be enumerated; split it into smaller groups")
    covered = sum(m for _, m in groups)
    if depth is not None and covered != depth:
        raise UserError(
            f"the groups {format_groups(groups)} cover {covered} blocks but the model has {depth}; "
            f"choose groups whose sizes M add up to {depth}")
    return groups


def format_groups(groups: Groups) -> str:
    """The compact text form of a layout, repeats folded: [(1, 2)] * 14 -> '14x1:2'."""
    terms = []
    for (n, m), run in itertools.groupby(groups):
        k = len(list(run))
        terms.append(f"{k}x{n}:{m}" if k > 1 else f"{n}:{m}")
    return ",".join(terms)


def kept_depth(groups: Groups) -> int:
    return sum(n for n, _ in groups)


#################################################################################
#                                   Layer gates                                 #
#################################################################################

class LayerGates(nn.Module):
    """Per-group logits over all N-of-M options, and their per-sample hard Gumbel-softmax draws."""

    def __init__(self, groups: Groups):
        super().__init__()
        self.groups = list(groups)
        self.logits = nn.ParameterList()
        for g, (n, m) in enumerate(self.groups):
            options = torch.zeros(math.comb(m, n), m)  # (K, M), one row per choice of kept blocks
            for k, kept in enumerate(itertools.combinations(range(m), n)):
                options[k, list(kept)] = 1.0
            self.register_buffer(f"options_{g}", options)
            # Uniform start: no option is preferred before training.
            self.logits.append(nn.Parameter(torch.zeros(len(options))))
        self.tau = 1.0
        self.scaling = 1.0

    @property
    def depth(self) -> int:
        return sum(m for _, m in self.groups)

    @property
    def num_options(self) -> list[int]:
        return [len(p) for p in self.logits]

    def options(self, g: int) -> torch.Tensor:
        return getattr(self, f"options_{g}")

    def sample(self, batch_size: int, uniform: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample block masks (B, depth), hard 0/1 values with straight-through gradients.

        Args:
            batch_size: number of samples B.
            uniform: optional (B, sum K) uniform(0, 1) draws, one per option; passing them makes
                the draw a function of the caller's randomness (e.g. one seed per global batch).
        """
        if uniform is None:
            uniform = torch.rand(batch_size, sum(self.num_options), device=self.logits[0].device)
        # Gumbel(0, 1) noise; the clamp keeps log() finite at the ends of the interval.
        eps = torch.finfo(uniform.dtype).tiny
        gumbel = -torch.log(-torch.log(uniform.clamp(eps, 1.0 - 1e-7)))
        masks, start = [], 0
        for g, logit in enumerate(self.logits):
            k = len(logit)
            scores = (logit * self.scaling + gumbel[:, start:start + k]) / self.tau  # (B, K)
            start += k
            soft = scores.softmax(dim=-1)
            hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
            choice = hard - soft.detach() + soft  # straight-through estimator
            masks.append(choice @ self.options(g))  # (B, M_g)
        return torch.cat(masks, dim=1)  # (B, depth)

    def argmax_mask(self) -> torch.Tensor:
        """The decided mask (depth,): the most likely option of every group."""
        return torch.cat([self.options(g)[logit.argmax()] for g, logit in enumerate(self.logits)])

    @torch.no_grad()
    def decisions(self) -> dict:
        """The current decision: kept block indices, the option of each group and its confidence.

        The confidence of a group is the probability that a Gumbel draw picks its argmax option,
        softmax(scaling * logits)[argmax] (the Gumbel-max property: independent of tau).
        """
        kept, options, confidence, offset = [], [], [], 0
        for g, logit in enumerate(self.logits):
            probs = (logit.float() * self.scaling).softmax(dim=-1)
            best = int(probs.argmax())
            chosen = self.options(g)[best].nonzero().flatten().tolist()
            kept += [offset + i for i in chosen]
            options.append(best)
            confidence.append(float(probs[best]))
            offset += self.groups[g][1]
        return {"kept_indices": kept, "options": options, "confidence": confidence}


class GatedModel(nn.Module):
    """Wraps a model and puts learnable N:M gates over its prunable blocks (every stack, concatenated).

    Args:
        model: a registry model (it names its block stacks, see models.stacks); each block takes the
            token tensor as its first argument and returns a tensor of the same shape.
        groups: the N:M layout over the concatenated blocks (see `parse_groups`, and
            `models.stacks.parse_stack_groups` for per-stack layouts), covering every block.

    The gates act through forward hooks on the blocks; `release()` removes them and returns the
    wrapped model as it was.
    """

    def __init__(self, model: nn.Module, groups: str | Sequence[Sequence[int]]):
        super().__init__()
        self.model = model
        blocks = flat_blocks(model)
        self.gates = LayerGates(parse_stack_groups(groups, stack_depths(model)) if isinstance(groups, str)
                                else parse_groups(groups, depth=len(blocks)))
        self._mask: torch.Tensor | None = None  # (B, depth) during a gated call and its recomputations, else None
        self._handles = self._attach()
        self._released = False  # a bool, not the handles, is what a call checks: torch.compile can read it

    def _attach(self) -> list:
        return [block.register_forward_hook(_GateHook(self, index)) for index, block in enumerate(flat_blocks(self))]

    def __deepcopy__(self, memo):
        # The copy's hooks must gate the copy's blocks with the copy's gates: copy the bare model, then gate it.
        for handle in self._handles:
            handle.remove()
        try:
            model = copy.deepcopy(self.model, memo)
        finally:
            self._handles = self._attach()
        copied = GatedModel(model, self.gates.groups)
        copied.gates = copy.deepcopy(self.gates, memo)
        copied.train(self.training)
        memo[id(self)] = copied
        return copied

    def release(self) -> nn.Module:
        """Removes the gate hooks from the wrapped model and returns it; this wrapper is unusable after."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._released = True
        return self.model

    @property
    def config(self) -> dict:
        return self.model.config

    @property
    def arch(self) -> str:
        return self.model.arch

    @contextmanager
    def gating(self, batch_size: int, uniform: torch.Tensor | None = None):
        """Within this context, every call of the wrapped model's blocks is gated.

        A block the wrapped model checkpoints (`gradient_checkpointing`, through `models.stacks.checkpoint_block`)
        is recomputed in the backward pass, after this context has ended: its hook hands the mask of the call to
        the recomputation (`_GateHook.recompute_context`), so the recomputed block is gated alike.
        """
        if self._released:
            raise RuntimeError("the gates were released from this model")
        if self.training:
            mask = self.gates.sample(batch_size, uniform)
        else:
            mask = self.gates.argmax_mask().unsqueeze(0).expand(batch_size, -1)
        with self._gated_by(mask):
            yield mask

    @contextmanager
    def _gated_by(self, mask: torch.Tensor | None):
        """The blocks' hooks gate with `mask` (B, depth) within this context; what gated before comes back after."""
        previous, self._mask = self._mask, mask
        try:
            yield
        finally:
            self._mask = previous

    def forward(self, x: torch.Tensor, *args, gate_uniform: torch.Tensor | None = None, **kwargs):
        """The wrapped model's forward with gated blocks; `gate_uniform` as in `LayerGates.sample`."""
        with self.gating(x.shape[0], gate_uniform):
            return self.model(x, *args, **kwargs)

    def forward_with_cfg(self, x: torch.Tensor, *args, **kwargs):
        with self.gating(x.shape[0]):
            return self.model.forward_with_cfg(x, *args, **kwargs)

    def decisions(self) -> dict:
        return self.gates.decisions()


class _GateHook:
    """The forward hook of block `index`: h_out = m * block(h_in) + (1 - m) * h_in."""

    def __init__(self, owner: GatedModel, index: int):
        self.owner, self.index = owner, index

    def __deepcopy__(self, memo):
        raise RuntimeError("a gated block cannot be deep-copied alone: copy the GatedModel, or release() its gates")

    def recompute_context(self):
        """The context a checkpointed recomputation of the block runs in (`models.stacks.checkpoint_block` calls
        this when the block is called): gated by the mask of this call, the very tensor, so the recomputation
        computes what the call computed, and ungated when the call was."""
        return self.owner._gated_by(self.owner._mask)

    def __call__(self, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        mask = self.owner._mask
        if mask is None:
            return output
        m = mask[:, self.index].view(-1, *([1] * (output.dim() - 1))).to(output.dtype)
        return m * output + (1 - m) * args[0]
