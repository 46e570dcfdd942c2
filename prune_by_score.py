r"""Prune a DiT by a per-block score (depth), by a per-head and per-channel score (width), or both.

Usage:
    python prune_by_score.py --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt \
        --data-path data/imagenet_encoded --save-model outputs/pruned/DiT-D14-Score.pt --n-pruned 14
    torchrun --nproc_per_node=8 prune_by_score.py --ckpt ... --data-path ... --criterion loss --target-depth 14 ...
    python prune_by_score.py --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt \
        --data-path data/imagenet_encoded --save-model outputs/pruned/DiT-XL-W50.pt --width-ratio 0.5

Depth: bi: 1 - cosine similarity of each block's input and output tokens (ShortGPT), averaged over
calibration batches at random timesteps; loss: the increase of the diffusion loss when the block
alone is removed; random: seeded. The least important blocks are pruned; --protect-first and
--protect-last protect blocks explicitly.

Width (Diff-Pruning): --width-ratio R removes the fraction R of the attention heads (whole: their q, k, v
rows and output-projection columns) and of the MLP hidden channels of every block, or of all blocks ranked
together with --global-width. taylor: sum |w * dL/dw| over a unit's weights, the gradient of the
noise-prediction MSE (SiT: the transport's loss) on one batch with fixed noise accumulated over the
timesteps from the data end until the loss falls below --taylor-threshold of its largest (Diff-Pruning's
loop); magnitude: sum w^2; random: seeded. With depth flags too, depth is pruned first, then width.

Scores are printed and saved as JSON; the pruned file records its widths and, in its lineage, the kept
blocks, heads and channels, so every later script loads it with no flags.
"""

from tinyfusion.args import Parser, add_model_args, add_runtime_args, positive_int, to_options
from tinyfusion.cli import run_script
from tinyfusion.options import ScorePruningOptions
from tinyfusion.pruning import CRITERIA, TAYLOR_THRESHOLD, WIDTH_CRITERIA, run_prune_by_score


def parse_args(argv=None):
    parser = Parser(__doc__)
    add_model_args(parser, ckpt_flag="--ckpt", ckpt_required=True)
    add_runtime_args(parser)
    parser.add_argument("--criterion", choices=CRITERIA, default="bi", help="the depth criterion")
    parser.add_argument("--data-path", type=str, default=None,
                        help="features for calibration (bi, loss and the taylor width criterion)")
    parser.add_argument("--num-batches", type=positive_int, default=None,
                        help="calibration batches (default: 16 for the depth criteria, 1 for taylor)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="global calibration batch size")
    depth = parser.add_argument_group("depth (give one, or --width-ratio, or both)")
    target = depth.add_mutually_exclusive_group()
    target.add_argument("--n-pruned", type=int, help="number of blocks to remove")
    target.add_argument("--target-depth", nargs="+", metavar="DEPTH",
                        help="number of blocks to keep: one number over all blocks, or per stack (MAR: "
                             "encoder=8 decoder=8, the least important blocks of each stack pruned within it)")
    depth.add_argument("--protect-first", type=int, default=0,
                       help="never prune the first K blocks (of each stack, with a per-stack --target-depth)")
    depth.add_argument("--protect-last", type=int, default=0,
                       help="never prune the last K blocks (of each stack, with a per-stack --target-depth)")
    width = parser.add_argument_group("width (DiT, SiT)")
    width.add_argument("--width-ratio", type=float, default=None,
                       help="fraction (0 < R < 1) of the attention heads and of the MLP channels to remove")
    width.add_argument("--width-criterion", choices=WIDTH_CRITERIA, default="taylor")
    width.add_argument("--global-width", action="store_true",
                       help="rank heads (and channels) across blocks, so blocks keep different widths (at least "
                            "one head and one channel each)")
    width.add_argument("--taylor-threshold", type=float, default=TAYLOR_THRESHOLD,
                       help="taylor: stop after the first timestep whose loss falls below this fraction of the "
                            "largest so far (0: every timestep)")
    parser.add_argument("--save-model", type=str, required=True)
    parser.add_argument("--save-scores", type=str, default=None,
                        help="scores JSON (default: next to --save-model, .scores.json)")
    return parser.parse_args(argv)


def main(args):
    run_prune_by_score(to_options(ScorePruningOptions, args))


if __name__ == "__main__":
    run_script(main, parse_args)
