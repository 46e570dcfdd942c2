"""Measuring speed and memory: forward latency, sampling throughput and training-step cost.

Timings synchronise CUDA around every measured call, discard warm-up calls (autotuning, lazy
initialisation, torch.compile) and report the median. Ideal speedups come from FLOPs counted by
torch's FlopCounterMode on one call of a single image (FLOPs grow linearly with the batch), attention
included (`forward_flops`). How close a forward runs to the hardware is its FLOPs per second over the
device's measured matmul peak in its precision (`matmul_peak`), and where its time goes is read from
torch's profiler (`profile_shares`: matmul and attention kernels against the rest).

A model's forward is what training and the samplers call: a denoiser's model(x_t, t, y); a masked-token
model's (MAR) call through its process (the encoder on the visible tokens, the decoder, the diffusion
MLP on the copies of every token).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import functools
import gc
import itertools
import logging
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from models import (
    GatedModel,
    block_units,
    build_architecture,
    create_model,
    prune_depth,
    prune_width,
    total_depth,
    unwrap,
)
from models.attention import attention_modules, flex_block_mask, pooled_grid, resolve_path, tile_layout
from models.compiling import CompiledModel, check_compilable
from processes import NoiseProcess, create_process
from tinyfusion.args import positive_int
from tinyfusion.checkpoint import LoadedModel, load_model
from tinyfusion.distributed import DistEnv
from tinyfusion.engine import TrainConfig, Trainer
from tinyfusion.errors import UserError
from tinyfusion.features import FeatureDataset, write_index, write_shard
from tinyfusion.fileio import atomic_write_json
from tinyfusion.kd import MaskedKDTask
from tinyfusion.lora import add_lora, trainable_fraction
from tinyfusion.paths import check_outputs
from tinyfusion.precision import DTYPES, autocast, for_inference, inference_context
from tinyfusion.pruning import LearnedPruningTask
from tinyfusion.pruning.width import units_removed
from tinyfusion.sampling import SamplingSpec, image_seeds, make_denoiser, sample_latents
from tinyfusion.training import DiffusionTask, parameter_count
from tinyfusion.vae import LatentCodec, is_kl16_spec, load_codec, resolve_codec

#################################################################################
#                                     Timing                                    #
#################################################################################


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(fns: Sequence[Callable[[], object]], device: torch.device, warmup: int, repeats: int
                     ) -> list[tuple[list[float], dict]]:
    """Seconds of `repeats` calls of each fn, the fns taking turns (A B C A B C ...) after `warmup`
    untimed calls of each, so that a host whose speed drifts (shared machines, thermal limits)
    slows every fn alike and the ratios stay fair. Also each fn's peak memory (see `peak_memory`).
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    memory: list[dict] = [{} for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            with peak_memory(device) as mem:
                times[i] += time_call(fn, device, 0, 1)
            if mem["peak_mib"] >= memory[i].get("peak_mib", -1.0):
                memory[i] = mem
    return list(zip(times, memory))


@contextlib.contextmanager
def peak_memory(device: torch.device, reset: bool = False):
    """Yields a dict that holds, on exit, "peak_mib": CUDA's peak allocation during the block, or on
    CPU the process's resident-set high-water mark, and "memory", which of them it is.

    On CPU the mark only grows (the largest so far) unless `reset`: then, on Linux, it is first brought
    down to what the process holds now (`_reset_rss_peak`), so the peak is the block's own plus what was
    already resident (the libraries, the models alive), not an earlier block's. Where that is refused the
    mark stays cumulative, and "memory" says so. With `reset`, "start_mib" is what was allocated (CUDA) or
    resident (CPU) when the block began: the block's own memory is the difference.
    """
    out: dict = {}
    if reset:
        gc.collect()  # what an earlier block left in reference cycles is not this block's
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        if reset:
            out["start_mib"] = torch.cuda.memory_allocated(device) / 2**20
    own = device.type != "cuda" and reset and _reset_rss_peak()
    if own:
        out["start_mib"] = _rss_peak_kib() / 1024  # just reset: the resident set now
    try:
        yield out
    finally:
        if device.type == "cuda":
            out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            out["memory"] = "cuda peak allocated"
        elif own:
            out["peak_mib"] = _rss_peak_kib() / 1024
            out["memory"] = "process peak RSS, reset at the start"
        else:
            out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
            out["memory"] = "process peak RSS"


def _reset_rss_peak() -> bool:
    """Linux: the process's peak RSS (VmHWM) set to its RSS now. Memory freed before is handed back to the
    system first (glibc's malloc_trim): the allocator keeps freed pages resident, and they would be counted
    in the next peak. False where /proc/self/clear_refs is refused (another system, a locked-down container)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim, the reset still helps
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # proc(5): "5" resets the peak RSS to the current RSS (Linux 4.0+)
    except OSError:
        return False
    return _rss_peak_kib() > 0


def _rss_peak_kib() -> int:
    """VmHWM of /proc/self/status, the mark clear_refs resets (getrusage's ru_maxrss also keeps the peaks of
    exited threads, which the reset does not clear); 0 where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def matmul_peak(device: torch.device, precisions: Sequence[str], size: int, warmup: int, repeats: int) -> dict:
    """The device's measured matmul throughput in each precision: GFLOP/s (2 FLOPs per multiply-add) of a
    `size` x `size` by `size` x `size` product in the precision's dtype (bf16, fp16: both operands in it, the
    GEMMs autocast runs), the fastest of `repeats` calls after `warmup` (a peak: whatever else runs on the
    machine only slows a call). A square GEMM of a few thousand is compute bound on CPUs and GPUs alike.

    The product is nn.Linear's, x W^T with W stored (out, in), because that layout picks the kernel: on a CPU
    without bf16 vector units, torch.mm of two row-major bf16 matrices falls back to a loop 5-7x slower than the
    oneDNN kernel the models' linears reach (measured, AVX2). CUDA fp32 runs as the models' fp32 does: TF32 at
    torch's defaults (off for matmuls)."""
    g = torch.Generator().manual_seed(0)
    peaks = {}
    for precision in precisions:
        x, w = (torch.randn(size, size, generator=g).to(device, DTYPES[precision]) for _ in range(2))
        seconds = min(time_call(lambda x=x, w=w: F.linear(x, w), device, warmup, repeats))
        peaks[precision] = 2 * size**3 / seconds / 1e9
    return peaks


def peak_precisions(device: torch.device, asked: Sequence[str]) -> list[str]:
    """The precisions whose matmul peak is measured: fp32 and bf16 (where the device runs bf16), fp16 on CUDA,
    and any other precision the rows run in."""
    measured = ["fp32"]
    if device.type != "cuda" or torch.cuda.is_bf16_supported():
        measured.append("bf16")
    if device.type == "cuda":
        measured.append("fp16")
    return measured + [p for p in asked if p not in measured]


def peak_text(peak: dict[str, float], size: int, repeats: int) -> str:
    """The line that reports the peak: "matmul peak (2048^3 GEMM, fastest of 3 calls): fp32 95.1, bf16 12.3
    GFLOP/s"."""
    values = ", ".join(f"{precision} {gflops:.4g}" for precision, gflops in peak.items())
    return f"matmul peak ({size}^3 GEMM, fastest of {repeats} calls): {values} GFLOP/s"


# Timed GEMMs of the peak, at most (fewer with --repeats): its fastest call is the peak, and on a CPU without bf16
# vector units one bf16 call of 2048 takes seconds.
PEAK_CALLS = 3


def default_peak_size(device: torch.device) -> int:
    """8192 on GPUs (smaller products leave an H100's tensor cores idle part of the time); 2048 on CPUs, where
    its 17 GFLOP per call are compute bound on any core count and take seconds, not minutes, where bf16 has no
    vector units (an emulated bf16 GEMM runs at a fraction of fp32's speed)."""
    return 8192 if device.type == "cuda" else 2048


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), its logical CPUs, and the vector units bf16 runs on."""
    name = platform.processor() or platform.machine()
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if flags and name:
                    break
    except OSError:
        pass
    units = [u for u in ("avx512_bf16", "amx_bf16") if u in flags] if flags else []
    bf16 = (", bf16: " + " ".join(units) if units else ", no bf16 vector units") if flags else ""
    return f"{name} ({os.cpu_count()} logical CPUs{bf16})"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


#################################################################################
#                                     FLOPs                                     #
#################################################################################

def attention_flops(queries: int, keys: float, heads: int, head_dim: int, batch: int = 1) -> float:
    """q k^T and the weighted sum of v: 2 * 2 * keys * head_dim per query and head (FLOPs, not multiply-adds)."""
    return 4.0 * batch * heads * head_dim * queries * keys


def attention_path_work(spec: dict, grid: tuple[int, int], path: str, device: torch.device) -> tuple[int, float]:
    """(queries computed, keys per query) of an attention kind on a path (models/attention.py): global and dense
    attend every query to all T keys; tiled computes its tiles' queries (padding included) over each tile's window;
    flex the query rows of its unmasked 128 x 128 blocks. Local attention's pooled keys (pool > 1) are read by
    every query on every path."""
    T = grid[0] * grid[1]
    if spec["kind"] == "global":
        return T, float(T)
    pooled = math.prod(pooled_grid(grid, spec["pool"])) if spec["pool"] > 1 else 0
    if path == "dense":
        return T, float(T + pooled)
    if path == "tiled":
        tile, h, n_rows, n_cols = tile_layout(grid, spec["radius"])
        return n_rows * n_cols * tile * tile, float((tile + 2 * h) ** 2 + pooled)
    # the block mask is the same data on every device; the meta device holds no values to count
    block_mask = flex_block_mask(grid, spec["radius"], spec["pool"],
                                 torch.device("cpu") if torch.device(device).type == "meta" else device)
    blocks = int(block_mask.kv_num_blocks.sum()) + int(block_mask.full_kv_num_blocks.sum()
                                                       if block_mask.full_kv_num_blocks is not None else 0)
    q_block, kv_block = block_mask.BLOCK_SIZE
    return T, blocks * q_block * kv_block / T


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Every (query, key) pair of q k^T and of the weighting of v, as torch counts its CUDA attention kernels."""
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = value_shape[-2:]
    return 2 * batch * heads * queries * keys * (head_dim + value_dim)


