r"""Sample a PNG grid of images from a DiT, SiT or MAR: official weights, a pruned TinyFusion model or a toolkit
file.

Usage:
    python sample.py --ckpt outputs/pruned/DiT-D14-Learned.pt --seed 5464
    python sample.py --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt --class-labels 88 279 --cfg-scale 1.5 \
        --sampler dpm++ --num-sampling-steps 20 --out grid.png
    python sample.py --model SiT-XL/2 --ckpt pretrained/SiT-XL-2-256.pt --sampler ode --sampling-method dopri5
    python sample.py --ckpt outputs/TinyMAR-D16-KD.pt --num-iter 64

Image i of the grid starts from the noise of seed (--seed, i) (the same noise sample_ddp.py gives image
i of a run with --global-seed equal to --seed). The image size follows from the checkpoint and the VAE.
Without --class-labels, a 1000-class (ImageNet) model draws the eight classes of the DiT README
grid, any other model its first eight classes.
"""

from tinyfusion.args import Parser, add_model_args, add_runtime_args, add_sampling_args, to_options
from tinyfusion.cli import run_script
from tinyfusion.options import SampleGridOptions
from tinyfusion.sampling import run_sample


def parse_args(argv=None):
    parser = Parser(__doc__)
    add_model_args(parser, ckpt_required=True)
    add_sampling_args(parser, cfg_default=4.0)
    add_runtime_args(parser, seed_flag="--seed", sampling=True)
    parser.add_argument("--class-labels", type=int, nargs="+", default=None,
                        help="classes to draw, one image each (None: see above)")
    parser.add_argument("--out", type=str, default=None,
                        help="PNG path (None: outputs/samples/<checkpoint>-<sampler><steps>-cfg<scale>-seed<seed>.png)")
    return parser.parse_args(argv)


def main(args):
    run_sample(to_options(SampleGridOptions, args))


if __name__ == "__main__":
    run_script(main, parse_args)
