"""Sampling a class-conditional DiT: image grids (sample.py) and FID sample sets (sample_ddp.py).

Every image is a function of its own seed. Image i of a run draws its starting noise and the noise
of every sampling step from a generator seeded with `derive_seed(SeedPurpose.SAMPLE_NOISE, seed, i)`, and in an
FID run its class label (uniform over the classes) from `derive_seed(SeedPurpose.SAMPLE_LABEL, seed, i)`. So a
sample set does not depend on the number of processes: at the same per-process batch size it is
byte-identical, because every batch holds the same images (batches are always full: the last one is
padded with extra indices whose images are dropped), and at another batch size it differs only by
float rounding (a rare pixel off by one).

An FID run lives in a run folder:

    RUN/protocol.json       what decides the pixels; running again must match it to resume
    RUN/part-000000.npz     batch b, images b*B .. (b+1)*B-1: "images" uint8 (n, H, W, 3), "labels", "indices"
    RUN/png/000000.png      with --save-png
    RUN/log.txt

A part is written atomically by the one rank that sampled it; running the same command again samples
only the missing parts. Rank 0 then streams the parts into the ADM-format .npz (`arr_0` the uint8
images (N, H, W, 3), `arr_1` the int64 labels (N,), as ADM's class-conditional samples) and writes
the protocol beside it as JSON.

With `latents_dir` (sample_ddp.py --save-latents DIR), the same batches are also kept before decoding,
as a feature set that train.py and train_masked_kd.py read with --data-path DIR (self-generated data):

    DIR/generation.json              the folder's record, written before any shard (resuming must match it)
    DIR/shards/latents-KKKKK.npy     batch k's latents (n, 1, C, H, W) float32: images k*B .. of the run
    DIR/shards/labels-KKKKK.npy      their labels, as in the .npz
    DIR/index.json                   `tinyfusion.features.FeatureIndex`, written when every shard is there

A shard is batch k (shard size = the per-process batch size), written by the rank that sampled it, so
the folder is byte-identical for any number of processes; a batch whose part or shard is missing is
sampled again (it gives the same numbers) and only the missing file is written. The index records the
codec as extraction does (`source["vae"]`, `source["scaling_factor"]`: what training adopts), one copy per
image (no mirror), class names "0" .. "K-1", and under `source["sampling_protocol"]` the protocol the
latents came from (the checkpoint's SHA-256, family and config, sampler, guidance, seeds; its path is in
generation.json).
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from models import unwrap
from models.attention import attention_paths
from models.compiling import CompiledCall, check_compilable
from processes import NoiseProcess, create_process

from .checkpoint import LoadedModel, load_model
from .distributed import DistEnv, barrier, broadcast_object
from .errors import UserError
from .extraction import vae_id
from .features import SeedPurpose, derive_seed, shard_done, write_index, write_shard
from .fileio import atomic_write, atomic_write_json, remove_orphan_temporaries, setting_differences
from .options import SAMPLER_OPTION_FIELDS, SampleGridOptions, SampleSetOptions, SamplingOptions
from .paths import check_outputs, file_sha256
from .precision import PRECISIONS, for_inference, inference_context
from .runtime import Runtime, bootstrap
from .vae import PIXEL_CHANNELS, LatentCodec, load_codec, resolve_codec

# The eight ImageNet classes of the DiT README's sample grid.
SHOWCASE_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)
GRID_NROW = 4
PROTOCOL_FORMAT = "tinyfusion-samples"
PROTOCOL_VERSION = 2
# Protocol fields that do not change a single pixel: a resumed run may differ in them.
_INFORMATIONAL = ("checkpoint_path",)
LATENTS_RECORD = "generation.json"
LATENTS_FORMAT = "tinyfusion-self-generated"


@dataclass(frozen=True)
class SamplingSpec:
    """How images are drawn from a model: everything but the model, the seeds and the labels.

    Attributes:
        sampler: a sampler of the model's noise process (Gaussian: "ddpm", "ddim", "dpm++", "dpm++-sde",
            "unipc", "euler-a", "ddim-hf").
        num_steps: sampling steps (the Gaussian process respaces its training steps to this many).
        cfg_scale: classifier-free guidance scale; 1.0 runs the plain conditional model.
        guide_all_channels: guide every noise channel, not the first 3 (the official choice).
        precision: "fp32", "bf16" or "fp16" (already resolved, not "auto"): the dtype of the model's inference path
            (`tinyfusion.precision.for_inference`, what the sampling scripts load), or autocast's for a float32 model.
        options: the sampler's options (transport ODE: sampling_method, atol, rtol; SDE: sampling_method,
            diffusion_form, diffusion_norm, last_step, last_step_size); `for_process` fills the defaults.
    """

    sampler: str = "ddpm"
    num_steps: int = 250
    cfg_scale: float = 4.0
    guide_all_channels: bool = False
    precision: str = "fp32"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @classmethod
    def for_process(cls, process: NoiseProcess, *, sampler: str | None, num_steps: int | None,
                    options: dict | None = None, data_shape: Sequence[int] | None = None,
                    **kwargs) -> "SamplingSpec":
        """A spec whose sampler, step count and sampler options default to the process's, checked against it
        (and against the model's `data_shape`, when given: see `NoiseProcess.resolve_options`)."""
        sampler = sampler or process.samplers[0]
        if sampler not in process.samplers:
            process.check_sampler(sampler, 2)
        num_steps = num_steps if num_steps is not None else process.default_steps[sampler]
        process.check_sampler(sampler, num_steps)
        options = process.resolve_options(sampler, options, data_shape)
        return cls(sampler=sampler, num_steps=num_steps, options=options, **kwargs)

    def describe(self) -> str:
        """One line for logs: the sampler, its steps and options, guidance and precision."""
        options = "".join(f", {k} {v:g}" if isinstance(v, float) else f", {k} {v}" for k, v in self.options.items())
        return f"{self.sampler}, {self.num_steps} steps{options}, cfg {self.cfg_scale:g}, {self.precision}"

    def sampler_name(self) -> str:
        """The sampler and its method when it has one ("ddpm", "ode-dopri5", "sde-Euler"), for names."""
        method = self.options.get("sampling_method")
        return f"{self.sampler}-{method}" if method else self.sampler


#################################################################################
#                              Model, labels, seeds                             #
#################################################################################

def load_for_sampling(ckpt: str | os.PathLike | None, *, model_name: str | None = None, weights: str = "ema",
                      num_heads: int | None = None, attention: dict | None = None, vae: str | None = None,
                      device: torch.device | str = "cpu", logger: logging.Logger | None = None
                      ) -> tuple[LoadedModel, LatentCodec]:
    """The model (on `device`, eval mode) and the codec that turns its outputs into images.

    Args:
        ckpt: any checkpoint `tinyfusion.checkpoint.load_model` reads.
        model_name, weights, num_heads, attention: as for `load_model`.
        vae: the `--vae` spec ("ema", "mse", a diffusers folder, "none" for pixels); None or "auto" takes
            the codec the checkpoint records (see `tinyfusion.vae.resolve_codec`).
        device: where to sample.
    Raises:
        UserError: no checkpoint, or a model whose input channels the codec does not produce.
    """
    if not ckpt:
        raise UserError("no checkpoint given: pass --ckpt PATH (official DiT weights, a TinyFusion or toolkit file)")
    loaded = load_model(ckpt, model_name, weights=weights, num_heads=num_heads, attention=attention)
    if logger is not None and attention_paths(loaded.model, device):
        logger.info(f"attention: {attention_paths(loaded.model, device)}")
    in_channels = unwrap(loaded.model).data_shape[0]
    spec, why = resolve_codec(vae, loaded.codec, in_channels)
    if logger is not None and vae in (None, "auto"):
        logger.info(f"codec: {spec} ({why})")
    codec = load_codec(spec, device)
    # Pixels are the model's own channels (grayscale or RGB); a VAE makes its latent channels.
    produced = codec.latent_channels(in_channels if in_channels in PIXEL_CHANNELS else 3)
    if in_channels != produced:
        vaes = "--vae kl16 (or a kl16.ckpt)" if in_channels == 16 else "--vae ema or --vae mse (or a VAE folder)"
        fix = (f"this is a latent-space model: pass {vaes}" if codec.vae is None
               else "pass the VAE the model was trained with, or --vae none for a pixel-space model")
        raise UserError(f"the model in {ckpt} takes {in_channels}-channel inputs, but --vae {spec} makes "
                         f"{produced}-channel ones; {fix}")
    loaded.model.to(device).eval()
    return loaded, codec


def resolve_class_labels(labels: Sequence[int] | None, num_classes: int) -> list[int]:
    """The labels of a grid: the given ones, checked, or a default that fits the model.

    The default is the DiT README's eight ImageNet classes for a 1000-class model; their numbers mean
    nothing to a model of another dataset, so there it is the first (up to) eight classes.

    Raises:
        UserError: a label that is not a class of the model.
    """
    if labels is None:
        if num_classes == 1000:
            return list(SHOWCASE_CLASSES)
        return list(range(min(len(SHOWCASE_CLASSES), num_classes)))
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise UserError(f"--class-labels {' '.join(map(str, bad))}: the model has {num_classes} classes, "
                         f"numbered 0 to {num_classes - 1}; pass labels in that range")
    return list(labels)


def image_seeds(seed: int, indices: Iterable[int]) -> list[int]:
    """The noise seed of each image index of a run with seed `seed`."""
    return [derive_seed(SeedPurpose.SAMPLE_NOISE, seed, i) for i in indices]


def image_labels(seed: int, indices: Iterable[int], num_classes: int) -> list[int]:
    """The class label of each image index of an FID run: uniform over the classes, from its own seed."""
    # derive_seed gives 63 bits, so the modulo bias is below 1e-15 for any class count.
    return [derive_seed(SeedPurpose.SAMPLE_LABEL, seed, i) % num_classes for i in indices]


#################################################################################
#                                    Sampling                                   #
#################################################################################

def _denoiser(model: nn.Module, spec: SamplingSpec, device: torch.device) -> Callable:
    """model(x, t, y) as the samplers call it: guided when cfg_scale != 1, in the spec's precision.

    The samplers see one row per image; the conditional/null doubling of classifier-free guidance
    happens in here. This is the official recipe (cat([z, z]), labels cat([y, null]),
    forward_with_cfg, keep the first half) without carrying the unused second half through the
    sampler, which would also draw step noise for it.
    """
    null_class = unwrap(model).num_classes

    def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with inference_context(model, spec.precision, device):
            if spec.cfg_scale == 1.0:
                out = model(x, t, y)
            else:
                out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]),
                                             torch.cat([y, torch.full_like(y, null_class)]), spec.cfg_scale,
                                             guide_all_channels=spec.guide_all_channels)[: len(x)]
        return out.float()

    return denoise