# torch's counter has formulas for SDPA's CUDA kernels (and on the meta device counts the bmm calls of its math
# path), but none for its CPU kernel: without this, attention would count 0 FLOPs on CPU.
_ATTENTION_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def forward_flops(call: Callable[[], object], model: nn.Module | None = None) -> int:
    """FLOPs (2 per multiply-add) of one call, counted by running it, attention included on every device: what
    each attention's path computes (`attention_path_work`), as the matmuls count what they compute.

    FlexAttention does not run under torch's counter (it raises inside it), so while counting, the attentions of
    `model` on that path (the CUDA default for local attention) run the dense path, and each call's dense count
    is replaced by the count of its unmasked blocks. Without `model`, a call through FlexAttention fails.
    """
    flex = [m for m in (attention_modules(model) if model is not None else [])
            if resolve_path(m.kind, _device_of(m), m.path, m.grid) == "flex"]
    calls: list[tuple[nn.Module, int]] = []  # (attention, batch) of each call on the flex path

    def record(module, args):
        calls.append((module, args[0].shape[0]))

    hooks = [m.register_forward_pre_hook(record) for m in flex]  # removed below: they live for this count only
    paths = [m.path for m in flex]
    try:
        for m in flex:
            m.path = "dense"
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_ATTENTION_FORMULAS) as counter:
            call()
    finally:
        for m, path, hook in zip(flex, paths, hooks):
            m.path = path
            hook.remove()
    flops = float(counter.get_total_flops())
    for m, batch in calls:
        device = _device_of(m)
        queries, keys = attention_path_work(m.kind, m.grid, "flex", device)
        dense_queries, dense_keys = attention_path_work(m.kind, m.grid, "dense", device)
        flops += (attention_flops(queries, keys, m.num_heads, m.head_dim, batch)
                  - attention_flops(dense_queries, dense_keys, m.num_heads, m.head_dim, batch))
    return round(flops)


