r"""Local attention (CLEAR) against global attention: FLOPs, the attention operation's time and a whole forward
pass, per token grid, radius, execution path and precision (issue 22).

Usage (from the repository root):
    python -m benchmarks.attention --out results/bench_attention.json --markdown results/bench_attention.md
    python -m benchmarks.attention --grids 32 64 --radii 8 --heads DiT-XL/2 --models --precisions bf16
    python -m benchmarks.attention --grids 32 --paths tiled flex     # compiled FlexAttention too (slow on CPU)

A grid of G x G tokens is a 16G-pixel image for the patch-2 models on the SD VAE's 8x latents (input_size
2G; 128 tokens per side: 2048 px). Local attention is CLEAR's circle (models/attention.py): each token attends
to the tokens at Euclidean distance strictly below r on the grid, no pooled branch.

Attention operation: q, k, v random, (batch, heads, G^2, head_dim) at the head shapes of --heads (DiT-B/2: 12
heads of 64, DiT-XL/2: 16 of 72), held in the precision's dtype (bf16: the tensors are bf16). Global attention
runs SDPA; local attention runs each of --paths:
- "tiled": the halo-tiled batched SDPA, the CPU path (each query reads its tile's window of
  (tile + 2 halo)^2 keys, padding included);
- "dense": SDPA with the full (T, T) boolean mask, the reference: global attention's cost. Skipped where the
  mask would pass --dense-max-mib;
- "flex": compiled FlexAttention, the CUDA path (on CPU it compiles once per shape and runs slower than
  global attention; not a default).
Forward: a whole forward pass of each registry model of --models at input_size grid * patch (random weights;
bf16: autocast, the weights fp32, as the scripts run it), its blocks global, then local at each radius and
path (--forward-paths, default --paths). A model and grid whose
global forward would pass --max-forward-tflops is skipped, and the output says so.

FLOPs are counted, not multiply-adds: q k^T and the weighting of v are 2 * 2 * K * head_dim per query and
head, K the keys it attends. "ideal keys" is the circle's mean key count per query (the integer offsets
dy^2 + dx^2 < r^2 that stay on the grid); "keys" is what the path computes (global and dense: all T, tiled:
its window, flex: its unmasked 128 x 128 blocks). "ideal" speedup is global attention's FLOPs over the
circle's (for the forward: the model's, the rest of the model counted by torch's FlopCounterMode on the meta
device); "speedup" is measured, global's median time over the path's, the variants of one setting timed in
turns (`benchmarks.harness.time_interleaved`).
"""

from __future__ import annotations

import gc
import logging
import re
import statistics

import torch

from benchmarks.harness import (
    BenchModel,
    _setup,
    attention_flops,
    attention_path_work,
    default_process_record,
    device_name,
    format_table,
    forward_call,
    forward_flops,
    time_interleaved,
)
from models import ARCHITECTURES, create_model, registry_spec
from models.attention import (
    NO_ATTENTION_KINDS,
    attend,
    attention_modules,
    attention_spec,
    convert_attention,
    describe_attention,
    halo,
    set_attention_path,
)
from tinyfusion.args import Parser, positive_int
from tinyfusion.cli import run_script
from tinyfusion.errors import UserError
from tinyfusion.fileio import atomic_write, atomic_write_json
from tinyfusion.paths import check_outputs
from tinyfusion.precision import DTYPES, PRECISIONS, autocast

LOCAL_PATHS = ("tiled", "dense", "flex")


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--grids", type=positive_int, nargs="+", default=[16, 32, 64, 128],
                        help="token grids, tokens per side")
    parser.add_argument("--radii", type=float, nargs="+", default=[8.0, 16.0], help="local attention radii (tokens)")
    parser.add_argument("--heads", nargs="*", default=["DiT-B/2", "DiT-XL/2"],
                        help="head shapes of the attention operation: registry names or HEADSxDIM (e.g. 16x72); "
                             "none: skip the operation")
    parser.add_argument("--models", nargs="*", default=["DiT-B/2", "DiT-XL/2"],
                        help="DiT or SiT registry names whose forward pass is timed; none: skip the forward")
    parser.add_argument("--precisions", choices=PRECISIONS, nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--paths", choices=LOCAL_PATHS, nargs="+", default=["tiled", "dense"],
                        help="local attention's execution paths (global attention: SDPA)")
    parser.add_argument("--forward-paths", choices=LOCAL_PATHS, nargs="+", default=None,
                        help="local attention's paths in the forward (default: --paths)")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--dense-max-mib", type=float, default=64.0,
                        help="skip the dense path where its (T, T) boolean mask passes this size")
    parser.add_argument("--max-forward-tflops", type=float, default=20.0,
                        help="skip a model's forward at grids where its global forward passes this many TFLOPs")
    # The harness's add_benchmark_args also takes --image-size, which a sweep of grids has no use for.
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed calls of each variant (median)")
    parser.add_argument("--forward-repeats", type=positive_int, default=None,
                        help="timed calls of each forward variant (default: --repeats)")
    parser.add_argument("--out", type=str, default=None, help="write the results as JSON")
    parser.add_argument("--markdown", type=str, default=None, help="also write the tables as markdown")
    return parser.parse_args(argv)


