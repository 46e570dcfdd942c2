r"""Learn which blocks to keep (TinyFusion): differentiable N:M layer gates trained with weight updates.

Usage:
    torchrun --nproc_per_node=8 prune_by_learning.py --model DiT-XL-1-2 \
        --load-weight pretrained/DiT-XL-2-256x256.pt --data-path data/imagenet_encoded --epochs 1 \
        --global-batch-size 128 --delta-w --lora --save-model outputs/pruned/DiT-D14-Learned.pt

`--model` is a gated preset (DiT-XL-1-2, DiT-XL-2-4, DiT-XL-7-14, DiT-XL-1-4, DiT-D14-1-2, DiT-D14-2-4)
or any registry model with `--groups` (e.g. "14x1:2", "7x2:4", "2x2:4,3:4,..."). The decision is read
from the EMA of the gates; the weight updates are discarded and the kept blocks are cut from the
original weights. The run folder holds decisions.jsonl, decisions.json and decisions.png.
"""

from tinyfusion.args import Parser, add_model_args, add_runtime_args, add_training_args, positive_int, to_options
from tinyfusion.cli import run_script
from tinyfusion.lora import DEFAULT_TARGETS
from tinyfusion.options import LearnedPruningOptions
from tinyfusion.pruning import run_prune_by_learning


def parse_args(argv=None):
    parser = Parser(__doc__)
    add_model_args(parser, ckpt_flag="--load-weight", allow_gated=True)
    add_training_args(parser, global_batch_size=128, ema_decay=None,
                      ema_help="EMA decay of the gates, whose average gives the decision (default: from the run "
                               "length, a window of 10%% of the steps: 0.98 for 500 steps, 0.999 for 10,000)")
    add_runtime_args(parser)
    group = parser.add_argument_group("gates")
    group.add_argument("--groups", type=str, nargs="+", default=None,
                       help="N:M groups over the blocks, e.g. '14x1:2' (overrides a gated preset's groups); for a "
                            "model of several block stacks, over their concatenation or per stack "
                            "(encoder=8x1:2 decoder=8x1:2)")
    group.add_argument("--tau-range", type=float, nargs=2, default=[4.0, 0.1], metavar=("START", "END"),
                       help="Gumbel-softmax temperature, annealed linearly per step")
    group.add_argument("--scaling-range", type=float, nargs=2, default=[1e2, 1e2], metavar=("START", "END"),
                       help="gate logit scaling, annealed linearly per step")
    group.add_argument("--gate-lr-mult", type=float, default=10.0, help="gate learning rate = --lr times this")
    group.add_argument("--stop-at-confidence", type=float, default=None, metavar="C",
                       help="end before the last step once every group's EMA confidence is at least C and the raw "
                            "gates keep the same blocks (checked at each log step); the steps then cap the run. "
                            "Unset: every step runs")
    group = parser.add_argument_group("weight updates")
    group.add_argument("--delta-w", action="store_true",
                       help="train weight updates jointly with the gates (simulating the fine-tuning to come)")
    group.add_argument("--lora", action="store_true", help="make the weight updates LoRA (else full weights)")
    group.add_argument("--lora-rank", type=positive_int, default=8)
    group.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    group.add_argument("--lora-targets", type=str, nargs="+", default=list(DEFAULT_TARGETS),
                       help="the Linear layers LoRA adapts: all (every Linear of the model, embedders and final "
                            "layer included, as the reference TinyFusion), blocks (those of the blocks), or layer "
                            "names within a block (attn.qkv mlp.fc1 ...)")
    parser.add_argument("--save-model", type=str, required=True, help="where to write the pruned model")
    parser.set_defaults(epochs=None)
    return parser.parse_args(argv)


def main(args):
    run_prune_by_learning(to_options(LearnedPruningOptions, args))


if __name__ == "__main__":
    run_script(main, parse_args)
