"""torch.compile of what runs at every step: one graph, or an error; never a silent fallback to eager code.

The library compiles (`--compile` of sample.py, sample_ddp.py, train.py, train_masked_kd.py and
prune_by_learning.py) one function per run, traced whole:
- sampling: the samplers' denoiser (`tinyfusion.sampling.make_denoiser`): the model's forward, or with guidance
  `forward_with_cfg` on the doubled batch and the guided mix, under autocast;
- training: the trained model's forward (`tinyfusion.engine.Trainer`: `CompiledModel`), gates, LoRA and the
  recorded blocks of Masked KD included; under DDP, DDP wraps the compiled model (DDP's own forward does not
  trace as one graph).

torch falls back to running Python eagerly, without a word, in three places; each is closed here:
- a graph break (code dynamo cannot trace): compiled with `fullgraph=True`, dynamo raises instead, and
  `CompiledCall` turns that into a one-line `UserError` naming `--compile` and where the break is;
- the recompile limit: a call whose guards fail (another input shape, a float that changes, such as the gates'
  annealed temperature) compiles again; shapes are dynamic after the first change (torch's automatic dynamic
  shapes), so a run sees a few graphs, and past dynamo's recompile limit torch would run the function eagerly:
  `fail_at_recompile_limit` raises the limit above what a run sees and makes reaching it an error;
- `suppress_errors` (TORCHDYNAMO_SUPPRESS_ERRORS=1) turns any compile error into eager code: refused.

What cannot be compiled is refused before any work, in one line (`compile_refusal`): a family that says why in
its class attribute `not_compilable` (MAR: data-dependent shapes), and gated blocks under gradient checkpointing
(their recomputation runs in a context of ours, `models.stacks.checkpoint_block`, which dynamo does not trace).
"""

from __future__ import annotations

import re
import time
from typing import Callable

import torch
import torch.nn as nn

from tinyfusion.errors import UserError

from .stacks import flat_blocks, recompute_hooks, unwrap

BACKENDS = ("inductor", "aot_eager", "eager")
# Graphs of one compiled function: a run sees one per input shape and mode (a static first graph, a dynamic one
# after a shape or float changes, training and eval), a few; a process that compiles several models or sampling
# settings (a benchmark) has a budget per model (dynamo counts the graphs guarded on the same object).
RECOMPILE_LIMIT = 64
MODE = "default"  # torch.compile's mode, its default (the log line names it)


def fail_at_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """dynamo's recompile limit raised to at least `limit`, and reaching it an error (torch's default is to run the
    function eagerly from then on, silently)."""
    import torch._dynamo.config as dynamo_config

    # torch 2.7 renamed cache_size_limit to recompile_limit (requirements.txt allows torch from 2.5).
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))
    for fail in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(dynamo_config, fail):
            setattr(dynamo_config, fail, True)
            break


def compile_refusal(model: nn.Module) -> str | None:
    """Why `model` (under its wrappers) cannot be compiled as one graph, and what to do, or None when it can."""
    inner = unwrap(model)
    reason = getattr(type(inner), "not_compilable", None)
    if reason:
        return reason
    checkpointed = getattr(inner, "gradient_checkpointing", False) and hasattr(type(inner), "stacks")
    if checkpointed and any(recompute_hooks(block) for block in flat_blocks(model)):
        return ("gated blocks under --grad-checkpointing are recomputed in a context that restores their call's mask "
                "(models.stacks.checkpoint_block), which torch.compile cannot trace; drop --grad-checkpointing or "
                "--compile")
    return None


def check_compilable(model: nn.Module, backend: str) -> None:
    """Refuses, in one line, a backend that is not known, a model that cannot be compiled as one graph, or a dynamo
    configured to fall back to eager code on errors.

    Raises:
        UserError: naming --compile and why.
    """
    import torch._dynamo.config as dynamo_config

    if backend not in BACKENDS:
        raise UserError(f"--compile-backend {backend!r} is not one of {', '.join(BACKENDS)}")
    reason = compile_refusal(model)
    if reason:
        raise UserError(f"--compile: {reason}")
    if dynamo_config.suppress_errors:
        raise UserError("--compile: TORCHDYNAMO_SUPPRESS_ERRORS is set, which runs eager code wherever compiling "
                         "fails; unset it, or run without --compile")


