r"""Recover a pruned DiT by Masked Knowledge Distillation from its unpruned teacher.

Usage:
    torchrun --nproc_per_node=8 train_masked_kd.py --load-weight outputs/pruned/DiT-D14-Learned.pt \
        --teacher DiT-XL/2 --load-teacher pretrained/DiT-XL-2-256x256.pt --data-path data/imagenet_encoded --epochs 100

loss = alpha * KD + (1 - alpha) * GT + beta * FEAT (TinyFusion, section 3.3). Student block i is
distilled from the teacher block it was pruned from (read from the student checkpoint's lineage);
--layer-map overrides it. Running the same command again resumes the run.

CLEAR (local attention, on the teacher's own samples from `sample_ddp.py --save-latents`):
    sample_ddp.py --ckpt pretrained/DiT-XL-2-256x256.pt --model DiT-XL/2 --num-fid-samples 10000 \
        --save-latents data/self_generated
    torchrun --nproc_per_node=8 train_masked_kd.py --load-weight pretrained/DiT-XL-2-256x256.pt --model DiT-XL/2 \
        --load-teacher pretrained/DiT-XL-2-256x256.pt --teacher DiT-XL/2 --data-path data/self_generated \
        --attention local --attention-radius 8 --max-steps 10000
The student (the teacher's model, or a pruned one) is converted to local attention and only its attention
layers train: loss = GT + 0.5 * PRED + 0.5 * ATTN (tinyfusion/clear.py).
"""

from tinyfusion.args import Parser, add_model_args, add_recovery_args, add_runtime_args, add_training_args, to_options
from tinyfusion.cli import run_script
from tinyfusion.kd import run_masked_kd
from tinyfusion.options import MaskedKDOptions


def parse_args(argv=None):
    parser = Parser(__doc__)
    add_model_args(parser, ckpt_flag="--load-weight")
    add_training_args(parser, global_batch_size=256, ema_decay=0.9999)
    add_runtime_args(parser)
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher", type=str, default=None, metavar="NAME",
                       help="registry name of the teacher; optional, checked against --load-teacher")
    group.add_argument("--load-teacher", type=str, required=True, help="the teacher checkpoint")
    group.add_argument("--teacher-weights", choices=["ema", "model"], default="ema")
    group.add_argument("--teacher-num-heads", type=int, default=None,
                       help="the teacher's head count, for a bare teacher state dict of a non-official width "
                            "(--num-heads is the student's); default: from the teacher's file, --teacher or the "
                            "official sizes")
    group.add_argument("--alpha-kd", type=float, default=0.9, help="weight of KD against the ground-truth loss")
    group.add_argument("--beta-feat", type=float, default=1e-2,
                       help="initial weight of the masked feature loss, decayed linearly to 0; 0 = output KD only")
    group.add_argument("--mask-k", type=float, default=2.0,
                       help="mask hidden-state entries beyond this many std from their mean; 0 disables the mask")
    group.add_argument("--layer-map", type=str, default=None,
                       help="student:teacher block pairs, e.g. '0:0,1:2'; default: from the student's lineage")
    clear = parser.add_argument_group("CLEAR: local attention distilled from the global teacher (--attention local)")
    clear.add_argument("--pred-weight", type=float, default=0.5,
                       help="weight of the prediction distance in gt + pred + attn (CLEAR: 0.5)")
    clear.add_argument("--attn-weight", type=float, default=0.5,
                       help="weight of the attention-output MSE, averaged over layers (CLEAR: 0.5)")
    add_recovery_args(parser)
    return parser.parse_args(argv)


def main(args):
    run_masked_kd(to_options(MaskedKDOptions, args))


if __name__ == "__main__":
    run_script(main, parse_args)
