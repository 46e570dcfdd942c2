"""The image sets an evaluation reads: ADM .npz batches, image folders and in-memory arrays.

An ADM batch (the reference batches of openai/guided-diffusion, and what sample_ddp.py writes) is an
.npz with `arr_0`: uint8 images, N x H x W x 3. A reference batch may also carry precomputed
Inception statistics: `mu`, `sigma` (pool features, for FID) and `mu_s`, `sigma_s` (spatial
features, for sFID). Images are read from an .npz in batches, never all at once, so a 50,000-image
file does not need 10 GB of memory.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import UserError
from ..images import IMAGE_EXTENSIONS, load_image
from .metrics import FIDStatistics

# The statistics keys of ADM's reference batches: which features they describe.
STATS_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}
_EXPECTED = "arr_0: uint8 images of shape N x H x W x 3 (values 0-255), as np.savez(path, arr_0=images) writes"


class ImageSet:
    """A set of images (possibly none) and the precomputed statistics that came with it.

    Attributes:
        name: where the images come from, for messages.
        num_images: how many images; 0 for a file of statistics alone.
        image_shape: (H, W, C) of every image, None when there are none.
        stats: precomputed statistics by feature kind ("pool", "spatial").
    """

    def __init__(self, name: str, num_images: int, image_shape: tuple[int, int, int] | None,
                 stats: dict[str, FIDStatistics] | None = None):
        self.name = name
        self.num_images = num_images
        self.image_shape = image_shape
        self.stats = stats or {}

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yields uint8 arrays of shape (n, H, W, C), n <= batch_size, in order (overridden by the
        sources that hold images; a set of statistics alone has none to give)."""
        raise UserError(f"{self.name} holds precomputed statistics but no images; the metrics that need "
                         "images (precision, recall, IS of samples) need a file or folder with them")

    def __len__(self) -> int:
        return self.num_images


def check_images(dtype: np.dtype, shape: tuple[int, ...], name: str) -> None:
    """Raises a ValueError saying what is expected unless (dtype, shape) is uint8, N x H x W x 3 (or x 1), N > 0."""
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or shape[0] == 0:
        raise UserError(f"{name}: expected {_EXPECTED}; got dtype {dtype} and shape {tuple(shape)}. "
                         "Convert images in [0, 1] with (x * 255).round().clip(0, 255).astype(np.uint8), and "
                         "NCHW arrays with x.transpose(0, 2, 3, 1)")


#################################################################################
#                                   Arrays                                      #
#################################################################################

class ArrayImages(ImageSet):
    """Images held in memory: a uint8 array, N x H x W x C (C = 3, or 1 for grayscale)."""

    def __init__(self, images: np.ndarray, name: str = "array", stats: dict[str, FIDStatistics] | None = None):
        images = np.asarray(images)
        check_images(images.dtype, images.shape, name)
        super().__init__(name, len(images), tuple(images.shape[1:]), stats)
        self.images = images

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.num_images, batch_size):
            yield self.images[start:start + batch_size]


def split_halves(images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves of a set of images, for a "real vs real" floor of the metrics.

    The metrics of one half against the other are what a perfect generator would score with this
    many samples: the noise floor of the evaluation.

    Args:
        images: (N, ...) array, N >= 2.
        seed: seed of the random permutation.
    """
    if len(images) < 2:
        raise UserError(f"splitting into halves needs at least 2 images, got {len(images)}")
    order = np.random.default_rng(seed).permutation(len(images))
    half = len(images) // 2
    return images[np.sort(order[:half])], images[np.sort(order[half:2 * half])]


#################################################################################
#                                  .npz batches                                 #
#################################################################################

class NpzImages(ImageSet):
    """An ADM batch: `arr_0` (optional when statistics are present) and `mu`/`sigma`, `mu_s`/`sigma_s`."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        name = str(path)
        if not path.is_file():
            raise UserError(f"{name} does not exist; pass an .npz file with {_EXPECTED}, or a folder of images")
        try:
            with zipfile.ZipFile(path) as archive:
                keys = sorted(n[:-4] for n in archive.namelist() if n.endswith(".npy"))
                header = _npy_header(archive, "arr_0.npy", name) if "arr_0" in keys else None
        except zipfile.BadZipFile:
            raise UserError(f"{name} is not an .npz file (not a zip archive); expected {_EXPECTED}") from None
        stats = _read_stats(path, keys)
        if header is None:
            if not stats:
                raise UserError(f"{name} has no arr_0 (its keys: {keys}); expected {_EXPECTED}, or precomputed "
                                 "statistics mu and sigma (and mu_s, sigma_s)")
            super().__init__(name, 0, None, stats)
        else:
            shape, fortran_order, dtype = header
            check_images(dtype, shape, f"{name}: arr_0")
            super().__init__(name, shape[0], tuple(shape[1:]), stats)
        self.path = path
        self._fortran_order = header is not None and header[1]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if self.num_images == 0:
            return
        if self._fortran_order:
            # A column-major array cannot be read in row batches: load it whole.
            with np.load(self.path, allow_pickle=False) as data:
                images = np.ascontiguousarray(data["arr_0"])
            yield from ArrayImages(images, self.name).batches(batch_size)
            return
        image_bytes = int(np.prod(self.image_shape))
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as stream:
            _read_npy_preamble(stream)
            for start in range(0, self.num_images, batch_size):
                count = min(batch_size, self.num_images - start)
                data = _read_exactly(stream, count * image_bytes, self.name)
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.image_shape)