def make_denoiser(model: nn.Module, spec: SamplingSpec, device: torch.device | str, *,
                  compile_backend: str | None = None, log: Callable[[str], None] | None = None) -> Callable:
    """The function the samplers call at every step (model(x, t, y), guided when cfg_scale != 1, in the spec's
    precision); with `compile_backend`, compiled as one graph, guidance included (models/compiling.py: a graph break
    or the recompile limit is an error, and `log` gets one line at the first call).

    Build it once for a run and pass it to `sample_latents` (or `sample_images`) for every batch.

    Raises:
        UserError: a model that cannot be compiled (MAR), or an unknown backend.
    """
    denoise = _denoiser(model, spec, torch.device(device))
    if compile_backend is None:
        return denoise
    step = (f"forward_with_cfg at scale {spec.cfg_scale:g}" if spec.cfg_scale != 1.0 else "forward") + \
        f", {spec.precision}"
    return CompiledCall(denoise, model=model, backend=compile_backend,
                        what=f"the {unwrap(model).arch}'s sampling step ({step})", log=log)


@torch.no_grad()
def sample_latents(model: nn.Module, process: NoiseProcess, labels: torch.Tensor, seeds: Sequence[int],
                   spec: SamplingSpec, *, progress: bool = False, denoise: Callable | None = None) -> torch.Tensor:
    """Samples model inputs (latents, or pixels for a pixel-space model), one per label.

    Sample i depends only on labels[i] and seeds[i]: its starting noise and every step's noise come
    from its own generator, so it is the same in any batch (up to float rounding across batch shapes).

    Args:
        model: a model on its sampling device, eval mode.
        process: the model's noise process (it owns the samplers).
        labels: (N,) class labels, on the model's device.
        seeds: N seeds (see `image_seeds`).
        spec: sampler, steps, guidance and precision.
        progress: show a progress bar over the steps.
        denoise: what the sampler calls at every step, made by `make_denoiser` for this model and spec (a compiled
            one); None: built here, uncompiled.
    Returns:
        (N, C, H, W) float32 samples.
    Raises:
        UserError: a compiled `denoise` for a process that runs the model's own loop (it would go unused; an
            uncompiled one is simply not called).
    """
    device = next(model.parameters()).device
    if len(seeds) != len(labels):
        raise UserError(f"got {len(seeds)} seeds for {len(labels)} labels; give one seed per image")
    inner = unwrap(model)
    if spec.cfg_scale != 1.0 and inner.label_dropout == 0:
        raise UserError("the model has no null class (it was trained without label dropout), so it cannot be "
                         "guided; use --cfg-scale 1")
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    if process.drives_model:  # the model's own loop (MAR's masked iterations)
        if isinstance(denoise, CompiledCall):
            raise UserError(f"--compile: the {process.name} process runs the model's own sampling loop, not a "
                             "denoiser that could be compiled; run without --compile")
        with inference_context(model, spec.precision, device):
            out = process.sample_model(model, labels, generators, sampler=spec.sampler, num_steps=spec.num_steps,
                                       cfg_scale=spec.cfg_scale, progress=progress, options=spec.options)
        return out.float()
    # The same starting noise for every sampler: image i starts from the same noise under each of them.
    noise = torch.stack([torch.randn(tuple(inner.data_shape), generator=g, device=device) for g in generators])
    return process.sample(denoise or _denoiser(model, spec, device), noise, dict(y=labels), sampler=spec.sampler,
                          num_steps=spec.num_steps, generators=generators, progress=progress, options=spec.options)


