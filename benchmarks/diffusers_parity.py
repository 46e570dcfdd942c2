r"""What a user gets through diffusers' DiTPipeline against this toolkit, on a trained DiT: the forward error on the
exported weights, and the FID of samples drawn through DiTPipeline against the toolkit's from the same noise.

Usage (from the repository root; after `python quickstart.py`):
    python -m benchmarks.diffusers_parity --ckpt results/quickstart/models/teacher.pt \
        --ref results/quickstart/data/real_a.npz --feature-extractor results/quickstart/classifier.pt \
        --out results/diffusers-parity

The checkpoint is exported as `python -m tinyfusion.diffusers_io export` writes it (into a temporary folder) and
loaded with `DiTPipeline.from_pretrained` (a pixel-space model with `PixelDecoder`, a hub VAE with the codec the
toolkit loads). Forward: the two networks on the same random inputs (x ~ N(0, 1), t uniform over the training
steps, labels uniform, the null class included). Sampling: --num-samples images, image i from the noise and label
sample_ddp.py gives it (the pipeline takes one generator per image), --num-sampling-steps of DDIM:
- "DiTPipeline": the pipeline as exported, as a user runs it;
- "DiTPipeline, DiT frequencies": its timestep embedding set to DiT's spacing (`downscale_freq_shift = 0`), the one
  numerical difference between the two implementations;
- "toolkit ddim-hf": this toolkit's model under the same DDIMScheduler (`--sampler ddim-hf`);
- "toolkit ddim": the official DDIM loop (`--sampler ddim`; its respacing keeps both ends of the schedule, where
  DDIMScheduler steps by 1000 // N from 0).
DiTPipeline guides with the null label 1000 and every latent channel: a model of other classes samples unguided
(--cfg-scale is then 1), and the toolkit guides every channel here to draw the same images. Prints the table, the
largest pixel difference between the pipeline's images and the toolkit's, and writes OUT.json; the toolkit's ddim-hf
drawn again with --spread-seeds other seeds shows how far FID moves with the sampling noise alone.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from benchmarks.harness import device_name, format_table
from models import unwrap
from processes import create_process
from tinyfusion.args import Parser, positive_int
from tinyfusion.cli import run_script
from tinyfusion.diffusers_io import PixelDecoder, dit_frequencies, export_pipeline
from tinyfusion.evaluation import evaluate, load_extractor
from tinyfusion.fileio import atomic_write_json
from tinyfusion.paths import check_outputs
from tinyfusion.sampling import SamplingSpec, image_labels, image_seeds, load_for_sampling, sample_images, to_uint8

# DiTPipeline's null label: ImageNet's 1000 classes (pipeline_dit.py), whatever the model's class count.
PIPELINE_NULL_CLASS = 1000
COLUMNS = [("sampler", "{}"), ("seed", "{}"), ("fid", "{:.3f}"), ("max_pixel_diff", "{}"),
           ("mean_pixel_diff", "{:.4f}")]


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--ckpt", required=True, help="a DiT checkpoint (what tinyfusion.diffusers_io exports)")
    parser.add_argument("--vae", default="auto", help="the codec (default: the one the checkpoint records)")
    parser.add_argument("--ref", required=True, help="reference images or statistics (.npz or folder)")
    parser.add_argument("--feature-extractor", default=None, help="feature-extractor file; default Inception")
    parser.add_argument("--num-samples", type=positive_int, default=898)
    parser.add_argument("--num-sampling-steps", type=positive_int, default=10)
    parser.add_argument("--cfg-scale", type=float, default=1.5,
                        help="guidance of a 1000-class model (others sample unguided: DiTPipeline's null label)")
    parser.add_argument("--forward-batches", type=positive_int, default=4, help="random batches of 64 compared")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spread-seeds", type=int, default=2,
                        help="the toolkit's ddim-hf also with this many other seeds: how far FID moves with the noise")
    parser.add_argument("--out", default=None, help="write OUT.json")
    return parser.parse_args(argv)


@torch.no_grad()
def forward_error(model, transformer, batches: int, num_steps: int) -> dict:
    """max and mean |diffusers - toolkit| of the outputs on random inputs, and the largest output."""
    inner = unwrap(model)
    g = torch.Generator().manual_seed(0)
    worst, total, count, largest = 0.0, 0.0, 0, 0.0
    for _ in range(batches):
        x = torch.randn(64, *inner.data_shape, generator=g)
        t = torch.randint(0, num_steps, (64,), generator=g)
        y = torch.randint(0, inner.num_classes + 1, (64,), generator=g)
        ours, theirs = model(x, t, y), transformer(x, timestep=t, class_labels=y).sample
        diff = (theirs - ours).abs()
        worst, total, count = max(worst, diff.max().item()), total + diff.sum().item(), count + diff.numel()
        largest = max(largest, ours.abs().max().item())
    return {"max_abs_diff": worst, "mean_abs_diff": total / count, "largest_output": largest}


def main(args) -> dict:
    check_outputs({"--out": args.out and f"{args.out}.json"},
                  {"--ckpt": args.ckpt, "--ref": args.ref, "--feature-extractor": args.feature_extractor})
    from diffusers import DiTPipeline

    loaded, codec = load_for_sampling(args.ckpt, vae=args.vae)
    model, process = loaded.model, create_process(loaded.process)
    inner = unwrap(model)
    guided = inner.num_classes == PIPELINE_NULL_CLASS
    cfg = args.cfg_scale if guided else 1.0
    with tempfile.TemporaryDirectory() as tmp:
        export_pipeline(loaded, f"{tmp}/pipeline", vae=args.vae)
        # the pipeline's decoder: the exported vae/ folder, else the codec the toolkit loaded (a pixel model's: none)
        vae = {} if os.path.isdir(f"{tmp}/pipeline/vae") else {"vae": codec.vae or PixelDecoder()}
        pipe = DiTPipeline.from_pretrained(f"{tmp}/pipeline", **vae)
    pipe.set_progress_bar_config(disable=True)
    forward = forward_error(model, pipe.transformer, args.forward_batches, process.time_domain().steps)
    extractor = load_extractor(args.feature_extractor)

    def pipeline_images(shift: float) -> np.ndarray:
        labels, seeds = draws(args.seed)
        dit_frequencies(pipe.transformer, shift)
        images = []
        for begin in range(0, args.num_samples, args.batch_size):
            part = slice(begin, begin + args.batch_size)
            out = pipe(class_labels=labels[part], guidance_scale=cfg, num_inference_steps=args.num_sampling_steps,
                       generator=[torch.Generator().manual_seed(s) for s in seeds[part]], output_type="pt").images
            images.append(to_uint8(out * 2 - 1))  # the pipeline maps [-1, 1] to [0, 1]; back, then as the toolkit
        dit_frequencies(pipe.transformer, 1.0)
        return np.concatenate(images)

    def toolkit_images(sampler: str, seed: int) -> np.ndarray:
        labels, seeds = draws(seed)
        spec = SamplingSpec.for_process(process, sampler=sampler, num_steps=args.num_sampling_steps, cfg_scale=cfg,
                                        guide_all_channels=True)
        y = torch.tensor(labels)
        return np.concatenate([to_uint8(sample_images(model, process, codec, y[b:b + args.batch_size],
                                                      seeds[b:b + args.batch_size], spec))
                               for b in range(0, args.num_samples, args.batch_size)])

    def draws(seed: int) -> tuple[list[int], list[int]]:
        indices = range(args.num_samples)
        return image_labels(seed, indices, inner.num_classes), image_seeds(seed, indices)

    def fid(images: np.ndarray) -> float:
        return evaluate(args.ref, images, extractor, progress=False, fid_method="eigvals")["metrics"]["fid"]

    sets = {"DiTPipeline": pipeline_images(1.0), "DiTPipeline, DiT frequencies": pipeline_images(0.0),
            "toolkit ddim-hf": toolkit_images("ddim-hf", args.seed), "toolkit ddim": toolkit_images("ddim", args.seed)}
    reference = sets["toolkit ddim-hf"].astype(np.int16)
    rows = []
    for name, images in sets.items():
        diff = np.abs(images.astype(np.int16) - reference)
        rows.append({"sampler": name, "seed": args.seed, "fid": fid(images), "max_pixel_diff": int(diff.max()),
                     "mean_pixel_diff": float(diff.mean())})
    for k in range(1, args.spread_seeds + 1):
        rows.append({"sampler": "toolkit ddim-hf", "seed": args.seed + k,
                     "fid": fid(toolkit_images("ddim-hf", args.seed + k))})
    result = {"ckpt": args.ckpt, "device": device_name(torch.device("cpu")), "feature_space": extractor.name,
              "num_samples": args.num_samples, "num_sampling_steps": args.num_sampling_steps, "cfg_scale": cfg,
              "forward": forward, "rows": rows}
    print(f"forward on {args.forward_batches} x 64 random inputs: max |diffusers - toolkit| "
          f"{forward['max_abs_diff']:.3g}, mean {forward['mean_abs_diff']:.3g}, largest output "
          f"{forward['largest_output']:.3g}")
    print(f"{args.num_samples} images, DDIM {args.num_sampling_steps} steps, cfg {cfg:g}; pixel differences against "
          "the toolkit's ddim-hf images (uint8), FID in " + extractor.name)
    print(format_table(rows, COLUMNS))
    if args.out:
        atomic_write_json(f"{args.out}.json", result)
    return result


if __name__ == "__main__":
    run_script(main, parse_args)
