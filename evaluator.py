r"""Scores generated images against a reference set with the metrics of the ADM suite, in PyTorch:
Inception Score, FID, sFID, precision and recall (k = 3).

    python evaluator.py data/VIRTUAL_imagenet256_labeled.npz samples.npz --out results.json
    python evaluator.py ref.npz teacher.npz pruned.npz recovered.npz --out all.json

Several sample sets are each scored against the reference, whose features are computed once.

Both sets are .npz batches (arr_0: uint8, N x H x W x 3, as sample_ddp.py writes) or folders of
PNG/JPEG images. A reference .npz carrying precomputed Inception statistics (mu, sigma, mu_s,
sigma_s, as ADM's reference batches do) is compared through them; precision and recall need its
images (arr_0) and are skipped without them.

Features come from the FID InceptionV3 (torch-fidelity's port of the TensorFlow graph ADM uses),
whose weights are read from --inception-weights, else from the torch hub cache, else downloaded;
or from a network of one's own (--feature-extractor, a file written by
tinyfusion.evaluation.save_feature_extractor), for images where Inception features mean nothing.
"""

import argparse

from tinyfusion.args import Parser, positive_int
from tinyfusion.cli import run_script
from tinyfusion.evaluation import (
    evaluate_many,
    format_results,
    load_extractor,
    open_images,
    write_results,
)
from tinyfusion.options import RuntimeOptions
from tinyfusion.paths import check_outputs
from tinyfusion.runtime import bootstrap


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("ref_batch", type=str, help="reference set: .npz (images and/or statistics) or image folder")
    parser.add_argument("sample_batches", type=str, nargs="+", help="sample set(s): .npz or image folder")
    features = parser.add_argument_group("features").add_mutually_exclusive_group()
    features.add_argument("--inception-weights", type=str, default=None, metavar="PATH",
                          help="torch-fidelity InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth); "
                               "default: the torch hub cache, downloaded there when missing")
    features.add_argument("--feature-extractor", type=str, default=None, metavar="PATH",
                          help="a feature extractor of one's own, written by save_feature_extractor, instead of "
                               "Inception; precomputed Inception statistics are then not used")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                        help="download the InceptionV3 weights when they are not cached")
    parser.add_argument("--ref-stats", action=argparse.BooleanOptionalAction, default=True,
                        help="use the precomputed statistics of a reference .npz (Inception features only)")
    parser.add_argument("--fid-method", choices=["sqrtm", "eigvals"], default="sqrtm",
                        help="sqrtm: scipy.linalg.sqrtm of the covariance product, as ADM; eigvals: the same trace "
                             "from its eigenvalues, several times faster (scipy >= 1.16's sqrtm takes 20-40 s per "
                             "2048-dim matrix on one core)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto uses CUDA when a GPU is visible")
    parser.add_argument("--out", type=str, default=None, metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def main(args):
    inputs = {"ref_batch": args.ref_batch, **{f"sample batch {i + 1}": p for i, p in enumerate(args.sample_batches)},
              "--inception-weights": args.inception_weights, "--feature-extractor": args.feature_extractor}
    check_outputs({"--out": args.out}, inputs)
    # Every input is opened and checked before the feature network is loaded (or downloaded).
    ref, samples = open_images(args.ref_batch), [open_images(path) for path in args.sample_batches]
    # tf32=False: bootstrap leaves TF32 alone (the feature extractors turn it off while they run)
    with bootstrap(RuntimeOptions(device=args.device, precision="fp32", tf32=False)) as rt:
        extractor = load_extractor(args.feature_extractor, args.inception_weights, download=args.download)
        results = evaluate_many(ref, samples, extractor, batch_size=args.batch_size, device=rt.env.device,
                                use_ref_stats=args.ref_stats, fid_method=args.fid_method, log=print)
    for result in results:
        print(format_results(result))
    if args.out is not None:
        write_results(args.out, results[0] if len(results) == 1 else results)
        print(f"results written to {args.out}")


if __name__ == "__main__":
    run_script(main, parse_args)