#################################################################################
#                                     FLOPs                                     #
#################################################################################

def circle_keys(grid: tuple[int, int], radius: float) -> float:
    """The circle's keys per query, averaged over the queries: an offset (dy, dx) with dy^2 + dx^2 < r^2 is
    a key of the (G_h - |dy|) (G_w - |dx|) queries it leaves on the grid."""
    h = halo(radius)
    total = sum(max(grid[0] - abs(dy), 0) * max(grid[1] - abs(dx), 0)
                for dy in range(-h, h + 1) for dx in range(-h, h + 1) if dy * dy + dx * dx < radius * radius)
    return total / (grid[0] * grid[1])


def model_attention_flops(model: torch.nn.Module, queries: int, keys: float, batch: int) -> float:
    return sum(attention_flops(queries, keys, m.num_heads, m.head_dim, batch) for m in attention_modules(model))


#################################################################################
#                                   Settings                                    #
#################################################################################

def head_shape(name: str) -> tuple[str, int, int]:
    """(label, heads, head_dim) of a registry name or of HEADSxDIM."""
    match = re.fullmatch(r"(\d+)x(\d+)", name)
    if match:
        heads, dim = int(match[1]), int(match[2])
        label = f"{heads}x{dim}"
    else:
        fixed = registry_spec(name)[1]
        if "num_heads" not in fixed or "hidden_size" not in fixed:
            raise UserError(f"--heads {name}: the registry name fixes no head shape; give a DiT or SiT name or "
                             "HEADSxDIM, e.g. 16x72")
        heads, dim = fixed["num_heads"], fixed["hidden_size"] // fixed["num_heads"]
        label = f"{name} ({heads}x{dim})"
    if heads < 1 or dim < 1:
        raise UserError(f"--heads {name}: heads and head_dim must be positive")
    return label, heads, dim


def variants(radii, paths) -> list[tuple[dict, str]]:
    """Global attention on SDPA, then every radius on every local path."""
    return [({"kind": "global"}, "sdpa")] + [(attention_spec({"kind": "local", "radius": r}), p)
                                              for r in radii for p in paths]


def forced(path: str) -> str:
    """The path to force on models.attention: global attention's "sdpa" is its only one ("auto")."""
    return "auto" if path == "sdpa" else path


def runnable(chosen: list[tuple[dict, str]], grid: int, dense_max_mib: float, skipped: list[str]
             ) -> list[tuple[dict, str]]:
    """The variants without the dense path where its (T, T) boolean mask passes the cap (noted in `skipped`)."""
    mib = grid**4 / 2**20
    if mib <= dense_max_mib:
        return chosen
    note = (f"dense path at {grid}x{grid}: its (T, T) mask is {mib:,.4g} MiB, over --dense-max-mib "
            f"{dense_max_mib:g} (its cost is global attention's)")
    if any(path == "dense" for _, path in chosen) and note not in skipped:
        skipped.append(note)
    return [(spec, path) for spec, path in chosen if path != "dense"]


def input_size(name: str, grid: int) -> int:
    """The latent side of a registry model with `grid` tokens per side (grid times its patch)."""
    return grid * registry_spec(name)[1]["patch_size"]


def _check_model(name: str) -> None:
    """A --models name must be a plain registry model of a family with attention kinds (DiT, SiT)."""
    arch, fixed, groups = registry_spec(name)
    if groups is not None or not hasattr(ARCHITECTURES[arch], "ATTENTION_KINDS"):
        what = "a gated training preset" if groups is not None else f"a {arch} ({NO_ATTENTION_KINDS})"
        raise UserError(f"--models {name}: {what}; give DiT or SiT registry names")


