r"""Training-step cost of train.py, train_masked_kd.py and prune_by_learning.py on one model and batch.

Usage (from the repository root):
    python -m benchmarks.training --model DiT-XL/2 --batch-size 32 --precision bf16 --out results/bench_train.json
    python -m benchmarks.training --model DiT-XL/2 --batch-size 2 --grad-checkpointing both --device cpu
    python -m benchmarks.training --model DiT-S/2 --batch-size 8 --precision bf16 --compile both --device cpu

Reports steps/s, images/s and peak memory of each task's step through the shared training loop;
for Masked KD the teacher forward's share of the step (student: the first half of the blocks),
for learned pruning (1:2 gates, LoRA or full weight updates) its cost relative to a plain training
step of the same model and batch, and the trainable fraction with LoRA. Each task's peak memory is its own
(CUDA: the peak allocation; CPU: the process's peak RSS, reset at the task's start on Linux), and "step_mib",
that peak less what was held when the task's steps began, is the steps' own memory: with --grad-checkpointing
both, every task runs without, then with activation checkpointing, and the two compare. With --compile both, every
task runs uncompiled, then compiled as the scripts' --compile compiles it: "compile_speedup" is the compiled step's
speed over the uncompiled one, "compile_s" its first step (compiling included).
"""

from benchmarks.harness import TRAINING_TASKS, add_benchmark_args, run_training_benchmark
from models.compiling import BACKENDS
from tinyfusion.args import Parser
from tinyfusion.cli import run_script
from tinyfusion.precision import PRECISIONS


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--model", default="DiT-XL/2", help="a registry name or a checkpoint file")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--grad-checkpointing", choices=["off", "on", "both"], default="off",
                        help="activation checkpointing of the trained model's blocks (the scripts' "
                             "--grad-checkpointing); both: every task without, then with it")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off",
                        help="time the steps with the trained model's forward compiled as the scripts' --compile "
                             "compiles it (one graph); both: every task uncompiled, then compiled")
    parser.add_argument("--compile-backend", choices=list(BACKENDS), default="inductor",
                        help="torch.compile's backend (eager and aot_eager generate no code)")
    parser.add_argument("--tasks", choices=TRAINING_TASKS, nargs="+", default=list(TRAINING_TASKS),
                        help="which steps to time (a pruning task also times train, its reference)")
    add_benchmark_args(parser)
    return parser.parse_args(argv)


def main(args):
    run_training_benchmark(args)


if __name__ == "__main__":
    run_script(main, parse_args)