#################################################################################
#                                    Profile                                    #
#################################################################################

# The profiler's op names counted as matmul. Times are self times (an op's time less its children's):
# aten::linear and aten::matmul run aten::addmm, aten::mm or aten::bmm as child ops, so inclusive times would
# count a product twice; the wrappers' own time (dispatch, reshapes) counts with the products.
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
                        "aten::_addmm_activation", "aten::mkldnn_linear", "aten::_scaled_mm", "aten::matmul",
                        "aten::linear", "aten::einsum",
                        # oneDNN's linear with its activation in the epilogue (the inference path's MLPs on CPU,
                        # and what inductor emits for linear + GELU): the activation rides in the product's
                        # output pass, so the op counts as matmul
                        "mkldnn::_linear_pointwise"})
# Attention: every op whose name holds this: SDPA and the kernels it dispatches to
# (aten::scaled_dot_product_attention, aten::_scaled_dot_product_flash_attention_for_cpu, the CUDA
# aten::_scaled_dot_product_{flash,efficient,cudnn}_attention and aten::_{flash,efficient}_attention_forward),
# and FlexAttention's flex_attention. SDPA's math fallback runs its products and softmax as ops of their own,
# which count as matmul and other.
ATTENTION_OP = "attention"


def op_class(name: str) -> str:
    """"matmul", "attention" or "other" (see MATMUL_OPS and ATTENTION_OP)."""
    if name in MATMUL_OPS:
        return "matmul"
    return "attention" if ATTENTION_OP in name else "other"


def profile_shares(fn: Callable[[], object], device: torch.device, top: int = 8) -> dict:
    """Where one call of fn spends the device's time, from torch's profiler: the shares of the matmul ops, the
    attention ops, both together, and the rest ("other"), and the `top` other ops by share.

    The time is each op's self time on the device: on CPU its self CPU time (intra-op threads included, as they
    run inside the op's call); on CUDA the kernels it launched itself, and kernels launched outside any op count
    as "(no op)". matmul + attention + other = 1.
    """
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    times: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CPU:  # on CUDA, kernels are counted through the op that launched them
            times[event.name] = times.get(event.name, 0.0) + (
                event.self_device_time_total if cuda else event.self_cpu_time_total)
    if cuda:
        kernels = sum(e.self_device_time_total for e in prof.events()  # kernels, copies (not the annotations' spans)
                      if e.device_type != DeviceType.CPU and not e.is_user_annotation)
        times["(no op)"] = max(kernels - sum(times.values()), 0.0)
    total = sum(times.values()) or 1.0
    shares = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, t in times.items():
        shares[op_class(name)] += t / total
    others = sorted(((name, t / total) for name, t in times.items() if op_class(name) == "other" and t > 0),
                    key=lambda item: -item[1])
    return {"matmul_share": shares["matmul"], "attention_share": shares["attention"],
            "matmul_attention_share": shares["matmul"] + shares["attention"], "other_share": shares["other"],
            "profile": {"timer": "self CUDA time" if cuda else "self CPU time", "profiled_ms": total / 1e3,
                        "top_other": [{"op": name, "share": share} for name, share in others[:top]]}}


#################################################################################
#                                  Models to time                               #
#################################################################################

@dataclasses.dataclass
class BenchModel:
    """A model to time: `process` is the record of its noise process (what a checkpoint stores; for a
    registry model, its family's default process)."""

    name: str
    model: nn.Module
    arch: str
    config: dict
    process: dict
    codec: dict | None = None  # what a checkpoint records of its codec; None: a registry model's (random weights)


def default_process_record(model: nn.Module) -> dict:
    """The record of the default noise process of a model's family (registry models record none)."""
    inner = unwrap(model)
    return create_process(type(inner).default_process(inner.config)).record()


def bench_model(spec: str, input_size: int, device: torch.device, num_classes: int = 1000) -> BenchModel:
    """A registry name (random weights: speed does not depend on them), a registry name narrowed by width pruning,
    `NAME@width=R` (the fraction R of every block's heads and MLP channels removed, as prune_by_score.py
    --width-ratio R does), or a checkpoint path (timed on the noise process the file records)."""
    if Path(spec).is_file():
        loaded: LoadedModel = load_model(spec)
        return BenchModel(spec, loaded.model.to(device).eval(), loaded.arch, loaded.config, loaded.process,
                          codec=loaded.codec)
    name, _, width = spec.partition("@width=")
    model = create_model(name, input_size=input_size, num_classes=num_classes)
    if isinstance(model, GatedModel):
        raise UserError(f"{spec} is a gated training preset; time its base model or a pruned checkpoint")
    if width:
        model = _narrowed(model, spec, width)
    return BenchModel(spec, model.to(device).eval(), model.arch, dict(model.config), default_process_record(model))