#################################################################################
#                                  Benchmarks                                   #
#################################################################################

def _row_speedups(rows: list[dict]) -> None:
    """Measured and ideal speedups against the first row (global attention) of one setting."""
    base = rows[0]
    for row in rows:
        row["speedup"] = base["ms"] / row["ms"]
        row["ideal_speedup"] = base["gflops"] / row["ideal_gflops"]


def bench_operation(shape: tuple[str, int, int], grid: int, precision: str, args, device: torch.device,
                    skipped: list[str], log: logging.Logger) -> list[dict]:
    """The attention operation alone at one head shape, grid and precision: global, then each local variant."""
    label, heads, head_dim = shape
    g = (grid, grid)
    T = grid * grid
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.batch_size, heads, T, head_dim, generator=gen).to(device, DTYPES[precision])
               for _ in range(3))  # each (B, H, T, head_dim)
    chosen = runnable(variants(args.radii, args.paths), grid, args.dense_max_mib, skipped)
    calls = [lambda spec=spec, path=path: attend(q, k, v, spec, g, forced(path)) for spec, path in chosen]

    def run(call):
        with torch.no_grad():
            call()

    timings = time_interleaved([lambda call=call: run(call) for call in calls], device, args.warmup, args.repeats)
    rows = []
    for (spec, path), (times, _) in zip(chosen, timings):
        queries, keys = attention_path_work(spec, g, path, device)
        ideal_keys = float(T) if spec["kind"] == "global" else circle_keys(g, spec["radius"])
        rows.append({"heads": label, "num_heads": heads, "head_dim": head_dim, "grid": grid, "tokens": T,
                     "pixels": 16 * grid, "batch": args.batch_size, "precision": precision,
                     "attention": describe_attention(spec), "radius": spec.get("radius"), "path": path,
                     "queries": queries, "keys": keys, "ideal_keys": ideal_keys,
                     "gflops": attention_flops(queries, keys, heads, head_dim, args.batch_size) / 1e9,
                     "ideal_gflops": attention_flops(T, ideal_keys, heads, head_dim, args.batch_size) / 1e9,
                     "ms": statistics.median(times) * 1e3})
    _row_speedups(rows)
    for row in rows:
        log.info(format_table([row], OPERATION_COLUMNS, header=False))
    return rows


def model_flops(name: str, grid: int, chosen: list[tuple[dict, str]], batch: int) -> tuple[list[float], float]:
    """FLOPs of the model's forward at `grid` per variant, counted on the meta device (no memory, no time), and
    the rest of the model's (all but attention's) FLOPs."""
    with torch.device("meta"):
        model = create_model(name, input_size=input_size(name, grid)).eval()
    bm = BenchModel(name, model, model.arch, dict(model.config), default_process_record(model))
    call = forward_call(bm, batch, torch.device("meta"))
    flops = []
    for spec, path in chosen:
        convert_attention(model, spec)
        set_attention_path(model, forced(path))
        flops.append(float(forward_flops(call, model)))
    T = grid * grid
    rest = flops[0] - model_attention_flops(model, T, T, batch)
    return flops, rest


def bench_forward(name: str, grids: list[int], precisions: list[str], args, device: torch.device,
                  skipped: list[str], log: logging.Logger) -> list[dict]:
    """Whole forward passes of a registry model at each grid and precision: global, then each local variant."""
    rows = []
    for grid in grids:
        chosen = runnable(variants(args.radii, args.forward_paths or args.paths), grid, args.dense_max_mib, skipped)
        flops, rest = model_flops(name, grid, chosen, args.batch_size)
        if flops[0] / 1e12 > args.max_forward_tflops:
            skipped.append(f"{name} forward at {grid}x{grid}: {flops[0] / 1e12:.1f} TFLOPs per call with global "
                           f"attention, over --max-forward-tflops {args.max_forward_tflops:g}")
            log.info(skipped[-1])
            continue
        rows += _forward_at(name, grid, chosen, flops, rest, precisions, args, device, log)
        gc.collect()  # the model of this grid goes before the next one's is built
    return rows


