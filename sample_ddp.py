r"""Sample an FID set from a DiT, SiT or MAR on every GPU (or CPU process) into an ADM-format .npz.

Usage:
    torchrun --nproc_per_node=8 sample_ddp.py --ckpt outputs/pruned/DiT-D14-Learned.pt \
        --num-fid-samples 50000 --cfg-scale 1.5
    torchrun --nproc_per_node=8 sample_ddp.py --ckpt outputs/TinyMAR-D16-KD.pt --num-iter 64 --num-fid-samples 50000

Image i has its own noise seed and class label, both derived from (--global-seed, i), so the .npz is
byte-identical for any number of processes (at the same --per-proc-batch-size). Batches are written
to SAMPLE_DIR/NAME/part-*.npz as they finish; running the same command again resumes, redoing only
missing parts. The result is SAMPLE_DIR/NAME.npz (arr_0: uint8 images N x H x W x 3, arr_1: int64
labels) and NAME.json beside it, the full sampling protocol. NAME is
<checkpoint>-<sampler><steps>-cfg<scale>-seed<seed>-n<N>.

With --save-latents DIR, the same samples are also kept before decoding, with their labels, as a feature
set (the layout extract_features.py writes; its index records the codec and this protocol), so a student
can be trained on the teacher's own samples:
    torchrun --nproc_per_node=8 sample_ddp.py --ckpt pretrained/DiT-XL-2-256x256.pt --model DiT-XL/2 \
        --num-fid-samples 50000 --save-latents data/dit_xl_samples
    torchrun --nproc_per_node=8 train_masked_kd.py --load-weight outputs/pruned/DiT-D14-Learned.pt \
        --teacher DiT-XL/2 --load-teacher pretrained/DiT-XL-2-256x256.pt --data-path data/dit_xl_samples
"""

from tinyfusion.args import Parser, add_model_args, add_runtime_args, add_sampling_args, positive_int, to_options
from tinyfusion.cli import run_script
from tinyfusion.options import SampleSetOptions
from tinyfusion.sampling import run_sample_ddp


def parse_args(argv=None):
    parser = Parser(__doc__)
    add_model_args(parser, ckpt_required=True)
    add_sampling_args(parser, cfg_default=1.5)
    # fp32 (with TF32 on GPUs) by default, as the official DiT FID numbers were sampled.
    add_runtime_args(parser, precision_default="fp32", sampling=True)
    parser.add_argument("--num-fid-samples", type=positive_int, default=50_000)
    parser.add_argument("--per-proc-batch-size", type=positive_int, default=32)
    parser.add_argument("--sample-dir", type=str, default="outputs/samples",
                        help="where the run folder and the .npz go")
    parser.add_argument("--npz", type=str, default=None, help="final .npz path (default: SAMPLE_DIR/NAME.npz)")
    parser.add_argument("--save-png", action="store_true", help="also write every image as SAMPLE_DIR/NAME/png/*.png")
    parser.add_argument("--save-latents", type=str, default=None, metavar="DIR",
                        help="also write the samples before decoding (latents; pixels for a pixel-space model) "
                             "with their labels as a feature set in DIR, for train.py / train_masked_kd.py "
                             "--data-path DIR (self-generated data); resumable like the .npz")
    return parser.parse_args(argv)


def main(args):
    run_sample_ddp(to_options(SampleSetOptions, args))


if __name__ == "__main__":
    run_script(main, parse_args)
