r"""The whole TinyFusion pipeline on a built-in dataset, on a CPU, in one command.

Usage:
    python quickstart.py                 # about 40 minutes on 2 CPU cores (README: measured)
    python quickstart.py --fast          # about 2 minutes: every stage, tiny budgets (for tests)
    python quickstart.py --data-path my_images --image-size 16   # your own image folder
    python quickstart.py --clear         # also the teacher with CLEAR's local attention, distilled

scikit-learn's 8x8 handwritten digits (shipped with the package) in pixel space: a small DiT is
trained from scratch as the stand-in for a pretrained DiT-XL/2, pruned to half depth by TinyFusion
(1:2 groups, and one group over all blocks) and by the baselines (ShortGPT block influence, loss
sensitivity, BK-SDM oracle, random), then recovered with the same budget by Masked KD (and plain
fine-tuning for TinyFusion 1:2); the unpruned teacher trained as long is the ceiling. FID is
computed in the feature space of a small digits classifier (Inception features mean nothing on
8x8 digits); the real digits scored half against half are the floor. Every stage runs the real
scripts (torchrun for the distributed ones). Results: OUT/results.md and .json, sample grids in
OUT/grids, TinyFusion's decision plots in OUT/decisions-*.png.
"""

from pipelines.quickstart import DEFAULT_LAUNCH, LAUNCHES, run_quickstart
from tinyfusion.args import Parser
from tinyfusion.cli import run_script


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--out", type=str, default=None,
                        help="output folder, reused by a rerun (default: results/quickstart, -sit or -mar for "
                             "--family sit or mar, -fast for --fast)")
    parser.add_argument("--family", choices=["dit", "sit", "mar"], default="dit",
                        help="the teacher: DiT-Nano/2 on the Gaussian diffusion, SiT-Nano/2 on the Linear "
                             "velocity transport (sampled with Heun on the probability-flow ODE), or MAR-Nano (2x2 "
                             "pixel tokens, 4 + 4 blocks, a per-token diffusion head; 8 masked iterations)")
    parser.add_argument("--fast", action="store_true", help="tiny budgets: checks every stage in about 2 minutes")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes of the distributed scripts (torchrun); default 2, and 1 with --fast")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: every stage on the GPU (bf16: autocast in training, the weights held in bf16 in "
                             "sampling; the distributed scripts under torchrun with NCCL, one process unless --nproc); "
                             "`--fast --device cuda` checks the CUDA paths in one command")
    parser.add_argument("--data-path", type=str, default=None,
                        help="an image folder (one subfolder per class) instead of the digits")
    parser.add_argument("--image-size", type=int, default=8, help="images are center-cropped to this size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exhaustive", action="store_true",
                        help="also cut every 1:2 pattern from the teacher (16 for 8 blocks), recover each with the "
                             "same budget, and rank every method's pick among them (about 13 minutes more)")
    parser.add_argument("--launch", choices=LAUNCHES, default=DEFAULT_LAUNCH,
                        help="how a one-process step starts: fork (Linux: from a process of the run's that has "
                             "imported torch, which saves each of the ~70 steps the 4-5 s of CPU that starting and "
                             "ending python with torch costs) or spawn (a new python process); torchrun's steps "
                             "start their own")
    parser.add_argument("--clear", action="store_true",
                        help="also give the teacher CLEAR's local attention (radius: a quarter of its token grid's "
                             "side, at least 2), its attention layers distilled on its own samples with the recovery "
                             "budget, scored as a row whose FID before recovery is the conversion without "
                             "training (DiT, SiT; about 2 minutes more)")
    return parser.parse_args(argv)


def main(args):
    run_quickstart(args)


if __name__ == "__main__":
    run_script(main, parse_args)
