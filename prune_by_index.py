r"""Prune a DiT to a chosen set of blocks: by index, or by a preset pattern (BK-SDM oracle, first K).

Usage:
    python prune_by_index.py --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt \
        --kept-indices 0 2 4 6 8 10 12 15 17 19 21 23 25 27 --save-model outputs/pruned/DiT-D14-Oracle.pt
    python prune_by_index.py --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt --preset oracle \
        --save-model oracle.pt

The bracketed form copied from the TinyFusion README works too: --kept-indices "[0, 2, 4]".
"""

from tinyfusion.args import Parser, add_model_args, to_options
from tinyfusion.cli import run_script
from tinyfusion.options import IndexPruningOptions
from tinyfusion.pruning import run_prune_by_index


def parse_args(argv=None):
    parser = Parser(__doc__)
    add_model_args(parser, ckpt_flag="--ckpt", ckpt_required=True)
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--kept-indices", type=str, nargs="+",
                        help="blocks to keep: flat indices (0 2 4), or per stack (encoder=0,2 decoder=1,3)")
    choice.add_argument("--pruned-indices", type=str, nargs="+", help="blocks to remove (same forms)")
    choice.add_argument("--preset", choices=["oracle", "first-k"],
                        help="oracle: BK-SDM's pattern at half depth; first-k: the first --target-depth blocks")
    parser.add_argument("--target-depth", type=int, default=None, help="depth kept by --preset first-k")
    parser.add_argument("--save-model", type=str, required=True)
    return parser.parse_args(argv)


def main(args):
    run_prune_by_index(to_options(IndexPruningOptions, args))


if __name__ == "__main__":
    run_script(main, parse_args)
