r"""Encode an ImageFolder into VAE latents, in the sharded feature layout that training reads.

Usage:
    torchrun --nproc_per_node=8 extract_features.py --model DiT-XL/2 \
        --data-path data/imagenet/train --features-path data/imagenet_encoded
    python extract_features.py --vae none --no-flip --image-size 8 --data-path data/digits \
        --features-path data/digits_pixels

Each image is ADM-center-cropped to --image-size and stored with its horizontal mirror (--no-flip
stores the image alone). Re-running the same command after an interruption finishes the job,
skipping the shards already written; the result is the same for any number of processes.
"""

import argparse

from models import plain_names
from tinyfusion.args import Parser, add_runtime_args, nonnegative_int, positive_int
from tinyfusion.cli import run_script
from tinyfusion.distributed import default_num_workers
from tinyfusion.extraction import check_channels, check_model_inputs, encode_image_folder
from tinyfusion.images import list_image_folder
from tinyfusion.options import RuntimeOptions
from tinyfusion.paths import check_outputs
from tinyfusion.runtime import bootstrap
from tinyfusion.vae import load_codec


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--data-path", type=str, required=True,
                        help="ImageFolder: one subfolder per class (label = sorted position), images inside")
    parser.add_argument("--features-path", type=str, required=True,
                        help="output folder; an interrupted extraction there is resumed")
    parser.add_argument("--model", choices=plain_names(), default=None, metavar="NAME",
                        help="the model the features are for: checks that its input channels and patch size "
                             "fit the latents (no weights are loaded)")
    parser.add_argument("--vae", type=str, default="ema",
                        help="ema or mse (stabilityai/sd-vae-ft-*), a local diffusers folder, kl16 (MAR's KL-16 at "
                             "pretrained_models/vae/kl16.ckpt) or a path to a kl16.ckpt, or none (pixels)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the ADM center crop")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                        help="also store each image's horizontal mirror; turn off for data whose mirror "
                             "changes its class, such as digits")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="images per shard file")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per VAE call, per process")
    parser.add_argument("--num-workers", type=nonnegative_int, default=default_num_workers(),
                        help="image-decoding workers per process (default: this machine's cores per process, less "
                             "one, at most 8)")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=3,
                        help="pixel features (--vae none): 3 for RGB, 1 for grayscale data (PIL's luma)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out unreadable images (listed in skipped.json) instead of stopping")
    add_runtime_args(parser, precision_default="fp32")
    return parser.parse_args(argv)


def main(args):
    check_channels(args.vae, args.channels)
    check_outputs({}, {"--data-path": args.data_path, "--vae": args.vae},
                  folders={"--features-path": args.features_path})
    # A long timeout: ranks wait at the last barrier for the slowest, and a resumed run can leave
    # them uneven work. A rank that dies still stops the others (torchrun ends the group).
    with bootstrap(RuntimeOptions(args.device, args.precision, args.tf32), timeout_minutes=24 * 60) as rt:
        codec = load_codec(args.vae, rt.env.device)
        if args.model is not None:
            check_model_inputs(args.model, codec, args.image_size)
        images = list_image_folder(args.data_path)
        encode_image_folder(images, args.features_path, codec, rt.env, image_size=args.image_size, flip=args.flip,
                            shard_size=args.shard_size, batch_size=args.batch_size, num_workers=args.num_workers,
                            global_seed=args.global_seed, precision=rt.precision, skip_bad=args.skip_bad,
                            channels=args.channels, logger=rt.logger)


if __name__ == "__main__":
    run_script(main, parse_args)
