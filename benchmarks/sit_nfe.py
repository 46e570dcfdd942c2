r"""FID against the number of function evaluations of a SiT's ODE samplers: Euler, Heun and dopri5.

Usage (from the repository root; after `python quickstart.py --family sit`):
    python -m benchmarks.sit_nfe --ckpt results/quickstart-sit/models/teacher.pt \
        --ref results/quickstart-sit/data/real_b.npz --feature-extractor results/quickstart-sit/classifier.pt \
        --out results/sit_nfe

Every sampler draws the same images (image i from the same seed and label) with classifier-free
guidance; FID is computed against the reference set in the extractor's feature space. Euler and Heun
run on fixed grids of --grid-points (NFE: points - 1 and 2 (points - 1)); dopri5 runs at each --rtol
(NFE: its mean over the images, each image integrated alone). Prints a table and writes OUT.json and
OUT.png (FID against NFE, log scale).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from processes import create_process
from tinyfusion.args import Parser, positive_int
from tinyfusion.checkpoint import load_model
from tinyfusion.errors import UserError
from tinyfusion.evaluation import evaluate, load_extractor
from tinyfusion.fileio import atomic_write_json
from tinyfusion.paths import check_outputs
from tinyfusion.sampling import SamplingSpec, image_labels, image_seeds, sample_latents, to_uint8


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--ckpt", required=True, help="a SiT checkpoint (pixel space, or decoded by --vae none only)")
    parser.add_argument("--ref", required=True, help="reference images (.npz or folder)")
    parser.add_argument("--feature-extractor", default=None, help="feature-extractor file; default Inception")
    parser.add_argument("--num-samples", type=positive_int, default=898)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--grid-points", type=positive_int, nargs="+", default=[3, 5, 9, 17, 33],
                        help="fixed-grid points of Euler and Heun (steps: points - 1)")
    parser.add_argument("--rtol", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3], help="dopri5 tolerances")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads; dopri5 integrates each image alone, where one thread is fastest")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    return parser.parse_args(argv)


def main(args) -> list[dict]:
    check_outputs({"--out (.json)": args.out and f"{args.out}.json", "--out (.png)": args.out and f"{args.out}.png"},
                  {"--ckpt": args.ckpt, "--ref": args.ref})
    torch.set_num_threads(args.threads)
    loaded = load_model(args.ckpt)
    if loaded.process.get("name") != "transport":
        raise UserError(f"--ckpt {args.ckpt} is a {loaded.arch} on the {loaded.process.get('name')} process; this "
                         "benchmark compares the transport's ODE samplers (give a SiT checkpoint)")
    if tuple(loaded.model.data_shape)[0] != 3:
        raise UserError(f"--ckpt {args.ckpt} is a latent-space model; this benchmark scores pixel-space models")
    model, process = loaded.model.eval(), create_process(loaded.process)
    extractor = load_extractor(args.feature_extractor)
    indices = range(args.num_samples)
    labels = torch.tensor(image_labels(args.seed, indices, loaded.config["num_classes"]))
    seeds = image_seeds(args.seed, indices)
    runs = [("euler", {"sampling_method": "euler"}, points) for points in args.grid_points]
    runs += [("heun", {"sampling_method": "heun"}, points) for points in args.grid_points]
    runs += [("dopri5", {"sampling_method": "dopri5", "rtol": rtol, "atol": rtol * 1e-3}, 2) for rtol in args.rtol]
    rows = []
    for name, options, points in runs:
        spec = SamplingSpec.for_process(process, sampler="ode", num_steps=points, options=options,
                                        cfg_scale=args.cfg_scale)
        start, images, nfe = time.time(), [], []
        for begin in range(0, args.num_samples, args.batch_size):
            part = slice(begin, begin + args.batch_size)
            images.append(to_uint8(sample_latents(model, process, labels[part], seeds[part], spec)))
            nfe.append(process.last_nfe.float())
        metrics = evaluate(args.ref, np.concatenate(images), extractor, progress=False)["metrics"]
        rows.append({"sampler": name, "grid_points": points if name != "dopri5" else None,
                     "rtol": options.get("rtol"), "nfe": float(torch.cat(nfe).mean()), "fid": metrics["fid"],
                     "seconds": time.time() - start})
        print(f"{name:7s} {'points ' + str(points) if name != 'dopri5' else 'rtol ' + str(options['rtol']):12s} "
              f"NFE {rows[-1]['nfe']:6.1f}  FID {metrics['fid']:7.2f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    print("\n| sampler | grid points / rtol | NFE | FID |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['grid_points'] or r['rtol']} | {r['nfe']:.1f} | {r['fid']:.2f} |")
    if args.out:
        atomic_write_json(f"{args.out}.json", {"ckpt": args.ckpt, "ref": args.ref, "feature_space": extractor.name,
                                               "num_samples": args.num_samples, "cfg_scale": args.cfg_scale,
                                               "rows": rows})
        _plot(rows, f"{args.out}.png", extractor.name)
    return rows


def _plot(rows: list[dict], path: str, feature_space: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, marker in (("euler", "o"), ("heun", "s"), ("dopri5", "^")):
        points = sorted((r["nfe"], r["fid"]) for r in rows if r["sampler"] == name)
        if points:
            ax.plot(*zip(*points), marker=marker, label=name)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("function evaluations (NFE)")
    ax.set_ylabel(f"FID ({feature_space})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    from tinyfusion.cli import run_script

    run_script(main, parse_args)
