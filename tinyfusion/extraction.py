"""Encoding an image folder into the sharded feature layout of `tinyfusion.features`.

Names: what this writes are a model's inputs, the codec's latents (pixels for a pixel-space model),
kept under `--features-path` because that is DiT's name for them; `encode_image_folder` makes them.
The evaluator's outputs of Inception (or of a small classifier) are embeddings, made by
`tinyfusion.evaluation.embed_images`.

Work split: shard k holds images [k * shard_size, (k + 1) * shard_size) of the sorted listing
(`tinyfusion.images.list_image_folder`); rank k % world_size alone encodes it and writes its
files, so no two ranks touch one file.

Results do not depend on the number of processes: batches never cross a shard boundary (a
shard is cut into the same batches whichever rank has it), and the VAE posterior sample of copy
c (0 the image, 1 its mirror) of image i comes from its own generator, seeded by
`encode_seed(global_seed, i, c)` and drawn on the CPU.

Resuming is running the same command again: FEATURES/extraction.json records the settings
before any shard is written, shards already on disk are skipped, and a folder made with other
settings is refused rather than mixed.

Unreadable images stop the run, naming the file. With `skip_bad`, such an image is left out:
its shard holds one image fewer, every other image keeps its shard, position and seed, and the
labels stay aligned with the latents. Skipped images are logged, recorded per shard in
shards/skipped-KKKKK.json (so a resumed run still knows them), and gathered into skipped.json
and the index's `source["skipped"]`.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models import ARCHITECTURES, registry_spec

from .distributed import DistEnv, barrier
from .errors import UserError
from .features import FeatureIndex, SeedPurpose, derive_seed, shard_done, write_index, write_shard
from .fileio import atomic_write_json, remove_orphan_temporaries, setting_differences
from .images import CroppedImages, ImageList
from .precision import autocast
from .vae import HUB_VAES, LatentCodec

PLAN_FILE = "extraction.json"
SKIPPED_FILE = "skipped.json"
PLAN_FORMAT = "tinyfusion-extraction"

# Settings that change what a shard holds, and the flag that sets each: a folder made with other
# values is refused. The data path is not among them (a moved folder holds the same images;
# `files_sha256` checks that).
_SETTING_FLAGS = {
    "vae": "--vae", "scaling_factor": "the VAE's scaling factor", "image_size": "--image-size",
    "flip": "--flip/--no-flip", "precision": "--precision", "global_seed": "--global-seed",
    "shard_size": "--shard-size", "num_files": "the images in --data-path",
    "files_sha256": "the images in --data-path",
}


def encode_seed(global_seed: int, index: int, copy: int) -> int:
    """The seed of the posterior sample of copy `copy` (0 image, 1 mirror) of image `index`."""
    return derive_seed(SeedPurpose.ENCODE, global_seed, index, copy)


def shard_ranges(num_images: int, shard_size: int) -> list[range]:
    """The image indices of each shard: contiguous runs of `shard_size` (the last may be shorter)."""
    return [range(start, min(start + shard_size, num_images)) for start in range(0, num_images, shard_size)]


def latent_size_of(codec: LatentCodec, image_size: int) -> int:
    """The latent side of `image_size` images.

    Raises:
        UserError: the VAE's downsampling does not divide the image size.
    """
    if image_size < 1 or image_size % codec.downsample:
        raise UserError(f"--image-size {image_size} is not a positive multiple of the VAE's downsampling factor "
                         f"{codec.downsample}; use a multiple of {codec.downsample}, such as {32 * codec.downsample}")
    return image_size // codec.downsample


def check_model_inputs(model_name: str, codec: LatentCodec, image_size: int) -> None:
    """Checks that a registry model can take the latents this codec makes from `image_size` images.

    The model name fixes the patch size; the input channels are the family's default (DiT: 4, an SD
    VAE's latents), which a registry name does not change.

    Raises:
        UserError: the channels differ, or the patches do not tile the latents; says what to change.
    """
    arch, fixed, _ = registry_spec(model_name)
    defaults = {name: p.default for name, p in inspect.signature(ARCHITECTURES[arch]).parameters.items()}
    config = {**defaults, **fixed}
    key = "in_channels" if "in_channels" in config else "vae_embed_dim"  # MAR names its input channels so
    channels, expected = codec.latent_channels(), config[key]
    if channels != expected:
        vaes = "--vae kl16, as MAR" if "vae_embed_dim" in config else "--vae ema or mse, as DiT"
        raise UserError(
            f"--model {model_name} takes {expected}-channel inputs, but --vae {codec.name} gives {channels} "
            f"channels; use a VAE with {expected} latent channels ({vaes}), or leave out "
            f"--model when the features are for a model built with {key}={channels}")
    patch = config["patch_size"]
    latent_size = latent_size_of(codec, image_size)
    if latent_size % patch:
        raise UserError(
            f"--image-size {image_size} gives {latent_size}x{latent_size} inputs, which the {patch}x{patch} "
            f"patches of --model {model_name} do not tile; use an --image-size that is a multiple of "
            f"{patch * codec.downsample}")


@torch.no_grad()
def encode_copies(codec: LatentCodec, images: torch.Tensor, indices: Sequence[int], global_seed: int, copies: int,
                  precision: str = "fp32") -> torch.Tensor:
    """Latents of images and, with two copies, of their mirrors, each from its own seed.

    Args:
        codec: the VAE (or pixel space).
        images: (B, 3, S, S) in [-1, 1], on the codec's device.
        indices: the position of each image in the listing (its seed).
        global_seed: the run's seed.
        copies: 1 (the images) or 2 (the images and their horizontal mirrors).
        precision: autocast precision of the encoder.
    Returns:
        (B, copies, C, H, W) float32 on the CPU.
    """
    views = torch.cat([images, images.flip(-1)][:copies])  # (copies * B, 3, S, S)
    # CPU generators: the samples are the same on every device and for any batch composition.
    generators = [torch.Generator().manual_seed(encode_seed(global_seed, int(i), c))
                  for c in range(copies) for i in indices]
    with autocast(precision, images.device):
        latents = codec.encode(views, generator=generators)  # (copies * B, C, H, W)
    latents = latents.float().cpu()
    return latents.reshape(copies, len(indices), *latents.shape[1:]).transpose(0, 1).contiguous()


def check_channels(vae: str, channels: int) -> None:
    """--channels: 3 (RGB) for any codec, 1 (grayscale) for pixel features only (`--vae none`)."""
    if channels not in (1, 3):
        raise UserError(f"--channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if channels == 1 and vae != "none":
        raise UserError(f"--channels 1 writes grayscale pixels, but --vae {vae} encodes RGB images: use --vae none "
                         "for grayscale pixel features, or --channels 3")


def encode_image_folder(images: ImageList, features_path: str | os.PathLike, codec: LatentCodec, env: DistEnv, *,
                        image_size: int = 256, flip: bool = True, shard_size: int = 1000, batch_size: int = 32,
                        num_workers: int = 4, global_seed: int = 0, precision: str = "fp32", skip_bad: bool = False,
                        channels: int = 3, logger: logging.Logger | None = None) -> FeatureIndex:
    """Encodes this rank's shards of an image folder, then (rank 0) writes the index; see the module doc.

    Every rank calls it; it returns the finished index on every rank.

    Args:
        images: the listing (the same on every rank).
        features_path: the output folder (created; an interrupted run there is resumed).
        codec: the VAE, on env.device.
        env: this process (tinyfusion.distributed.init_distributed).
        image_size: the side of the ADM center crop.
        flip: also store each image's horizontal mirror (copies=2).
        shard_size: images per shard; batch_size: images per encoder call.
        num_workers: DataLoader processes decoding images.
        global_seed: seeds the posterior samples.
        precision: autocast precision of the encoder ("fp32", "bf16", "fp16").
        skip_bad: leave out unreadable images instead of stopping.
        channels: 3 (RGB) or 1 (grayscale, the luma of PIL's "L" mode; pixel features only: a VAE encodes RGB).
        logger: where progress and skipped images are reported.
    Raises:
        UserError: bad settings, or a features folder made with other settings.
    """
    logger = logger or logging.getLogger(__name__)
    for name, value, least in (("--shard-size", shard_size, 1), ("--batch-size", batch_size, 1),
                               ("--num-workers", num_workers, 0)):
        if value < least:
            raise UserError(f"{name} must be at least {least}, got {value}")
    check_channels(codec.name, channels)
    side = latent_size_of(codec, image_size)
    root = Path(features_path)
    source = {
        "vae": vae_id(codec.name), "scaling_factor": codec.scaling_factor, "image_size": image_size,
        "flip": flip, "precision": precision, "global_seed": global_seed, "shard_size": shard_size,
        "num_files": len(images), "files_sha256": images.sha256(), "data_path": str(images.root.resolve()),
        **({"channels": channels} if channels != 3 else {}),  # RGB folders keep the record they always had
    }
    # Every rank checks (the same files, the same answer), so a refusal stops all of them alike.
    _check_folder(root, source)
    if env.is_main:
        atomic_write_json(root / PLAN_FILE, {"format": PLAN_FORMAT, "source": source})
        remove_orphan_temporaries(root / "shards")  # of an interrupted run's writes
    barrier()

    ranges = shard_ranges(len(images), shard_size)
    mine = [k for k in range(env.rank, len(ranges), env.world_size) if not shard_done(root, k)]
    if env.is_main:
        done = sum(shard_done(root, k) for k in range(len(ranges)))
        logger.info(f"{len(images)} images of {len(images.class_names)} classes in {len(ranges)} shards of "
                    f"{shard_size}; {done} already done, {len(ranges) - done} to encode on {env.world_size} "
                    f"process(es)")
    latent_shape = (1 + flip, codec.latent_channels(channels), side, side)
    _encode_shards(images, root, codec, env, [(k, ranges[k]) for k in mine], latent_shape, image_size=image_size,
                   batch_size=batch_size, num_workers=num_workers, global_seed=global_seed, precision=precision,
                   skip_bad=skip_bad, logger=logger)
    # Ranks wait here for the slowest; the index needs every shard.
    barrier()
    if env.is_main:
        skipped = _gather_skipped(root, len(ranges))
        atomic_write_json(root / SKIPPED_FILE, skipped)
        index = write_index(root, len(ranges), num_classes=len(images.class_names), class_names=images.class_names,
                            source={**source, "skipped": [s["path"] for s in skipped]})
        if skipped:
            logger.warning(f"skipped {len(skipped)} unreadable images (listed in {root / SKIPPED_FILE})")
        logger.info(f"wrote {index.num_images} images x {index.copies} copies of {index.latent_shape} to {root}")
    barrier()
    return FeatureIndex.from_json(json.loads((root / "index.json").read_text()), str(root / "index.json"))


def _encode_shards(images: ImageList, root: Path, codec: LatentCodec, env: DistEnv, shards: list[tuple[int, range]],
                   latent_shape: tuple[int, ...], *, image_size: int, batch_size: int, num_workers: int,
                   global_seed: int, precision: str, skip_bad: bool, logger: logging.Logger) -> None:
    """Encodes and writes `shards` [(shard id, image indices)] in order, batch by batch."""
    # (shard, batch indices, last batch of the shard?): batches never cross a shard boundary.
    plan = []
    for shard, indices in shards:
        starts = range(indices.start, indices.stop, batch_size)
        plan += [(shard, list(range(s, min(s + batch_size, indices.stop))), s == starts[-1]) for s in starts]
    loader = DataLoader(CroppedImages(images, image_size, channels=latent_shape[1] if codec.vae is None else 3),
                        batch_sampler=[batch for _, batch, _ in plan],
                        num_workers=num_workers, pin_memory=env.device.type == "cuda")
    progress = tqdm(total=sum(len(r) for _, r in shards), desc=f"encoding (rank 0 of {env.world_size})", unit="img",
                    disable=not env.is_main)
    latents, labels, skipped = [], [], []
    for (shard, _, last), (pixels, batch_labels, indices, errors) in zip(plan, loader):
        good = [j for j, error in enumerate(errors) if not error]
        for j in (j for j, error in enumerate(errors) if error):
            if not skip_bad:
                raise UserError(f"{errors[j]}. Fix or remove the file, or pass --skip-bad to leave unreadable "
                                 "images out (they are listed in skipped.json)")
            index = int(indices[j])
            logger.warning(f"skipping image {index} ({images.paths[index]}): {errors[j]}")
            skipped.append({"index": index, "path": images.paths[index], "label": int(batch_labels[j]),
                            "reason": errors[j]})
        if good:
            batch = pixels[good].to(env.device, non_blocking=True)
            latents.append(encode_copies(codec, batch, indices[good].tolist(), global_seed, latent_shape[0],
                                         precision).numpy())
            labels.append(batch_labels[good].numpy())
        if last:
            _write_shard(root, shard, latents, labels, skipped, latent_shape)
            latents, labels, skipped = [], [], []
        progress.update(len(indices))
    progress.close()


def _write_shard(root: Path, shard: int, latents: list[np.ndarray], labels: list[np.ndarray], skipped: list[dict],
                 latent_shape: tuple[int, ...]) -> None:
    skipped_path = root / _skipped_name(shard)
    # The shard's skip list goes first: once the shard counts as done, its record must be on disk.
    if skipped:
        atomic_write_json(skipped_path, skipped)
    elif skipped_path.exists():
        skipped_path.unlink()  # a stale record of an earlier run of this shard
    write_shard(root, shard,
                np.concatenate(latents) if latents else np.zeros((0, *latent_shape), dtype=np.float32),
                np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64))


def _skipped_name(shard: int) -> str:
    return f"shards/skipped-{shard:05d}.json"


def _gather_skipped(root: Path, num_shards: int) -> list[dict]:
    skipped = []
    for shard in range(num_shards):
        path = root / _skipped_name(shard)
        if path.is_file():
            skipped += json.loads(path.read_text())
    return skipped


def vae_id(name: str) -> str:
    """The VAE as recorded: a folder or file by its absolute path, so a run from another directory matches."""
    if name in ("none", "kl16") or name in HUB_VAES or not os.path.exists(name):
        return name
    return str(Path(name).resolve())


def _check_folder(root: Path, source: dict) -> None:
    """Refuses a features folder whose shards were made with other settings (they must not mix)."""
    if root.exists() and not root.is_dir():
        raise UserError(f"--features-path {str(root)!r} is a file; give a folder")
    recorded = False
    for name in (PLAN_FILE, "index.json"):
        if not (root / name).is_file():
            continue
        recorded = True
        found = json.loads((root / name).read_text()).get("source", {})
        differences = setting_differences(found, source, names=_SETTING_FLAGS)
        if differences:
            raise UserError(
                f"--features-path {str(root)!r} holds features made with other settings ({'; '.join(differences)}); "
                "features of different settings must not mix: use a new --features-path (or delete this one "
                "to start over)")
    if not recorded and (root / "shards").is_dir() and any((root / "shards").iterdir()):
        raise UserError(f"--features-path {str(root)!r} holds shards but no {PLAN_FILE} or index.json saying how "
                         "they were made; use a new --features-path (or delete this one to start over)")
