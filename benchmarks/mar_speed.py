r"""Speed of a MAR against its TinyFusion-pruned version: forward, and one full sampling run.

Usage (from the repository root):
    python -m benchmarks.mar_speed                                   # MAR-L vs TinyMAR-D16, 256 px, GPU
    python -m benchmarks.mar_speed --device cpu --batch-size 2 --num-iter 4 --num-sampling-steps 10  # a CPU look

The pruned model keeps one block of every pair in each stack (TinyMAR-D16's shape for MAR-L: 8
encoder + 8 decoder blocks of the 16 + 16; which blocks does not change the speed), cut from the same
randomly initialised model (speed does not depend on the weights). The forward is a training step's
(the encoder on the visible tokens, the decoder, the diffusion MLP on every masked token's copies);
the sampling run is `sample_tokens` at --num-iter iterations with classifier-free guidance, each
token drawn by --num-sampling-steps steps of the diffusion MLP. The two models are timed in turns,
in one run, so their ratio is fair on a shared machine. Prints both tables and the speedups.
"""

from __future__ import annotations

import torch

from benchmarks.harness import (
    FORWARD_COLUMNS,
    SAMPLING_COLUMNS,
    BenchModel,
    _setup,
    add_benchmark_args,
    bench_forward,
    bench_sampling,
    default_process_record,
    format_table,
)
from models import MAR_models, create_model, prune_depth, stack_depths
from tinyfusion.args import Parser, positive_int
from tinyfusion.cli import run_script
from tinyfusion.fileio import atomic_write_json
from tinyfusion.paths import check_outputs
from tinyfusion.precision import PRECISIONS


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--model", choices=[n for n in MAR_models if "-1-2" not in n], default="MAR-L")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--num-iter", type=positive_int, default=64, help="iterations of the sampling run")
    parser.add_argument("--num-sampling-steps", type=positive_int, default=100, help="token sampler steps")
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    add_benchmark_args(parser)
    parser.set_defaults(repeats=2)
    return parser.parse_args(argv)


def pruned_pair(name: str, image_size: int, device: torch.device) -> list[BenchModel]:
    """The model and its one-of-each-pair pruned version (every stack halved), random weights."""
    torch.manual_seed(0)
    full = create_model(name, img_size=image_size).eval()
    kept, offset = [], 0
    for depth in stack_depths(full).values():
        kept += [offset + i for i in range(0, depth, 2)]
        offset += depth
    pruned = prune_depth(full, kept).eval()
    label = f"{name} pruned to {len(kept)} blocks"
    return [BenchModel(name, full.to(device), full.arch, dict(full.config), default_process_record(full)),
            BenchModel(label, pruned.to(device), pruned.arch, dict(pruned.config), default_process_record(pruned))]


def main(args):
    check_outputs({"--out": args.out})
    env, log = _setup(args)
    models = pruned_pair(args.model, args.image_size, env.device)
    log.info(f"{args.model} at {args.image_size} px on {env.device.type} ({torch.get_num_threads()} threads), "
             f"torch {torch.__version__}")
    forward = bench_forward(models, [args.batch_size], [args.precision], [False], env.device, args.warmup,
                            args.repeats, log)
    sampling = bench_sampling(models, args.batch_size, args.num_sampling_steps, args.cfg_scale, "mar",
                              [args.precision], env.device, args.repeats, log, options={"num_iter": args.num_iter})
    print("\n" + format_table(forward, FORWARD_COLUMNS))
    print("\n" + format_table(sampling, SAMPLING_COLUMNS))
    speedup = sampling[0]["seconds"] / sampling[1]["seconds"]
    print(f"\nforward speedup {forward[1]['speedup']:.2f}x (ideal {forward[1]['ideal_speedup']:.2f}x); "
          f"sampling speedup {speedup:.2f}x at {args.num_iter} iterations")
    if args.out:
        atomic_write_json(args.out, {"forward": forward, "sampling": sampling, "sampling_speedup": speedup,
                                     "device": str(env.device), "threads": torch.get_num_threads()})


if __name__ == "__main__":
    run_script(main, parse_args)