def _forward_at(name, grid, chosen, flops, rest, precisions, args, device, log) -> list[dict]:
    g, T = (grid, grid), grid * grid
    torch.manual_seed(0)
    model = create_model(name, input_size=input_size(name, grid)).to(device).eval()
    call = forward_call(BenchModel(name, model, model.arch, dict(model.config), default_process_record(model)),
                        args.batch_size, device)

    def forward(spec, path, precision):
        convert_attention(model, spec)  # the same weights, another attention kind
        set_attention_path(model, forced(path))
        with torch.no_grad(), autocast(precision, device):
            call()

    rows = []
    for precision in precisions:
        timings = time_interleaved([lambda s=s, p=p: forward(s, p, precision) for s, p in chosen], device,
                                   args.warmup, args.forward_repeats or args.repeats)
        setting = []
        for (spec, path), path_flops, (times, _) in zip(chosen, flops, timings):
            ideal_keys = float(T) if spec["kind"] == "global" else circle_keys(g, spec["radius"])
            setting.append({"model": name, "grid": grid, "tokens": T, "pixels": 8 * input_size(name, grid),
                            "batch": args.batch_size,
                            "precision": precision, "attention": describe_attention(spec),
                            "radius": spec.get("radius"), "path": path, "gflops": path_flops / 1e9,
                            "ideal_gflops": (rest + model_attention_flops(model, T, ideal_keys, args.batch_size)) / 1e9,
                            "ms": statistics.median(times) * 1e3})
        _row_speedups(setting)
        for row in setting:
            log.info(format_table([row], FORWARD_COLUMNS, header=False))
        rows += setting
    return rows


#################################################################################
#                                    Tables                                     #
#################################################################################

OPERATION_COLUMNS = [("heads", "{}"), ("grid", "{}"), ("pixels", "{}"), ("precision", "{}"), ("attention", "{}"),
                     ("path", "{}"), ("ideal_keys", "{:.1f}"), ("keys", "{:.0f}"), ("gflops", "{:.4g}"),
                     ("ms", "{:.4g}"), ("speedup", "{:.2f}x"), ("ideal_speedup", "{:.2f}x")]
FORWARD_COLUMNS = [("model", "{}"), ("grid", "{}"), ("pixels", "{}"), ("precision", "{}"), ("attention", "{}"),
                   ("path", "{}"), ("gflops", "{:.4g}"), ("ms", "{:.4g}"), ("speedup", "{:.2f}x"),
                   ("ideal_speedup", "{:.2f}x")]


def main(args) -> dict:
    check_outputs({"--out": args.out, "--markdown": args.markdown})
    shapes = [head_shape(name) for name in args.heads]
    for name in args.models:  # a name that cannot run local attention fails now, not after the timings
        _check_model(name)
    env, log = _setup(args)
    device = env.device
    where = device_name(device)
    log.info(f"attention on {device.type}: {where}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    skipped: list[str] = []
    results = {"device": str(device), "device_name": where, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "batch": args.batch_size, "operation_dtype": "tensors in the precision",
               "forward_precision": "autocast (weights fp32)", "operation": [], "forward": []}
    if shapes:
        log.info(format_table([], OPERATION_COLUMNS))
    for shape in shapes:
        for grid in args.grids:
            for precision in args.precisions:
                results["operation"] += bench_operation(shape, grid, precision, args, device, skipped, log)
    if args.models:
        log.info(format_table([], FORWARD_COLUMNS))
    for name in args.models:
        results["forward"] += bench_forward(name, args.grids, args.precisions, args, device, skipped, log)
    results["skipped"] = skipped
    tables = []
    if results["operation"]:
        tables.append("Attention operation (batch {}, q/k/v in the precision's dtype):\n\n".format(args.batch_size)
                      + format_table(results["operation"], OPERATION_COLUMNS))
    if results["forward"]:
        tables.append("Forward pass (batch {}, bf16/fp16: autocast):\n\n".format(args.batch_size)
                      + format_table(results["forward"], FORWARD_COLUMNS))
    if skipped:
        tables.append("Skipped:\n" + "\n".join(f"- {s}" for s in skipped))
    text = f"On {where}, {torch.get_num_threads()} threads, torch {torch.__version__}.\n\n" + "\n\n".join(tables)
    print("\n" + text)
    if args.out:
        atomic_write_json(args.out, results)
    if args.markdown:
        atomic_write(args.markdown, lambda f: f.write((text + "\n").encode()))
    return results


if __name__ == "__main__":
    run_script(main, parse_args)