def _narrowed(model: nn.Module, spec: str, width: str) -> nn.Module:
    """`model` with the fraction `width` of every block's heads and MLP channels removed (the first ones kept: the
    weights are random)."""
    try:
        ratio = float(width)
    except ValueError:
        ratio = -1.0
    if not 0.0 < ratio < 1.0:
        raise UserError(f"--models {spec}: write the width ratio as a number between 0 and 1, e.g. "
                         "DiT-XL/2@width=0.5")
    units = block_units(model)
    return prune_width(model, [range(h - units_removed(h, ratio)) for h, _ in units],
                       [range(c - units_removed(c, ratio)) for _, c in units])


def forward_call(bm: "BenchModel", batch_size: int, device: torch.device) -> Callable[[], object]:
    """One forward of `bm` on a random batch of `batch_size` (see the module's docstring)."""
    g = torch.Generator().manual_seed(0)
    inner = unwrap(bm.model)
    process = create_process(bm.process)
    x = torch.randn(batch_size, *inner.data_shape, generator=g).to(device)
    y = torch.randint(0, inner.num_classes, (batch_size,), generator=g).to(device)
    draws = {k: v.to(device) for k, v in process.draw(g, batch_size, inner.data_shape, torch.device("cpu")).items()}
    if process.drives_model:
        return lambda: process.predict(bm.model, x, draws, {"y": y})
    x_t, t = process.model_input(x, draws)
    return lambda: bm.model(x_t, t, y)


#################################################################################
#                                   Benchmarks                                  #
#################################################################################

def bench_forward(models: Sequence[BenchModel], batch_sizes: Sequence[int], precisions: Sequence[str],
                  compile_modes: Sequence[bool], device: torch.device, warmup: int, repeats: int,
                  log: logging.Logger, peak: dict[str, float] | None = None,
                  paths: Sequence[str] = ("held",), compile_backend: str = "inductor") -> list[dict]:
    """Forward latency and throughput of every (model, batch size, precision, path, compile) combination.

    A low precision runs on each of `paths`: "held", the inference path the sampling scripts take (the blocks'
    weights held once in the precision, `tinyfusion.precision.for_inference`), and "autocast", float32 weights cast
    on every call (how training runs). The first model is the baseline of the speedup columns (measured, and ideal
    from FLOPs). The models of one setting are timed in turns (`time_interleaved`), so their ratios are fair. Each
    row has its FLOPs per second, their fraction of `peak` (`matmul_peak`: GFLOP/s per precision) in the row's
    precision where given, and the shares of its time (`profile_shares`) from one more call under the profiler. A
    compiled row's model is compiled as --compile compiles it (`models.compiling.CompiledModel`: one graph,
    `compile_backend`), in the warm-up calls.
    """
    per_image = [forward_flops(forward_call(bm, 1, device), bm.model) for bm in models]
    settings = [(precision, path) for precision in precisions
                for path in (["fp32"] if precision == "fp32" else paths)]
    rows = []
    for compiled in compile_modes:
        for precision, path in settings:
            for batch_size in batch_sizes:
                calls = []
                for bm in models:
                    model = for_inference(copy.deepcopy(bm.model), precision) if path == "held" else bm.model
                    fn = CompiledModel(model, backend=compile_backend, what=f"{bm.name}'s forward",
                                       log=log.info) if compiled else model
                    call = forward_call(dataclasses.replace(bm, model=fn), batch_size, device)

                    def forward(call=call, model=model):
                        with torch.no_grad(), inference_context(model, precision, device):
                            call()

                    calls.append(forward)
                timings = time_interleaved(calls, device, warmup, repeats)
                baseline = None
                for bm, flops, forward, (times, memory) in zip(models, per_image, calls, timings):
                    latency = statistics.median(times)
                    gflops = flops * batch_size / 1e9
                    row = {"model": bm.name, "depth": total_depth(bm.model),
                           "params_m": parameter_count(bm.model) / 1e6,
                           "batch": batch_size, "precision": precision, "path": path, "compile": compiled,
                           "gflops": gflops, "latency_ms": latency * 1e3, "images_per_s": batch_size / latency,
                           "peak_mib": memory["peak_mib"], "memory": memory["memory"],
                           "gflops_per_s": gflops / latency,
                           "peak_fraction": gflops / latency / peak[precision] if peak and precision in peak else None}
                    baseline = baseline or row
                    row["speedup"] = baseline["latency_ms"] / row["latency_ms"]
                    row["ideal_speedup"] = baseline["gflops"] / row["gflops"]
                    row.update(profile_shares(forward, device))
                    rows.append(row)
                    log.info(format_table([row], FORWARD_COLUMNS, header=False))
                del calls
    return rows


def sampling_plan(models: Sequence[BenchModel], num_steps: int, cfg_scale: float, sampler: str | None,
                  precision: str, options: dict | None = None) -> list[tuple[NoiseProcess, SamplingSpec]]:
    """Each model's process and sampling spec, checked before any timing.

    `sampler` must be a sampler of every model's process (None: each process's first, e.g. DiT's ddpm,
    MAR's mar); `options` are passed to the samplers that take them (MAR's `num_iter`).

    Raises:
        UserError: a sampler or step count that a model's process does not take.
    """
    plan = []
    for bm in models:
        process = create_process(bm.process)
        if sampler is not None and sampler not in process.samplers:
            raise UserError(f"--sampler {sampler}: {bm.name} is on the {process.name} process, whose samplers are "
                            f"{', '.join(process.samplers)}; choose one of them, or leave out --sampler (each "
                            "model's default)")
        chosen = sampler or process.samplers[0]
        given = {k: v for k, v in (options or {}).items() if k in process.sampler_options.get(chosen, {})}
        plan.append((process, SamplingSpec.for_process(process, sampler=chosen, num_steps=num_steps, options=given,
                                                       cfg_scale=cfg_scale, precision=precision)))
    return plan