class CompiledCall:
    """`fn` compiled whole (`fullgraph=True`, the recompile limit an error), called like `fn`.

    The first call compiles; it then logs one line through `log`: what was compiled, the backend and mode, and the
    wall time of that first call (tracing and code generation of the forward; a training run's backward compiles at
    its first backward pass). `first_call_seconds` keeps that time. A graph break, the recompile limit or a backend
    that fails (inductor without a C++ compiler) is raised as a one-line `UserError`.

    Args:
        fn: the function (a closure over the model).
        model: the model `fn` runs (`check_compilable` refuses it, or the backend, before anything is compiled).
        backend: "inductor" (generates code), "aot_eager" (traces forward and backward, no code generation) or
            "eager" (traces only): the last two check that a model compiles, cheaply.
        what: names what `fn` runs, for the log and the errors ("the DiT's sampling step (forward_with_cfg)").
        log: where the line goes (e.g. a logger's `info`); None: nowhere.
    """

    def __init__(self, fn: Callable, *, model: nn.Module, backend: str, what: str,
                 log: Callable[[str], None] | None = None):
        check_compilable(model, backend)
        fail_at_recompile_limit()
        self.what, self.backend, self.log = what, backend, log
        self.first_call_seconds: float | None = None
        self._compiled = torch.compile(fn, fullgraph=True, backend=backend)  # mode: torch's default

    def __call__(self, *args, **kwargs):
        import torch._dynamo.exc as dynamo_exc

        # torch before 2.7 named it FailOnCacheLimitHit (as the config, see fail_at_recompile_limit)
        limit_hit = tuple(getattr(dynamo_exc, name) for name in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
                          if hasattr(dynamo_exc, name))
        start = time.perf_counter() if self.first_call_seconds is None else None
        try:
            out = self._compiled(*args, **kwargs)
        except limit_hit as e:
            raise UserError(f"--compile: {self.what} needed more than {RECOMPILE_LIMIT} graphs (its inputs' shapes or "
                             "constants keep changing); run without --compile") from e
        except dynamo_exc.Unsupported as e:
            raise UserError(f"--compile: {self.what} does not compile as one graph ({_graph_break(e)}); run without "
                             "--compile") from e
        except dynamo_exc.BackendCompilerFailed as e:
            raise UserError(f"--compile-backend {self.backend} failed on {self.what} ({_first_line(e)}); try "
                             "--compile-backend aot_eager, or run without --compile") from e
        if start is not None:
            self.first_call_seconds = time.perf_counter() - start
            if self.log is not None:
                self.log(f"torch.compile: {self.what}, backend {self.backend}, mode {MODE}, one graph (fullgraph); "
                         f"first call {self.first_call_seconds:.1f} s")
        return out


class CompiledModel(nn.Module):
    """A model whose calls run compiled (`CompiledCall` over `model(...)`): what DDP wraps and the training loop calls.

    The model is its submodule `_orig_mod` (torch.compile's name, which `models.unwrap` and the checkpoint loader see
    through): its parameters, state-dict keys and attributes are the model's own.
    """

    def __init__(self, model: nn.Module, *, backend: str, what: str, log: Callable[[str], None] | None = None):
        super().__init__()
        self._orig_mod = model
        self.call = CompiledCall(lambda *args, **kwargs: model(*args, **kwargs), model=model, backend=backend,
                                 what=what, log=log)

    def forward(self, *args, **kwargs):
        return self.call(*args, **kwargs)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _graph_break(error: Exception) -> str:
    """One line of a graph break: dynamo's explanation and the last line of the user's code it reached."""
    text = str(error)
    explanation = re.search(r"Explanation: (.+)", text)
    where = re.findall(r'File "([^"]+)", line (\d+)', text.split("from user code:", 1)[-1])
    found = explanation.group(1).strip() if explanation else _first_line(error)
    return f"{found}, at {where[-1][0]}:{where[-1][1]}" if where else found