def _read_npy_preamble(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Reads the magic string and header of a .npy stream (numpy's format, versions 1.0 and 2.0)."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    raise UserError(f"unsupported .npy format version {version}; re-save the file with np.savez")


def _npy_header(archive: zipfile.ZipFile, member: str, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    with archive.open(member) as stream:
        try:
            return _read_npy_preamble(stream)
        except ValueError as e:
            raise UserError(f"{name}: cannot read {member}: {e}") from None


def _read_exactly(stream, size: int, name: str) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            raise UserError(f"{name}: arr_0 ends early (the file is truncated); write it again")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_stats(path: Path, keys: list[str]) -> dict[str, FIDStatistics]:
    stats = {}
    for kind, (mu_key, sigma_key) in STATS_KEYS.items():
        present = [k for k in (mu_key, sigma_key) if k in keys]
        if not present:
            continue
        if len(present) == 1:
            missing = sigma_key if present[0] == mu_key else mu_key
            raise UserError(f"{path} has {present[0]} but no {missing}: precomputed statistics need both")
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data[mu_key], data[sigma_key]
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or not np.issubdtype(mu.dtype, np.floating) \
                or not np.issubdtype(sigma.dtype, np.floating):
            raise UserError(f"{path}: {mu_key} must be a float vector (D,) and {sigma_key} a float (D, D) matrix; "
                             f"got {mu_key} {mu.dtype} {mu.shape} and {sigma_key} {sigma.dtype} {sigma.shape}")
        stats[kind] = FIDStatistics(mu, sigma)
    return stats


#################################################################################
#                                 Image folders                                 #
#################################################################################

class FolderImages(ImageSet):
    """The image files under a folder (recursively, in sorted path order; the extensions of
    `tinyfusion.images.IMAGE_EXTENSIONS`, as image-folder extraction accepts), as RGB; all of one size."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise UserError(f"{path} holds no {', '.join(IMAGE_EXTENSIONS)} images")
        width, height = load_image(files[0]).size
        super().__init__(str(path), len(files), (height, width, 3))
        self.files = files

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        height, width, _ = self.image_shape
        for start in range(0, self.num_images, batch_size):
            batch = []
            for file in self.files[start:start + batch_size]:
                image = load_image(file)
                if image.size != (width, height):
                    raise UserError(f"{file} is {image.size[0]}x{image.size[1]}, but {self.files[0]} is "
                                     f"{width}x{height}: the images of a folder must all have one size")
                batch.append(np.asarray(image))
            yield np.stack(batch)


def open_images(source: str | os.PathLike | np.ndarray | ImageSet, name: str | None = None) -> ImageSet:
    """An ImageSet from an .npz path, an image folder, a uint8 N x H x W x C array, or an ImageSet.

    Args:
        source: what to read.
        name: a name for an array, for messages.
    """
    if isinstance(source, ImageSet):
        return source
    if isinstance(source, np.ndarray):
        return ArrayImages(source, name or "array")
    path = Path(source)
    if path.is_dir():
        return FolderImages(path)
    if path.suffix != ".npz" and path.exists():
        raise UserError(f"{path} is neither an .npz file nor a folder of images")
    return NpzImages(path)


__all__ = ["ArrayImages", "FolderImages", "IMAGE_EXTENSIONS", "ImageSet", "NpzImages", "STATS_KEYS",
           "check_images", "open_images", "split_halves"]
