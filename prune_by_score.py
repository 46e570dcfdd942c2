r"""Prune a DiT by a per-block score: ShortGPT block influence, loss sensitivity, or at random.

Usage:
    python prune_by_score.py --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt \
        --data-path data/imagenet_encoded --save-model outputs/pruned/DiT-D14-Score.pt --n-pruned 14
    torchrun --nproc_per_node=8 prune_by_score.py --ckpt ... --data-path ... --criterion loss --target-depth 14 ...

bi: 1 - cosine similarity of each block's input and output tokens (ShortGPT), averaged over
calibration batches at random timesteps; loss: the increase of the diffusion loss when the block
alone is removed; random: seeded. The least important blocks are pruned; --protect-first and
--protect-last protect blocks explicitly. Scores are printed as a table and saved as JSON.
"""

from tinyfusion.args import Parser, add_model_args, add_runtime_args, positive_int, to_options
from tinyfusion.cli import run_script
from tinyfusion.options import ScorePruningOptions
from tinyfusion.pruning import CRITERIA, run_prune_by_score


def parse_args(argv=None):
    parser = Parser(__doc__)
    add_model_args(parser, ckpt_flag="--ckpt", ckpt_required=True)
    add_runtime_args(parser)
    parser.add_argument("--criterion", choices=CRITERIA, default="bi")
    parser.add_argument("--data-path", type=str, default=None, help="features for calibration (bi and loss)")
    parser.add_argument("--num-batches", type=positive_int, default=16, help="calibration batches")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="global calibration batch size")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--n-pruned", type=int, help="number of blocks to remove")
    target.add_argument("--target-depth", nargs="+", metavar="DEPTH",
                        help="number of blocks to keep: one number over all blocks, or per stack (MAR: "
                             "encoder=8 decoder=8, the least important blocks of each stack pruned within it)")
    parser.add_argument("--protect-first", type=int, default=0,
                        help="never prune the first K blocks (of each stack, with a per-stack --target-depth)")
    parser.add_argument("--protect-last", type=int, default=0,
                        help="never prune the last K blocks (of each stack, with a per-stack --target-depth)")
    parser.add_argument("--save-model", type=str, required=True)
    parser.add_argument("--save-scores", type=str, default=None,
                        help="scores JSON (default: next to --save-model, .scores.json)")
    return parser.parse_args(argv)


def main(args):
    run_prune_by_score(to_options(ScorePruningOptions, args))


if __name__ == "__main__":
    run_script(main, parse_args)