# The SD VAE's architecture (stabilityai/sd-vae-ft-ema's config): the decoder of a registry DiT or SiT, whose random
# weights cost what the trained ones cost.
SD_VAE_ARCHITECTURE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                           layers_per_block=2, latent_channels=4, norm_num_groups=32, scaling_factor=0.18215)


def bench_codec(bm: BenchModel, device: torch.device) -> LatentCodec:
    """The codec that decodes a model's samples, as sample.py's: the one a checkpoint records (`--vae auto`: its
    weights are loaded, as sample.py loads them); for a registry model or a file that records none, the codec its
    input channels name, with random weights (the SD VAE's architecture for 4 channels, MAR's KL-16 for 16; pixels:
    none), built once for all the models that take it."""
    spec, _ = resolve_codec(None, bm.codec, unwrap(bm.model).data_shape[0])
    if bm.codec is not None or spec == "none":
        return load_codec(spec, device)
    return _random_codec("kl16" if is_kl16_spec(spec) else "sd-vae", device)


@functools.lru_cache(maxsize=2)
def _random_codec(kind: str, device: torch.device) -> LatentCodec:
    if kind == "kl16":
        from tinyfusion.klvae import KL16_SCALING_FACTOR, KLAutoencoder

        return LatentCodec(KLAutoencoder().eval(), "kl16 (random weights)", KL16_SCALING_FACTOR).to(device)
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL(**SD_VAE_ARCHITECTURE).eval().requires_grad_(False)
    return LatentCodec(vae, "sd-vae (random weights)").to(device)


def bench_sampling(models: Sequence[BenchModel], batch_size: int, num_steps: int, cfg_scale: float,
                   sampler: str | None, precisions: Sequence[str], device: torch.device, repeats: int,
                   log: logging.Logger, options: dict | None = None, *, compile_modes: Sequence[bool] = (False,),
                   compile_backend: str = "inductor", codecs: Sequence[LatentCodec] | None = None) -> list[dict]:
    """Images per second of the whole sampling loop of every (model, precision, compile) combination, a low
    precision on the inference path the sampling scripts take (`tinyfusion.precision.for_inference`).

    Each model samples on the process it records (see `sampling_plan` for `sampler` and `options`);
    `num_steps` are the sampler's steps (MAR: the token sampler's). With `codecs` (one per model, `bench_codec`)
    the latents are decoded too, as sample.py does (the decoder in fp32, uncompiled): images per second end to
    end; without, latents per second. A compiled row samples with the denoiser sample.py --compile builds
    (`tinyfusion.sampling.make_denoiser` with `compile_backend`), compiled in the warm-up call ("compile_s": that
    call's compiled step, compiling included); "compile_speedup" is its speed over the uncompiled row's. The
    rows of one precision (every model, compiled and not) are timed in turns (`time_interleaved`).
    """
    rows = []
    for precision in precisions:
        calls, plan = [], []
        for i, (bm, (process, spec)) in enumerate(zip(models, sampling_plan(models, num_steps, cfg_scale, sampler,
                                                                            precision, options))):
            labels = torch.arange(batch_size, device=device) % unwrap(bm.model).num_classes
            seeds = image_seeds(0, range(batch_size))
            codec = codecs[i] if codecs is not None else None
            # as sample.py samples: a low precision on the inference path (weights held in it)
            model = bm.model if precision == "fp32" else for_inference(copy.deepcopy(bm.model), precision)
            for compiled in compile_modes:
                denoise = make_denoiser(model, spec, device, compile_backend=compile_backend if compiled else None,
                                        log=log.info)

                def call(model=model, process=process, spec=spec, labels=labels, seeds=seeds, codec=codec,
                         denoise=None if process.drives_model else denoise):
                    latents = sample_latents(model, process, labels, seeds, spec, denoise=denoise)
                    return latents if codec is None else codec.decode(latents)

                calls.append(call)
                plan.append((bm, spec, compiled, codec, denoise))
        # in turns, as the forward passes: the ratio of two runs stays fair on a drifting host
        uncompiled = {}
        for (bm, spec, compiled, codec, denoise), (times, _) in zip(plan, time_interleaved(calls, device, 1,
                                                                                            repeats)):
            seconds = statistics.median(times)
            row = {"model": bm.name, "batch": batch_size, "sampler": spec.sampler_name(), "steps": num_steps,
                   "cfg": cfg_scale, "precision": precision, "compile": compiled,
                   "decoder": codec.name if codec is not None else None, "seconds": seconds,
                   "images_per_s": batch_size / seconds,
                   **({"num_iter": spec.options["num_iter"]} if "num_iter" in spec.options else {})}
            if compiled:
                row["compile_backend"] = compile_backend
                row["compile_s"] = denoise.first_call_seconds
                if bm.name in uncompiled:
                    row["compile_speedup"] = uncompiled[bm.name] / seconds
            else:
                uncompiled[bm.name] = seconds
            rows.append(row)
            log.info(format_table([row], SAMPLING_COLUMNS, header=False))
    return rows


