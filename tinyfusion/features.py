"""Pre-extracted latent datasets: our sharded layout, the reference layout, and their sampler.

Our layout (written by extract_features.py, and by sample_ddp.py --save-latents from a model's own
samples), built to load fast at 1.28M images:

    FEATURES/index.json                 what is inside (see `FeatureIndex`)
    FEATURES/shards/latents-00000.npy   (n, copies, C, H, W) float: copy 0 the image, copy 1 its mirror
    FEATURES/shards/labels-00000.npy    (n,) int64 class labels

Every shard holds a contiguous run of the sorted image list and is written by one rank alone,
atomically, so extraction is rank-safe and resumable. Shards are memory-mapped when read.

The reference layout (DiT / TinyFusion `extract_features.py`): one file per image,
`imagenet256_features/*.npy` of shape (copies, C, H, W) and `imagenet256_labels/*.npy`.

With two copies (an image and its mirror), a sample uses the mirror with probability 0.5. The
`GlobalBatchSampler` decides this, with everything else about the data order, from the seed and
the step alone, so a run is the same for any number of processes and resumes mid-epoch exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .errors import UserError
from .fileio import atomic_write, atomic_write_json
from .paths import file_sha256

INDEX_FORMAT = "tinyfusion-features"
INDEX_VERSION = 1
REFERENCE_FEATURES, REFERENCE_LABELS = "imagenet256_features", "imagenet256_labels"


@dataclasses.dataclass
class FeatureIndex:
    """The index.json of our layout.

    Attributes:
        num_images: total images (sum of the shard counts).
        shards: [{"latents": file, "labels": file, "count": n}] in image order, paths relative to the folder.
        latent_shape: (C, H, W) of one copy.
        copies: 2 when each image is stored with its horizontal mirror, else 1.
        dtype: numpy dtype name of the latents.
        num_classes: number of classes; class_names: their folder names, in label order ("0" .. for samples).
        source: how the latents were made: {"vae", "image_size", "scaling_factor", "data_path", ...}; for a
            model's samples, "sampling_protocol" instead of the image folder (`tinyfusion.sampling.latents_source`).
    """

    num_images: int
    shards: list[dict]
    latent_shape: list[int]
    copies: int
    dtype: str
    num_classes: int
    class_names: list[str]
    source: dict

    def to_json(self) -> dict:
        return {"format": INDEX_FORMAT, "version": INDEX_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict, path: str) -> "FeatureIndex":
        if data.get("format") != INDEX_FORMAT:
            raise UserError(f"{path} is not a feature index (format {data.get('format')!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


#################################################################################
#                                     Writing                                   #
#################################################################################

def shard_names(shard_id: int) -> tuple[str, str]:
    return f"shards/latents-{shard_id:05d}.npy", f"shards/labels-{shard_id:05d}.npy"


def shard_done(root: str | os.PathLike, shard_id: int) -> bool:
    latents, labels = shard_names(shard_id)
    return (Path(root) / latents).is_file() and (Path(root) / labels).is_file()


def write_shard(root: str | os.PathLike, shard_id: int, latents: np.ndarray, labels: np.ndarray) -> None:
    """Writes one shard atomically (labels last: a shard counts as done when both files exist).

    Args:
        latents: (n, copies, C, H, W); labels: (n,) integers.
    """
    if latents.ndim != 5 or labels.shape != (latents.shape[0],):
        raise UserError(f"a shard needs latents (n, copies, C, H, W) and labels (n,); got {latents.shape} "
                         f"and {labels.shape}")
    latents_name, labels_name = shard_names(shard_id)
    atomic_write(Path(root) / latents_name, lambda f: np.save(f, latents))
    atomic_write(Path(root) / labels_name, lambda f: np.save(f, labels.astype(np.int64)))


def write_index(root: str | os.PathLike, num_shards: int, *, num_classes: int, class_names: list[str],
                source: dict) -> FeatureIndex:
    """Scans the shards 0..num_shards-1 (all must exist) and writes index.json atomically."""
    root = Path(root)
    missing = [i for i in range(num_shards) if not shard_done(root, i)]
    if missing:
        raise UserError(f"cannot write the index of {root}: shards {missing[:10]} are missing")
    shards, shape, copies, dtype = [], None, None, None
    for i in range(num_shards):
        latents_name, labels_name = shard_names(i)
        arr = np.load(root / latents_name, mmap_mode="r")
        # The digests make index.json a fingerprint of the data: a resumed run compares it (tinyfusion.paths).
        shards.append({"latents": latents_name, "labels": labels_name, "count": int(arr.shape[0]),
                       "latents_sha256": file_sha256(root / latents_name),
                       "labels_sha256": file_sha256(root / labels_name)})
        shape, copies, dtype = list(arr.shape[2:]), int(arr.shape[1]), str(arr.dtype)
    index = FeatureIndex(num_images=sum(s["count"] for s in shards), shards=shards, latent_shape=shape,
                         copies=copies, dtype=dtype, num_classes=num_classes, class_names=class_names,
                         source=source)
    atomic_write_json(root / "index.json", index.to_json())
    return index


#################################################################################
#                                     Reading                                   #
#################################################################################

def read_index(root: Path) -> FeatureIndex:
    """FEATURES/index.json, with a clear error for a truncated or foreign file."""
    path = root / "index.json"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}): it was cut short or overwritten; re-run extract_features.py "
                         "with the same arguments to rewrite it (its shards are kept)") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a feature index (a JSON {type(data).__name__}, not an object)")
    index = FeatureIndex.from_json(data, str(path))
    if not isinstance(index.shards, list) or not all(isinstance(x, dict) and {"latents", "labels", "count"} <= set(x)
                                                     for x in index.shards):
        raise UserError(f"{path} is damaged: its shard list is not [{{latents, labels, count}}]; re-run "
                         "extract_features.py with the same arguments to rewrite it")
    return index


def check_shards(root: Path, index: FeatureIndex) -> None:
    """Every shard the index names exists with the count and shape it says (read from the .npy headers
    only), so a missing or cut shard is an error now, not after hours of training."""
    for shard in index.shards:
        for key, shape in (("latents", (shard["count"], index.copies, *index.latent_shape)),
                           ("labels", (shard["count"],))):
            file = root / shard[key]
            if not file.is_file():
                raise UserError(f"the features at {str(root)!r} lack {shard[key]} (listed in index.json): the folder "
                                 "is incomplete; copy it again, or re-run extract_features.py to recreate the shard")
            try:
                found = np.load(file, mmap_mode="r").shape
            except (ValueError, OSError, EOFError) as e:
                raise UserError(f"{file} is damaged ({e}); re-run extract_features.py to recreate it "
                                 "(delete it first)") from None
            if tuple(found) != tuple(shape):
                raise UserError(f"{file} has shape {tuple(found)} but index.json says {tuple(shape)}: the folder "
                                 "mixes extractions; re-run extract_features.py into a new --features-path")


class FeatureDataset(Dataset):
    """Latents and labels of either layout.

    `dataset[i]` returns (latent (C, H, W) float32, label int64 scalar); with two copies it takes
    the mirror with probability 0.5 (so torch's DistributedSampler works as is). `dataset[(i, c)]`
    returns copy c exactly, which is what `GlobalBatchSampler` asks for.

    Args:
        path: the features folder.
        flip: use the mirrored copies (when the layout has them).
    Raises:
        UserError: a folder with no features in either layout, or an inconsistent one.
    """

    def __init__(self, path: str | os.PathLike, flip: bool = True):
        self.root = Path(path)
        if (self.root / "index.json").is_file():
            self.layout = "sharded"
            self.index = read_index(self.root)
            check_shards(self.root, self.index)
            counts = np.array([s["count"] for s in self.index.shards], dtype=np.int64)
            self._starts = np.concatenate([[0], np.cumsum(counts)])
            self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            self._length = int(self._starts[-1])
            self.copies = self.index.copies
            self.latent_shape = tuple(self.index.latent_shape)
            self.num_classes = self.index.num_classes
        elif (self.root / REFERENCE_FEATURES).is_dir() and (self.root / REFERENCE_LABELS).is_dir():
            self.layout = "reference"
            self._feature_files = sorted((self.root / REFERENCE_FEATURES).glob("*.npy"))
            self._label_files = sorted((self.root / REFERENCE_LABELS).glob("*.npy"))
            if len(self._feature_files) != len(self._label_files):
                raise UserError(f"{self.root} has {len(self._feature_files)} feature files but "
                                 f"{len(self._label_files)} label files; they must pair up one to one")
            self._length = len(self._feature_files)
            if self._length:
                first = np.load(self._feature_files[0])
                self.copies, self.latent_shape = int(first.shape[0]), tuple(first.shape[1:])
            self.num_classes = None
        else:
            raise UserError(
                f"no features at {str(self.root)!r}: expected index.json (written by extract_features.py) or "
                f"the folders {REFERENCE_FEATURES}/ and {REFERENCE_LABELS}/. Run extract_features.py first")
        if self._length == 0:
            raise UserError(f"the features at {str(self.root)!r} hold no images")
        self.flip = flip and self.copies > 1

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, copy = int(key[0]), int(key[1])
        else:
            index, copy = int(key), int(self.flip and random.random() < 0.5)
        if not 0 <= index < self._length:
            raise IndexError(f"image {index} is out of range for {self._length} images")
        if copy >= self.copies:
            raise IndexError(f"copy {copy} asked for, but the features hold {self.copies} per image")
        if self.layout == "sharded":
            shard = int(np.searchsorted(self._starts, index, side="right")) - 1
            latents, labels = self._shard(shard)
            offset = index - int(self._starts[shard])
            latent, label = latents[offset, copy], labels[offset]
        else:
            latent = np.load(self._feature_files[index])[copy]
            label = np.load(self._label_files[index]).reshape(-1)[0]
        return torch.from_numpy(np.array(latent, dtype=np.float32)), torch.tensor(int(label), dtype=torch.long)

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        # Opened lazily in each DataLoader worker; memory maps are not shared across processes.
        if shard not in self._arrays:
            spec = self.index.shards[shard]
            self._arrays[shard] = (np.load(self.root / spec["latents"], mmap_mode="r"),
                                   np.load(self.root / spec["labels"], mmap_mode="r"))
        return self._arrays[shard]

    def labels(self) -> np.ndarray:
        """All labels (N,), in order."""
        if self.layout == "sharded":
            return np.concatenate([np.load(self.root / s["labels"]) for s in self.index.shards])
        return np.array([int(np.load(f).reshape(-1)[0]) for f in self._label_files], dtype=np.int64)

    def infer_num_classes(self) -> int:
        return self.num_classes if self.num_classes is not None else int(self.labels().max()) + 1

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state


#################################################################################
#                                     Sampling                                  #
#################################################################################

def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 finaliser), so nearby inputs give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


class SeedPurpose:
    """The first value of every `derive_seed` call: each stream of random numbers has its own, so
    that no two of them ever share a seed."""

    DATA_ORDER = 1  # epoch permutations and mirror choices (GlobalBatchSampler)
    TRAIN_STEP = 2  # a training step's timesteps, noise, label dropout and gate noise (engine)
    ENCODE = 3  # the VAE posterior sample of an image (extract_features)
    RANDOM_SCORES = 4  # the random pruning criterion (prune_by_score)
    RANDOM_WIDTH_SCORES = 5  # the random width criterion (prune_by_score --width-criterion random)
    SAMPLE_NOISE = 101  # an image's starting noise and step noise (sampling)
    SAMPLE_LABEL = 102  # an image's class label in an FID run (sampling)


def derive_seed(*values: int) -> int:
    """A seed for a (purpose, seed, step, ...) tuple; used for every random draw of a run."""
    return _mix(*values)


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (index, copy) for this rank: its contiguous share of each global batch.

    Step s draws the global batch perm_e[b * B : (b + 1) * B] of epoch e = s // steps_per_epoch,
    where perm_e is a seeded permutation; rank r takes positions [r * B / W, (r + 1) * B / W).
    The mirror choice of every image is seeded per epoch. Nothing depends on W, so one process
    and many see the same global batches, and starting at step s resumes mid-epoch exactly.

    Args:
        num_items: dataset size N.
        global_batch_size: B (divisible by world_size).
        rank, world_size: this process and how many there are.
        seed: the run's seed.
        copies: 2 if each item has a mirrored copy to choose from, else 1.
        start_step: the first step to yield (for resuming).
        max_steps: stop after this step (None: run forever).
    """

    def __init__(self, num_items: int, global_batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 copies: int = 1, start_step: int = 0, max_steps: int | None = None):
        if global_batch_size % world_size:
            raise UserError(f"--global-batch-size {global_batch_size} is not divisible by the {world_size} "
                             "processes; choose a multiple of the process count")
        if global_batch_size > num_items:
            raise UserError(f"--global-batch-size {global_batch_size} is larger than the dataset "
                             f"({num_items} items); lower it")
        self.num_items, self.global_batch_size = num_items, global_batch_size
        self.rank, self.world_size, self.seed, self.copies = rank, world_size, seed, copies
        self.start_step, self.max_steps = start_step, max_steps
        self.local_batch_size = global_batch_size // world_size
        self.steps_per_epoch = num_items // global_batch_size

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation (N,), mirror choice (N,)) of an epoch."""
        g = torch.Generator().manual_seed(derive_seed(SeedPurpose.DATA_ORDER, self.seed, epoch))
        perm = torch.randperm(self.num_items, generator=g)
        flips = torch.randint(0, 2, (self.num_items,), generator=g) if self.copies > 1 else \
            torch.zeros(self.num_items, dtype=torch.long)
        return perm, flips

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """All (index, copy) pairs of a step's global batch, in order."""
        epoch, position = divmod(step, self.steps_per_epoch)
        perm, flips = self.epoch_order(epoch)
        chunk = perm[position * self.global_batch_size:(position + 1) * self.global_batch_size]
        return [(int(i), int(flips[i])) for i in chunk]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        cached_epoch, perm, flips = None, None, None
        while self.max_steps is None or step < self.max_steps:
            epoch, position = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                perm, flips = self.epoch_order(epoch)
                cached_epoch = epoch
            begin = position * self.global_batch_size + self.rank * self.local_batch_size
            chunk = perm[begin:begin + self.local_batch_size]
            yield [(int(i), int(flips[i])) for i in chunk]
            step += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("an endless sampler has no length")
        return max(self.max_steps - self.start_step, 0)