def sample_images(model: nn.Module, process: NoiseProcess, codec: LatentCodec, labels: torch.Tensor,
                  seeds: Sequence[int], spec: SamplingSpec, *, progress: bool = False,
                  denoise: Callable | None = None) -> torch.Tensor:
    """Images (N, C, H, W), nominally in [-1, 1] (not clamped): `sample_latents`, decoded."""
    return codec.decode(sample_latents(model, process, labels, seeds, spec, progress=progress, denoise=denoise))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] to (N, H, W, 3) uint8, exactly as the official DiT FID code converts.

    Note +128 (not 127.5) and truncation: the reference numbers were computed this way. The ADM format holds
    RGB, so a grayscale model's images (C = 1) are repeated over the three channels (the evaluator's
    grayscale feature extractors read them back unchanged: equal channels have that luma).
    """
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int = GRID_NROW,
              min_side: int = 0, pad_value: float = 0.0) -> Path:
    """Writes images as one PNG grid, `nrow` images per row: the one grid writer of the toolkit.

    Args:
        images: (N, 3, H, W) floats in [-1, 1], or (N, H, W, C) uint8 as a sample set stores them.
        path: the PNG to write (its folder is created).
        nrow: images per row.
        min_side: images smaller than this are enlarged by an integer factor (nearest neighbour), so
            that an 8x8 digit stays visible.
        pad_value: the gray level of the padding between images, in [0, 1].
    """
    from torchvision.utils import save_image

    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    images = (images.float().clamp(-1, 1) + 1) / 2
    if images.shape[-1] < min_side:
        images = torch.nn.functional.interpolate(images, scale_factor=min_side // images.shape[-1], mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=nrow, padding=2, pad_value=pad_value)
    return path


def run_name(ckpt: str | os.PathLike, spec: SamplingSpec, seed: int, num_samples: int | None = None) -> str:
    """A default output name: checkpoint, sampler and steps, guidance, seed (and sample count)."""
    name = f"{Path(ckpt).stem}-{spec.sampler_name()}{spec.num_steps}-cfg{spec.cfg_scale:g}-seed{seed}"
    return name if num_samples is None else f"{name}-n{num_samples}"


#################################################################################
#                                 sample.py: a grid                             #
#################################################################################

def sampler_options(args: SamplingOptions) -> dict:
    """The sampler options a sampling command gave (the flags left at None are the sampler's defaults)."""
    return {name: getattr(args, name) for name in SAMPLER_OPTION_FIELDS if getattr(args, name) is not None}


def guidance_scale(args: SamplingOptions, loaded: LoadedModel) -> float:
    """--cfg-scale, else the family's published scale (`default_cfg_scale(config)`), else the script's default."""
    if args.cfg_scale is not None:
        return args.cfg_scale
    published = getattr(type(unwrap(loaded.model)), "default_cfg_scale", None)
    return published(loaded.config) if published is not None else args.default_cfg_scale


def _prepare(args: SamplingOptions, rt: Runtime) -> tuple[LoadedModel, NoiseProcess, LatentCodec, SamplingSpec]:
    """The model, its process and codec, and the sampling spec of a sampling script's options."""
    loaded, codec = load_for_sampling(args.ckpt, model_name=args.model, weights=args.weights,
                                      num_heads=args.num_heads, attention=args.stated_attention(), vae=args.vae,
                                      device=rt.env.device, logger=rt.logger)
    if args.compiled_with() is not None:  # refused now, before a run folder or its log is written
        check_compilable(loaded.model, args.compiled_with())
    process = create_process(loaded.process)
    spec = SamplingSpec.for_process(process, sampler=args.sampler, num_steps=args.num_sampling_steps,
                                    options=sampler_options(args), data_shape=unwrap(loaded.model).data_shape,
                                    cfg_scale=guidance_scale(args, loaded),
                                    guide_all_channels=args.guide_all_channels, precision=rt.precision)
    for_inference(loaded.model, rt.precision)
    return loaded, process, codec, spec


def run_sample(args: SampleGridOptions) -> Path:
    """sample.py: one PNG grid of the --class-labels, image i seeded from (--seed, i)."""
    check_outputs({"--out": args.out}, {"--ckpt": args.ckpt, "--vae": args.vae})
    with bootstrap(args) as rt:
        if rt.env.distributed:
            raise UserError("sample.py runs in one process; for many images on many GPUs use "
                             "torchrun ... sample_ddp.py")
        loaded, process, codec, spec = _prepare(args, rt)
        denoise = make_denoiser(loaded.model, spec, rt.env.device, compile_backend=args.compiled_with(),
                                log=rt.logger.info)
        num_classes = unwrap(loaded.model).num_classes
        labels = resolve_class_labels(args.class_labels, num_classes)
        if args.class_labels is None:
            rt.logger.info(f"--class-labels not given: classes {labels} of this {num_classes}-class model")
        out = Path(args.out) if args.out else Path("outputs/samples") / f"{run_name(args.ckpt, spec, args.seed)}.png"
        check_outputs({"--out": out}, {"--ckpt": args.ckpt})
        rt.logger.info(f"sampling {len(labels)} images from {args.ckpt} ({loaded.weights} weights) on "
                       f"{rt.env.device.type}: {spec.describe()}, vae {codec.name}")
        images = sample_images(loaded.model, process, codec, torch.tensor(labels, device=rt.env.device),
                               image_seeds(args.seed, range(len(labels))), spec, progress=True, denoise=denoise)
        nfe = getattr(process, "last_nfe", None)
        if nfe is not None:  # the ODE sampler reports how many model calls each image took
            rt.logger.info(f"function evaluations per image: mean {nfe.float().mean():.1f} (min {int(nfe.min())}, "
                           f"max {int(nfe.max())})")
        save_grid(images, out)
        rt.logger.info(f"saved {out}")
    return out


#################################################################################
#                           sample_ddp.py: FID sample sets                      #
#################################################################################

def sampling_protocol(loaded: LoadedModel, codec: LatentCodec, spec: SamplingSpec, *, seed: int, num_samples: int,
                      batch_size: int, device: torch.device, tf32: bool, compile_backend: str | None = None) -> dict:
    """Everything that decides the pixels of an FID sample set, as JSON-ready values.

    Args:
        loaded, codec, spec: the model, its codec and the sampling settings.
        seed: the run's global seed; num_samples: N; batch_size: images per batch (per process).
        device: where sampling runs (CPU and CUDA draw different noise from the same seeds).
        tf32: whether TF32 matmuls were allowed (matters on CUDA only).
        compile_backend: the torch.compile backend of the denoiser (recorded only when compiled: inductor's kernels
            round otherwise than eager ones, so a run resumed with or without --compile is refused).
    """
    config = loaded.config
    channels, size, _ = unwrap(loaded.model).data_shape
    protocol = {
        "format": PROTOCOL_FORMAT, "version": PROTOCOL_VERSION,
        "checkpoint_path": os.path.abspath(loaded.path),
        "checkpoint_sha256": file_sha256(loaded.path),
        "arch": loaded.arch, "model_config": config, "process": loaded.process, "lineage": loaded.lineage,
        "weights": loaded.weights, "sampler": spec.sampler, "num_sampling_steps": spec.num_steps,
        "sampler_options": spec.options,
        "cfg_scale": spec.cfg_scale,
        "guided_channels": channels if spec.guide_all_channels else min(3, channels),
        "vae": codec.name, "image_size": size * codec.downsample,
        "num_classes": unwrap(loaded.model).num_classes,
        "precision": spec.precision, "tf32": bool(tf32 and device.type == "cuda"), "device": device.type,
        "global_seed": seed, "num_samples": num_samples, "per_process_batch_size": batch_size,
        "seeds": f"image i: noise from derive_seed({SeedPurpose.SAMPLE_NOISE}, global_seed, i), label "
                 f"derive_seed({SeedPurpose.SAMPLE_LABEL}, global_seed, i) % num_classes",
        "torch": torch.__version__,
        **({"compile": compile_backend} if compile_backend is not None else {}),
        "arrays": {"arr_0": "uint8 images (N, H, W, 3)", "arr_1": "int64 class labels (N,)"},
    }
    # A JSON round trip, so that a fresh protocol compares equal to one read back from disk.
    return json.loads(json.dumps(protocol))


def _part_path(run_dir: Path, batch: int) -> Path:
    return run_dir / f"part-{batch:06d}.npz"


def _open_run(run_dir: Path, protocol: dict, num_batches: int) -> list[int]:
    """Checks (or records) the protocol of a run folder; returns the batches still to sample.

    Raises:
        UserError: the folder holds parts of another protocol, or parts with no protocol.
    """
    record = run_dir / "protocol.json"
    remove_orphan_temporaries(_part_path(run_dir, 0).parent)  # of an interrupted run's writes
    done = {b for b in range(num_batches) if _part_path(run_dir, b).is_file()}
    if record.is_file():
        recorded = json.loads(record.read_text())
        differences = setting_differences(recorded, protocol, ignore=_INFORMATIONAL)
        if differences:
            raise UserError(
                f"{run_dir} holds samples of another protocol:\n  " + "\n  ".join(differences)
                + "\nRun with the recorded settings to resume it, or pass another --sample-dir (or delete the "
                  "folder) to start afresh.")
    elif any(run_dir.glob("part-*.npz")):
        raise UserError(f"{run_dir} holds sample parts but no protocol.json, so they cannot be trusted; delete the "
                         "folder or pass another --sample-dir")
    else:
        atomic_write_json(record, protocol)
    return [b for b in range(num_batches) if b not in done]


def latents_source(protocol: dict, codec: LatentCodec, in_channels: int) -> dict:
    """The `source` of a self-generated feature set's index: the codec and settings as extraction records them
    (`tinyfusion.extraction.encode_image_folder`), and the sampling protocol the latents came from.

    The protocol names the checkpoint by its SHA-256, not its path, so that the index (which training compares
    by content on resume) stays the same when the checkpoint moves; the path is in DIR/generation.json.
    """
    return {
        "vae": vae_id(codec.name), "scaling_factor": codec.scaling_factor, "image_size": protocol["image_size"],
        "flip": False, "precision": protocol["precision"], "global_seed": protocol["global_seed"],
        "shard_size": protocol["per_process_batch_size"],
        # As extraction: pixels record their channels when they are not RGB (a VAE's images are RGB).
        **({"channels": in_channels} if codec.vae is None and in_channels != 3 else {}),
        "sampling_protocol": {k: v for k, v in protocol.items() if k not in ("arrays", *_INFORMATIONAL)},
    }


def _check_latents(root: Path, source: dict) -> None:
    """Refuses a --save-latents folder that holds anything but (part of) the feature set of `source`.

    Raises:
        UserError: the folder holds features extracted from images, samples of another protocol, or shards
            with no record.
    """
    fix = "use another --save-latents folder (or delete this one to start over)"
    if root.exists() and not root.is_dir():
        raise UserError(f"--save-latents {str(root)!r} is a file; give a folder")
    for name in (LATENTS_RECORD, "index.json"):
        if not (root / name).is_file():
            continue
        found = json.loads((root / name).read_text()).get("source", {})
        if "sampling_protocol" not in found:
            raise UserError(f"--save-latents {str(root)!r} holds features extracted from images (extract_features.py), "
                             f"not samples of a model; {fix}")
        rest = [k for k in source if k != "sampling_protocol"]
        differences = (setting_differences(found, source, names={k: k for k in rest})
                       + setting_differences(found["sampling_protocol"], source["sampling_protocol"]))
        if differences:
            raise UserError(f"--save-latents {str(root)!r} holds samples of another protocol "
                             f"({'; '.join(differences)}); run with the recorded settings to resume it, or {fix}")
        return
    if (root / "shards").is_dir() and any((root / "shards").iterdir()):
        raise UserError(f"--save-latents {str(root)!r} holds shards but no {LATENTS_RECORD} saying how they were "
                         f"made; {fix}")


def _open_latents(root: Path, source: dict, checkpoint_path: str, num_batches: int) -> list[int]:
    """Records `source` (and the checkpoint's path) in a --save-latents folder that `_check_latents` passed;
    returns the batches whose shard is missing."""
    if not (root / LATENTS_RECORD).is_file():
        atomic_write_json(root / LATENTS_RECORD, {"format": LATENTS_FORMAT, "checkpoint_path": checkpoint_path,
                                                  "source": source})
    remove_orphan_temporaries(root / "shards")  # of an interrupted run's writes
    return [b for b in range(num_batches) if not shard_done(root, b)]


def _read_part(run_dir: Path, batch: int, batch_size: int, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, H, W, 3) uint8, labels (n,)) of a part, checked against the indices it must hold."""
    with np.load(_part_path(run_dir, batch)) as part:
        images, labels, indices = part["images"], part["labels"], part["indices"]
    expected = np.arange(batch * batch_size, min((batch + 1) * batch_size, num_samples))
    if not np.array_equal(indices, expected):
        raise UserError(f"{_part_path(run_dir, batch)} does not hold images {expected[0]}..{expected[-1]}; "
                         "delete it and run again to redo it")
    return images, labels


def write_npz(path: str | os.PathLike, run_dir: str | os.PathLike, *, num_samples: int, batch_size: int) -> None:
    """Streams the parts of a run into an ADM-format .npz (`arr_0` images, `arr_1` labels), atomically.

    The images are copied part by part, never all in memory (50,000 at 256 px are 9.8 GB). The zip
    entries carry a fixed timestamp, so the same samples always give the same bytes.
    """
    run_dir, path = Path(run_dir), Path(path)
    num_batches = -(-num_samples // batch_size)
    first, _ = _read_part(run_dir, 0, batch_size, num_samples)
    shape = (num_samples, *first.shape[1:])

    def write(f) -> None:
        labels = []
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            entry = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(entry, "w", force_zip64=True) as npy:
                np.lib.format.write_array_header_1_0(
                    npy, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                          "shape": shape})
                for batch in range(num_batches):
                    images, part_labels = _read_part(run_dir, batch, batch_size, num_samples)
                    npy.write(np.ascontiguousarray(images).tobytes())
                    labels.append(part_labels)
            entry = zipfile.ZipInfo("arr_1.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(entry, "w", force_zip64=True) as npy:
                np.lib.format.write_array(npy, np.concatenate(labels).astype(np.int64))

    atomic_write(path, write)


def _write_pngs(run_dir: Path, batches: Iterable[int], batch_size: int, num_samples: int) -> None:
    from PIL import Image

    for batch in batches:
        images, _ = _read_part(run_dir, batch, batch_size, num_samples)
        for offset, image in enumerate(images):
            png = run_dir / "png" / f"{batch * batch_size + offset:06d}.png"
            if not png.is_file():
                atomic_write(png, lambda f, image=image: Image.fromarray(image).save(f, format="PNG"))


def generate_fid_samples(loaded: LoadedModel, process: NoiseProcess, codec: LatentCodec, spec: SamplingSpec, *,
                         env: DistEnv, seed: int,
                         num_samples: int, batch_size: int, run_dir: str | os.PathLike, npz_path: str | os.PathLike,
                         tf32: bool = False, save_png: bool = False, latents_dir: str | os.PathLike | None = None,
                         compile_backend: str | None = None, logger: logging.Logger | None = None) -> dict:
    """Samples an FID set on every rank of the world, resumably, and assembles the .npz on rank 0.

    Batch b holds images b*B .. (b+1)*B-1 (the last padded past N); the batches not yet on disk are
    dealt round-robin to the ranks, so no two ranks write the same file. With `latents_dir`, each batch's
    latents (before decoding) are shard b of a feature set there (see the module doc).

    Args:
        loaded, process, codec, spec: the model (on env.device), its noise process, its codec and the
            sampling settings.
        env: this process's place in the world.
        seed: the global seed; num_samples: N; batch_size: B, images per batch on each process.
        run_dir: the run folder (parts, protocol.json, png/); npz_path: the final .npz.
        tf32: whether TF32 matmuls are allowed (recorded).
        save_png: also write every image as run_dir/png/INDEX.png.
        latents_dir: also write the samples as latents there (a features folder of `tinyfusion.features`).
        compile_backend: torch.compile the denoiser with this backend (`make_denoiser`; recorded in the protocol);
            None: uncompiled.
        logger: where progress goes (rank 0 logs).
    Returns:
        the protocol; on rank 0 as written beside the .npz, with "npz" and "npz_sha256" added (and "latents",
        "latents_index_sha256" with `latents_dir`).
    Raises:
        UserError: bad counts, a run folder or latents folder of another protocol, or a model that cannot be
            compiled.
    """
    logger = logger or logging.getLogger(__name__)
    if num_samples < 1:
        raise UserError(f"--num-fid-samples must be at least 1, got {num_samples}")
    if batch_size < 1:
        raise UserError(f"--per-proc-batch-size must be at least 1, got {batch_size}")
    run_dir, npz_path = Path(run_dir), Path(npz_path)
    latents_dir = Path(latents_dir) if latents_dir is not None else None
    num_batches = -(-num_samples // batch_size)
    inner = unwrap(loaded.model)
    # Built once (and refused, if it must be, before any folder is touched): every batch calls the same function.
    denoise = make_denoiser(loaded.model, spec, env.device, compile_backend=compile_backend, log=logger.info)
    opened = None
    if env.is_main:
        protocol = sampling_protocol(loaded, codec, spec, seed=seed, num_samples=num_samples,
                                     batch_size=batch_size, device=env.device, tf32=tf32,
                                     compile_backend=compile_backend)
        source = None if latents_dir is None else latents_source(protocol, codec, inner.data_shape[0])
        try:
            # Both folders are checked before either records anything, so a refusal leaves neither changed.
            if source is not None:
                _check_latents(latents_dir, source)
            parts = _open_run(run_dir, protocol, num_batches)
            shards = ([] if source is None else
                      _open_latents(latents_dir, source, protocol["checkpoint_path"], num_batches))
            opened = (None, protocol, parts, shards)
        except ValueError as e:
            opened = (str(e), None, None, None)
    # Every rank stops on a refused folder, instead of waiting for rank 0 at the next barrier.
    error, protocol, parts, shards = broadcast_object(opened)
    if error:
        raise UserError(error)
    parts, shards = set(parts), set(shards)
    todo = sorted(parts | shards)
    logger.info(f"{run_dir}: sampling {len(todo)} of {num_batches} batches of {batch_size} "
                f"({num_batches - len(todo)} already done) on {env.world_size} process(es)")
    if latents_dir is not None:
        logger.info(f"{latents_dir}: {len(shards)} of {num_batches} latent shards to write")

    mine = todo[env.rank::env.world_size]
    for batch in tqdm(mine, desc="batches", disable=not env.is_main):
        indices = range(batch * batch_size, (batch + 1) * batch_size)
        labels = torch.tensor(image_labels(seed, indices, inner.num_classes), device=env.device)
        # One sampling per batch: the images are these latents decoded.
        latents = sample_latents(loaded.model, process, labels, image_seeds(seed, indices), spec,
                                 denoise=denoise)  # (B, C, H, W)
        keep = min(batch_size, num_samples - batch * batch_size)
        kept_labels = labels[:keep].cpu().numpy()
        if batch in parts:
            images = to_uint8(codec.decode(latents))  # (B, H, W, 3) uint8
            atomic_write(_part_path(run_dir, batch), lambda f: np.savez(
                f, images=images[:keep], labels=kept_labels, indices=np.asarray(indices[:keep])))
        if batch in shards:
            write_shard(latents_dir, batch, latents[:keep, None].cpu().numpy(), kept_labels)  # (n, 1, C, H, W)
    barrier()

    if save_png:
        _write_pngs(run_dir, range(env.rank, num_batches, env.world_size), batch_size, num_samples)
        barrier()
    if env.is_main:
        written = {}
        if latents_dir is not None:
            index = write_index(latents_dir, num_batches, num_classes=inner.num_classes,
                                class_names=[str(k) for k in range(inner.num_classes)],
                                source=latents_source(protocol, codec, inner.data_shape[0]))
            written = {"latents": os.path.abspath(latents_dir),
                       "latents_index_sha256": file_sha256(latents_dir / "index.json")}
            logger.info(f"saved {index.num_images} latents {tuple(index.latent_shape)} to {latents_dir} (a --data-path "
                        "of train.py and train_masked_kd.py)")
        write_npz(npz_path, run_dir, num_samples=num_samples, batch_size=batch_size)
        protocol = {**protocol, "npz": os.path.abspath(npz_path), "npz_sha256": file_sha256(npz_path), **written}
        atomic_write_json(npz_path.with_suffix(".json"), protocol)
        logger.info(f"saved {npz_path} ({num_samples} images, {protocol['image_size']} px) and "
                    f"{npz_path.with_suffix('.json')}")
    barrier()
    return protocol


def run_sample_ddp(args: SampleSetOptions) -> Path:
    """sample_ddp.py: an FID sample set under torchrun (or one process), resumable."""
    if args.npz and not args.npz.endswith(".npz"):
        raise UserError(f"--npz {args.npz} must end in .npz (the protocol JSON is written beside it, as .json)")
    inputs = {"--ckpt": args.ckpt, "--vae": args.vae}
    check_outputs({"--npz": args.npz}, inputs, folders={"--sample-dir": args.sample_dir,
                                                         "--save-latents": args.save_latents})
    with bootstrap(args) as rt:
        loaded, process, codec, spec = _prepare(args, rt)
        name = run_name(args.ckpt, spec, args.global_seed, args.num_fid_samples)
        run_dir = Path(args.sample_dir) / name
        npz_path = Path(args.npz) if args.npz else Path(args.sample_dir) / f"{name}.npz"
        check_outputs({"--npz": npz_path, "--npz (its protocol .json)": npz_path.with_suffix(".json")}, inputs,
                      folders={"--sample-dir (run folder)": run_dir, "--save-latents": args.save_latents})
        rt.log_to(run_dir)
        rt.logger.info(f"{args.ckpt} ({loaded.weights} weights): {spec.describe()}, vae {codec.name}, "
                       f"{rt.env.device.type}")
        generate_fid_samples(loaded, process, codec, spec, env=rt.env, seed=args.global_seed,
                             num_samples=args.num_fid_samples, batch_size=args.per_proc_batch_size, run_dir=run_dir,
                             npz_path=npz_path, tf32=args.tf32, save_png=args.save_png,
                             latents_dir=args.save_latents, compile_backend=args.compiled_with(), logger=rt.logger)
    return npz_path


__all__ = [
    "GRID_NROW", "SHOWCASE_CLASSES", "SamplingSpec", "generate_fid_samples", "image_labels", "image_seeds",
    "latents_source", "load_for_sampling", "make_denoiser", "resolve_class_labels", "run_name", "run_sample",
    "run_sample_ddp", "sample_images", "sample_latents", "sampling_protocol", "save_grid", "to_uint8", "write_npz",
]
