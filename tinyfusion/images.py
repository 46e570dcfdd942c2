"""Images on disk to model-ready tensors: image-folder listing, the ADM center crop, decoding.

An image folder is torchvision's ImageFolder layout, `root/<class>/**/<image>`: the label of an
image is the position of its class folder in sorted order, and images are listed class by class,
each class in sorted path order, so a listing is the same on every machine and every rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import UserError

# The extensions torchvision's ImageFolder accepts (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# What PIL raises on a file it cannot decode: unknown or truncated data (OSError, including
# UnidentifiedImageError), malformed headers (SyntaxError, ValueError), or a decompression bomb.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclasses.dataclass
class ImageList:
    """The images of an image folder, in label-then-path order.

    Attributes:
        root: the folder.
        paths: image paths relative to root (POSIX separators).
        labels: the class index of each image.
        class_names: the class folder names, in label order.
    """

    root: Path
    paths: list[str]
    labels: list[int]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def sha256(self) -> str:
        """A fingerprint of the listing (paths and labels): a changed folder gives another value."""
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels):
            digest.update(f"{label}\t{path}\n".encode())
        return digest.hexdigest()


def list_image_folder(root: str | os.PathLike) -> ImageList:
    """Lists an ImageFolder: class subfolders (sorted; label = position), their images recursively.

    Args:
        root: the folder holding one subfolder per class.
    Raises:
        UserError: the folder does not exist, has no class subfolders, or a class folder holds no
            image with one of IMAGE_EXTENSIONS.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data-path {str(root)!r} is not a folder; give the folder that holds one subfolder "
                         "per class (ImageFolder layout: DATA/<class>/<image>.JPEG)")
    class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not class_names:
        raise UserError(f"--data-path {str(root)!r} has no class subfolders; put the images in one subfolder "
                         "per class (ImageFolder layout: DATA/<class>/<image>.JPEG), even if there is one class")
    paths, labels, empty = [], [], []
    for label, name in enumerate(class_names):
        found = 0
        for dirpath, _, filenames in sorted(os.walk(root / name, followlinks=True)):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append((Path(dirpath) / filename).relative_to(root).as_posix())
                    labels.append(label)
                    found += 1
        if not found:
            empty.append(name)
    if empty:
        raise UserError(f"class folders {empty[:10]} of {str(root)!r} hold no images (extensions: "
                         f"{', '.join(IMAGE_EXTENSIONS)}); remove them or add images, since every class "
                         "folder takes a label")
    return ImageList(root=root, paths=paths, labels=labels, class_names=class_names)


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """The center crop of ADM (guided-diffusion), which DiT's and TinyFusion's latents were made with.

    Halves the image with a box filter while its short side is at least 2 * size (cheap and
    alias-free), resizes it with bicubic so the short side is `size`, then crops the middle square.

    Args:
        image: a PIL image.
        size: the side of the square output.
    """
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """An image file decoded in full, as RGB (or `mode`, e.g. "L" for grayscale).

    Raises:
        UserError: the file cannot be read or decoded, naming it.
    """
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except _DECODE_ERRORS as e:
        raise UserError(f"cannot read image {str(path)!r}: {e}") from None


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB (or grayscale "L") PIL image as a float tensor (3, H, W) (or (1, H, W)) in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3) or (H, W)
    if pixels.dim() == 2:
        pixels = pixels[:, :, None]
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


class CroppedImages(Dataset):
    """The images of an `ImageList`, center-cropped to (3, size, size) in [-1, 1].

    An item is (image, label, index, error): a file that cannot be decoded gives a zero image and
    the reason in `error` (else ""), so the caller decides between stopping and skipping, in the
    main process, whatever the number of DataLoader workers.

    Args:
        images: the listing.
        size: the side of the crop.
        channels: 3 (RGB) or 1 (grayscale: PIL's "L" luma).
    """

    def __init__(self, images: ImageList, size: int, channels: int = 3):
        self.images, self.size, self.channels = images, size, channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str]:
        try:
            image = load_image(self.images.root / self.images.paths[index], "L" if self.channels == 1 else "RGB")
        except ValueError as e:
            return torch.zeros(self.channels, self.size, self.size), self.images.labels[index], index, str(e)
        return image_to_tensor(adm_center_crop(image, self.size)), self.images.labels[index], index, ""
