r"""Fine-tune a pruned DiT (or train one from scratch) with DDP, EMA, mixed precision and exact resume.

Usage:
    torchrun --nproc_per_node=8 train.py --model DiT-D14/2 --load-weight outputs/pruned/DiT-D14-Learned.pt \
        --data-path data/imagenet_encoded --epochs 100 --prefix D14-Learned-Finetuning

Checkpoints go to RESULTS_DIR/PREFIX/checkpoints every --ckpt-every steps; running the same command
again resumes from the latest one. `--model` is optional when the checkpoint describes itself.
"""

from tinyfusion.args import Parser, add_model_args, add_recovery_args, add_runtime_args, add_training_args, to_options
from tinyfusion.cli import run_script
from tinyfusion.options import TrainOptions
from tinyfusion.training import run_train


def parse_args(argv=None):
    parser = Parser(__doc__)
    add_model_args(parser, ckpt_flag="--load-weight")
    add_training_args(parser, global_batch_size=256, ema_decay=0.9999)
    add_runtime_args(parser)
    add_recovery_args(parser)
    return parser.parse_args(argv)


def main(args):
    run_train(to_options(TrainOptions, args))


if __name__ == "__main__":
    run_script(main, parse_args)