def _random_features(root: Path, model: nn.Module, count: int) -> FeatureDataset:
    """`count` random inputs of the model's shape (`data_shape`) with random labels of its classes."""
    rng = np.random.default_rng(0)
    inner = unwrap(model)
    latents = rng.standard_normal((count, 1, *inner.data_shape)).astype(np.float32)
    write_shard(root, 0, latents, rng.integers(0, inner.num_classes, count))
    write_index(root, 1, num_classes=inner.num_classes, class_names=[], source={"random": True})
    return FeatureDataset(root)


TRAINING_TASKS = ("train", "kd", "prune-lora", "prune-full")


def bench_training(bm: BenchModel, batch_size: int, precision: str, env: DistEnv, warmup: int, repeats: int,
                   lora_rank: int, log: logging.Logger, checkpointing: Sequence[bool] = (False,),
                   tasks: Sequence[str] = TRAINING_TASKS, compile_modes: Sequence[bool] = (False,),
                   compile_backend: str = "inductor") -> dict:
    """Step cost of the three training scripts' tasks on one model and batch.

    - train: plain diffusion training of the model;
    - kd: Masked KD of its half-depth student (first half of the blocks) from the model as teacher,
      and the teacher forward's share of the step;
    - prune (LoRA and full): learned pruning with 1:2 gates over the model, and its cost relative to
      plain training of the same model and batch; the trainable fraction with LoRA.
    Each task builds its own models and frees them before the next (DiT-XL/2 with its optimizer and
    EMA alone is ~14 GB in fp32). The tasks run once per entry of `checkpointing`: without, then with
    activation checkpointing of the trained model's blocks (its family's `gradient_checkpointing`, what
    --grad-checkpointing sets), the row's "grad_checkpointing"; "vs_train" compares a pruning step with the
    train step of the same setting (the train step runs whenever a pruning task does). `tasks` picks among
    TRAINING_TASKS (a large model's full-update pruning may not fit in memory). Each row's "peak_mib" is its own
    task's peak (`peak_memory` with
    `reset`), and "step_mib" that peak less what was held when the task's steps began (its models
    built): the memory of the steps themselves (activations, gradients, optimizer state), which
    checkpointing lowers. On CPU the resident set left by earlier tasks drifts, so "step_mib" is the
    figure to compare. Each setting runs once per entry of `compile_modes`: uncompiled, then with the trained
    model's forward compiled as the scripts' --compile compiles it (`Trainer` with `compile_backend`); a compiled
    row's first step (compiling the forward and, at its backward, the backward) is timed apart ("compile_s") and
    "compile_speedup" is its speed over the same task's uncompiled row.
    """
    process = create_process(bm.process)
    results: dict = {"model": bm.name, "batch": batch_size, "precision": precision, "device": env.device.type}
    bm.model.to("cpu")  # the tasks build their own copies
    with tempfile.TemporaryDirectory() as tmp:
        dataset = _random_features(Path(tmp) / "features", bm.model, batch_size)
        x, y = (torch.stack(v).to(env.device) for v in zip(*(dataset[i] for i in range(batch_size))))
        bench = _TrainingBench(bm, dataset, process, x, y, precision, env, warmup, repeats, Path(tmp), log)
        rows = []
        uncompiled: dict[tuple[str, bool], float] = {}
        for checkpointed, compiled in itertools.product(checkpointing, compile_modes):
            bench.checkpointing, bench.compile_backend = checkpointed, compile_backend if compiled else None
            pruning = [mode for mode in ("lora", "full") if f"prune-{mode}" in tasks]
            train = bench.train() if "train" in tasks or pruning else None
            setting = ([train] if train else []) + ([bench.kd()] if "kd" in tasks else [])
            for mode in pruning:
                row, fraction = bench.prune(mode, lora_rank)
                row["vs_train"] = row["seconds_per_step"] / train["seconds_per_step"]
                setting.append(row)
                if fraction is not None:
                    results["lora_rank"], results["lora_trainable_fraction"] = lora_rank, fraction
            for row in setting:
                key = (row["task"], checkpointed)
                if not compiled:
                    uncompiled[key] = row["seconds_per_step"]
                elif key in uncompiled:
                    row["compile_speedup"] = uncompiled[key] / row["seconds_per_step"]
            rows += setting
    results["rows"] = rows
    results["memory"] = rows[0]["memory"]
    return results


