r"""Forward latency, throughput and peak memory of registry models or checkpoints; sampling speed.

Usage (from the repository root):
    python -m benchmarks.forward --models DiT-XL/2 DiT-D19/2 DiT-D14/2 DiT-D7/2 --batch-sizes 8 \
        --precisions fp32 bf16 --out results/bench_forward.json
    python -m benchmarks.forward --models DiT-XL/2 DiT-D14/2 DiT-XL/2@width=0.5 DiT-XL/2@width=0.75 \
        --batch-sizes 8 --precisions fp32 bf16
    python -m benchmarks.forward --models outputs/pruned/DiT-D14-Learned.pt --num-sampling-steps 50 --cfg-scale 1.5
    python -m benchmarks.forward --models DiT-S/2 --batch-sizes 8 --precisions fp32 bf16 --compile both \
        --num-sampling-steps 25 --sampler ddim --threads 1    # sampling images/s with and without --compile

Registry models get random weights (speed does not depend on them); NAME@width=R is NAME with the fraction R
of every block's attention heads and MLP channels removed (width pruning: prune_by_score.py --width-ratio R).
DiT-XL/2@width=0.5 has about DiT-D14/2's FLOPs (half of DiT-XL/2's) and DiT-XL/2@width=0.75 its 340M
parameters: the adaLN modulation, which width pruning keeps, holds a third of the parameters and almost none of
the FLOPs. The first model is the baseline of the speedup columns; "ideal" is its FLOPs over the model's. With
--compare-diffusers, diffusers' port of the official DiT (DiTTransformer2DModel) is timed too, holding the first
model's weights as `python -m tinyfusion.diffusers_io export` writes them (a row "diffusers NAME"; the first model
must be a DiT that diffusers can express).

How close to the hardware: the run first measures the device's matmul peak (GFLOP/s of a --peak-size square GEMM
in fp32, bf16, and fp16 on CUDA, the fastest of 3 calls; measured again at the end of the run, and the faster of
the two counts, since a shared host drifts); each row gives its GFLOP/s (FLOPs with attention, as its
path computes it, over the median latency), their fraction of the peak of its precision, and the shares of its time
in matmul and in attention ops (torch's profiler, self times, one more call), the largest other ops in the JSON.
A bf16 or fp16 row runs on the inference path the sampling scripts take (column path: held) and under autocast
(path: autocast), unless --paths picks one.

--compile both times every forward and every sampling run uncompiled and compiled, as --compile of the scripts
compiles (one graph), in turns; a compiled sampling row gives its speed over the uncompiled one ("compile_speedup")
and the seconds of its first call, compiling included ("compile_s").
"""

import argparse

from benchmarks.harness import add_benchmark_args, run_forward_benchmark
from models.compiling import BACKENDS
from processes import all_samplers
from tinyfusion.args import Parser, nonnegative_int, positive_int
from tinyfusion.cli import run_script
from tinyfusion.precision import PRECISIONS


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--models", nargs="+", default=["DiT-XL/2", "DiT-D19/2", "DiT-D14/2", "DiT-D7/2"],
                        help="registry names, NAME@width=R (width-pruned, see above) or checkpoint files")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--precisions", choices=PRECISIONS, nargs="+", default=["fp32"])
    parser.add_argument("--paths", choices=["held", "autocast"], nargs="+", default=["held", "autocast"],
                        help="how bf16 and fp16 rows run: held, the sampling scripts' inference path (the blocks' "
                             "weights held once in the precision, fp32 embeddings, adaLN and final layer); autocast, "
                             "fp32 weights cast on every call (training's mixed precision)")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off",
                        help="time the models as --compile runs them (models/compiling.py: the forward, and in the "
                             "sampling loop the sampler's denoiser, compiled as one graph), or both ways, in turns")
    parser.add_argument("--compile-backend", choices=list(BACKENDS), default="inductor",
                        help="torch.compile's backend (eager and aot_eager generate no code)")
    parser.add_argument("--num-sampling-steps", type=nonnegative_int, default=0,
                        help="also time sampling end to end, as sample.py samples (every image of a batch, then its "
                             "decoding: a checkpoint's codec, a registry model's with random weights), with this "
                             "many steps of the sampler, in every precision (0: skip)")
    parser.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                        help="sampling: decode the samples, as sample.py does (--no-decode: the latents alone, what "
                             "--compile compiles)")
    parser.add_argument("--sampler", choices=all_samplers(), default=None,
                        help="a sampler of every model's noise process (the process a checkpoint records; a "
                             "registry model's: its family's default); None: each process's first (e.g. DiT: ddpm)")
    parser.add_argument("--num-iter", type=int, default=64, help="MAR: iterations of its masked sampling")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--compare-diffusers", action="store_true",
                        help="also time diffusers' DiTTransformer2DModel holding the first model's exported weights")
    parser.add_argument("--peak-size", type=positive_int, default=None,
                        help="side of the square GEMM that measures the matmul peak (default: 8192 on CUDA, 2048 on "
                             "CPU)")
    add_benchmark_args(parser)
    return parser.parse_args(argv)


def main(args):
    run_forward_benchmark(args)


if __name__ == "__main__":
    run_script(main, parse_args)