class _TrainingBench:
    """One timed task at a time through the real training step (Trainer.train_step)."""

    def __init__(self, bm, dataset, process, x, y, precision, env, warmup, repeats, tmp, log):
        self.bm, self.dataset, self.process, self.x, self.y = bm, dataset, process, x, y
        self.precision, self.env, self.warmup, self.repeats, self.tmp, self.log = (
            precision, env, warmup, repeats, tmp, log)
        self.checkpointing = False
        self.compile_backend: str | None = None  # the trained model's forward compiled with this backend

    def fresh(self) -> nn.Module:
        torch.manual_seed(0)
        return self.checkpointed(build_architecture(self.bm.arch, self.bm.config).to(self.env.device))

    def checkpointed(self, model: nn.Module) -> nn.Module:
        """The model trained under the current setting (tinyfusion.training.set_grad_checkpointing's switch)."""
        unwrap(model).gradient_checkpointing = self.checkpointing
        return model

    def time_steps(self, name: str, model: nn.Module, params: list, task) -> dict:
        config = TrainConfig(run_dir=self.tmp / name, global_batch_size=len(self.x), total_steps=10**9, lr=1e-4,
                             precision=self.precision, ema_decay=0.999, compile_backend=self.compile_backend)
        trainer = Trainer(env=self.env, model=model, param_groups=[{"params": params}], task=task,
                          dataset=self.dataset, config=config, process=self.process, settings={}, logger=self.log,
                          record=dict)
        model.train()
        step = functools.partial(trainer.train_step, self.x, self.y)
        with peak_memory(self.env.device, reset=True) as memory:
            # compiled: the first step compiles (the forward, then at its backward pass the backward), timed apart
            first = time_call(step, self.env.device, 0, 1)[0] if self.compile_backend else None
            seconds = statistics.median(time_call(step, self.env.device, self.warmup, self.repeats))
        row = {"task": name, "grad_checkpointing": self.checkpointing, "compile": self.compile_backend is not None,
               "seconds_per_step": seconds, "steps_per_s": 1 / seconds, "images_per_s": len(self.x) / seconds,
               "peak_mib": memory["peak_mib"], "memory": memory["memory"]}
        if first is not None:
            row["compile_backend"], row["compile_s"] = self.compile_backend, first
        if "start_mib" in memory:  # the step's own: activations, gradients, optimizer state (the models were built)
            row["step_mib"] = memory["peak_mib"] - memory["start_mib"]
        self.log.info(format_table([row], TRAINING_COLUMNS, header=False))
        return row

    def train(self) -> dict:
        model = self.fresh()
        return self.time_steps("train", model, list(model.parameters()), DiffusionTask(self.process))

    def kd(self) -> dict:
        teacher = self.fresh().eval().requires_grad_(False)
        kept = list(range(total_depth(teacher) // 2))
        student = self.checkpointed(prune_depth(teacher, kept).train().requires_grad_(True))
        task = MaskedKDTask(self.process, teacher, student, dict(enumerate(kept)), 0.9, 1e-2, 2.0)
        row = self.time_steps("kd", student, list(student.parameters()), task)
        g = torch.Generator(self.env.device).manual_seed(0)
        draws = self.process.draw(g, len(self.x), self.x.shape[1:], self.env.device)

        def teacher_forward():
            with torch.no_grad(), autocast(self.precision, self.env.device):
                self.process.predict(teacher, self.x, draws, dict(y=self.y))

        seconds = statistics.median(time_call(teacher_forward, self.env.device, self.warmup, self.repeats))
        row["teacher_share"] = seconds / row["seconds_per_step"]
        return row

    def prune(self, mode: str, lora_rank: int) -> tuple[dict, float | None]:
        model = self.fresh()
        gated = GatedModel(model, f"{total_depth(model) // 2}x1:2")
        fraction = None
        if mode == "lora":
            weights = add_lora(gated.model, rank=lora_rank)
            trainable, total = trainable_fraction(gated.model, weights)
            fraction = trainable / total
        else:
            weights = list(gated.model.parameters())
        gated.gates.requires_grad_(True)
        task = LearnedPruningTask(self.process, gated, (4.0, 0.1), (100.0, 100.0), self.tmp)
        return self.time_steps(f"prune-{mode}", gated, weights + list(gated.gates.parameters()), task), fraction


#################################################################################
#                                     Tables                                    #
#################################################################################

FORWARD_COLUMNS = [("model", "{}"), ("depth", "{}"), ("params_m", "{:.1f}M"), ("batch", "{}"),
                   ("precision", "{}"), ("path", "{}"), ("compile", "{}"), ("gflops", "{:.3g}"),
                   ("latency_ms", "{:.3g}"),
                   ("images_per_s", "{:.2f}"), ("speedup", "{:.2f}x"), ("ideal_speedup", "{:.2f}x"),
                   ("peak_mib", "{:.0f}"), ("gflops_per_s", "{:.4g}"), ("peak_fraction", "{:.0%}"),
                   ("matmul_share", "{:.0%}"), ("attention_share", "{:.0%}"), ("matmul_attention_share", "{:.0%}")]
SAMPLING_COLUMNS = [("model", "{}"), ("batch", "{}"), ("sampler", "{}"), ("steps", "{}"), ("cfg", "{:g}"),
                    ("precision", "{}"), ("compile", "{}"), ("decoder", "{}"), ("seconds", "{:.2f}"),
                    ("images_per_s", "{:.3g}"), ("compile_speedup", "{:.2f}x"), ("compile_s", "{:.0f}")]
TRAINING_COLUMNS = [("task", "{}"), ("grad_checkpointing", "{}"), ("compile", "{}"), ("seconds_per_step", "{:.4f}"),
                    ("steps_per_s", "{:.2f}"), ("images_per_s", "{:.1f}"), ("peak_mib", "{:.0f}"),
                    ("step_mib", "{:.0f}"), ("teacher_share", "{:.0%}"), ("vs_train", "{:.2f}x"),
                    ("compile_speedup", "{:.2f}x"), ("compile_s", "{:.0f}")]


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], header: bool = True) -> str:
    """A markdown table of `rows`; a missing value is left blank."""
    lines = []
    if header:
        lines += ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt.format(row[name]) if row.get(name) is not None else "" for name, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#################################################################################
#                                  Entry points                                 #
#################################################################################

def _diffusers_dit(reference: BenchModel, device: torch.device) -> BenchModel:
    """diffusers' DiTTransformer2DModel holding the weights of `reference` (a DiT), through the export's key map
    (`tinyfusion.diffusers_io`): the same network in diffusers' code, timed on the same inputs."""
    from tinyfusion.diffusers_io import DiffusersDiT, to_diffusers

    try:
        transformer = to_diffusers(reference.model)
    except UserError as e:
        raise UserError(f"--compare-diffusers times diffusers' DiT on the weights of the first model, "
                        f"{reference.name}: {e}") from None
    return BenchModel(f"diffusers {reference.name}", DiffusersDiT(transformer).to(device).eval(), reference.arch,
                      reference.config, reference.process)


# An off|on|both flag (--compile, --grad-checkpointing): the settings each row is timed in, in order.
SWITCH_MODES = {"off": [False], "on": [True], "both": [False, True]}


def add_benchmark_args(parser: argparse.ArgumentParser) -> None:
    """The options the timing benchmarks take: latent size, device, warm-up and timed calls, JSON output."""
    parser.add_argument("--image-size", type=int, default=256, help="for registry models: latent size = this / 8")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=str, default=None, help="write the results as JSON")


def _setup(args) -> tuple[DistEnv, logging.Logger]:
    from tinyfusion.distributed import create_logger, init_distributed

    env = init_distributed(args.device)
    if env.distributed:
        raise UserError("benchmarks run in one process; launch them with python, not torchrun")
    if getattr(args, "threads", None):  # add_benchmark_args' (benchmarks.attention has a parser of its own)
        torch.set_num_threads(args.threads)
    return env, create_logger(env)


def run_forward_benchmark(args) -> dict:
    """benchmarks/forward.py."""
    check_outputs({"--out": args.out}, {f"--models (#{i + 1})": spec for i, spec in enumerate(args.models)
                                        if Path(spec).is_file()})
    env, log = _setup(args)
    input_size = args.image_size // 8
    models = [bench_model(spec, input_size, env.device) for spec in args.models]
    if args.num_sampling_steps:  # a sampler that does not fit a model fails now, not after the forward timings
        sampling_plan(models, args.num_sampling_steps, args.cfg_scale, args.sampler, args.precisions[0],
                      options={"num_iter": args.num_iter})
        codecs = [bench_codec(bm, env.device) for bm in models] if args.decode else None
    sampled = list(models)  # diffusers' DiT has no sampler of ours
    if args.compare_diffusers:
        models.append(_diffusers_dit(models[0], env.device))
    compile_modes = SWITCH_MODES[args.compile]
    log.info(f"forward on {env.device.type} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    size = args.peak_size or default_peak_size(env.device)
    calls = min(args.repeats, PEAK_CALLS)
    measured = peak_precisions(env.device, args.precisions)
    peak = matmul_peak(env.device, measured, size, args.warmup, calls)
    log.info(peak_text(peak, size, calls) + " (at the start; measured again at the end)")
    log.info(format_table([], FORWARD_COLUMNS))
    results = {"device": str(env.device), "device_name": device_name(env.device), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "matmul_peak": {"size": size, "gflops_per_s": peak},
               "forward": bench_forward(models, args.batch_sizes, args.precisions, compile_modes, env.device,
                                        args.warmup, args.repeats, log, peak, paths=args.paths,
                                        compile_backend=args.compile_backend)}
    if args.num_sampling_steps:
        log.info(format_table([], SAMPLING_COLUMNS))
        results["sampling"] = bench_sampling(sampled, args.batch_sizes[0], args.num_sampling_steps, args.cfg_scale,
                                             args.sampler, args.precisions, env.device, args.repeats, log,
                                             options={"num_iter": args.num_iter}, compile_modes=compile_modes,
                                             compile_backend=args.compile_backend, codecs=codecs)
    # A shared host drifts: the peak is measured again at the end and the faster of the two counts, for every row.
    at_end = matmul_peak(env.device, measured, size, args.warmup, calls)
    peak = {p: max(peak[p], at_end[p]) for p in peak}
    peak_line = (peak_text(peak, size, calls) + " (the faster of the start and the end of the run; end: "
                 + ", ".join(f"{p} {v:.4g}" for p, v in at_end.items()) + ")")
    results["matmul_peak"].update(gflops_per_s=peak, at_end=at_end)
    for row in results["forward"]:
        if row.get("peak_fraction") is not None:
            row["peak_fraction"] = row["gflops_per_s"] / peak[row["precision"]]
    print("\n" + peak_line + "\n\n" + format_table(results["forward"], FORWARD_COLUMNS))
    if "sampling" in results:
        print("\n" + format_table(results["sampling"], SAMPLING_COLUMNS))
    if args.out:
        atomic_write_json(args.out, results)
    return results


def run_training_benchmark(args) -> dict:
    """benchmarks/training.py."""
    check_outputs({"--out": args.out}, {"--model": args.model if Path(args.model).is_file() else None})
    env, log = _setup(args)
    bm = bench_model(args.model, args.image_size // 8, env.device)
    log.info(f"training steps on {env.device.type} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    log.info(format_table([], TRAINING_COLUMNS))
    checkpointing, compile_modes = SWITCH_MODES[args.grad_checkpointing], SWITCH_MODES[args.compile]
    if True in compile_modes:
        check_compilable(bm.model, args.compile_backend)  # MAR: refused here, before any task runs
        if True in checkpointing and any(task.startswith("prune") for task in args.tasks):
            raise UserError(f"--compile {args.compile} with --grad-checkpointing {args.grad_checkpointing}: gated "
                            "blocks under checkpointing do not compile (models/compiling.py); drop one of them, or "
                            "time the pruning tasks in a run of their own")
    results = bench_training(bm, args.batch_size, args.precision, env, args.warmup, args.repeats, args.lora_rank, log,
                             checkpointing, tasks=args.tasks, compile_modes=compile_modes,
                             compile_backend=args.compile_backend)
    results.update(threads=torch.get_num_threads(), torch=torch.__version__)
    print("\n" + format_table(results["rows"], TRAINING_COLUMNS) + f"\n\npeak_mib: {results['memory']}; step_mib: "
          "the peak less what was held when the task's steps began (its models built)")
    if "lora_rank" in results:
        print(f"\nLoRA rank {results['lora_rank']}: {results['lora_trainable_fraction']:.2%} of the parameters "
              "trainable")
    if args.out:
        atomic_write_json(args.out, results)
    return results
