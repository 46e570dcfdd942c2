"""One evaluation: features of the reference and sample sets, then the ADM metrics, as a dict.

evaluator.py runs it from the command line; the quickstart calls `evaluate` in-process.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..fileio import atomic_write_json
from .classifier import load_feature_extractor
from .extractors import FeatureExtractor, embed_images
from .images import STATS_KEYS, ImageSet, open_images
from .inception import InceptionV3Features, load_inception
from .metrics import (
    FID_METHODS,
    IS_SPLIT_SIZE,
    PR_BATCH_SIZE,
    PR_NEIGHBOURHOOD,
    FIDStatistics,
    fid_statistics,
    inception_score,
    precision_recall,
    softmax,
)

# The metrics, in ADM's order, with the labels of the results table.
METRICS = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
           "recall": "Recall"}


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" (CUDA when a GPU is visible), "cuda" or "cpu" as a torch.device."""
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def load_extractor(feature_extractor: str | os.PathLike | None = None,
                   inception_weights: str | os.PathLike | None = None, *, download: bool = True) -> FeatureExtractor:
    """A feature-extractor file (see `save_feature_extractor`) when given, else ADM's InceptionV3.

    Args:
        feature_extractor: a file written by `save_feature_extractor`.
        inception_weights: the InceptionV3 weights file (default: the torch hub cache).
        download: allow downloading the InceptionV3 weights when they are not cached.
    """
    if feature_extractor is not None:
        if inception_weights is not None:
            raise UserError("give either --feature-extractor or --inception-weights, not both")
        return load_feature_extractor(feature_extractor)
    return load_inception(inception_weights, download=download)


def _reference_statistics(ref: ImageSet, extractor: FeatureExtractor, use_ref_stats: bool,
                          note: Callable[[str], None]) -> dict[str, FIDStatistics]:
    """The precomputed statistics of `ref` that may be used with `extractor`."""
    if not ref.stats:
        return {}
    keys = ", ".join("/".join(STATS_KEYS[kind]) for kind in ref.stats)
    if not extractor.adm_statistics:
        note(f"{ref.name} carries precomputed Inception statistics ({keys}); they are not used, as the features "
             f"are those of {extractor.name}: the reference statistics are computed from its images")
        return {}
    if not use_ref_stats:
        note(f"the precomputed statistics of {ref.name} ({keys}) are ignored, as asked: the reference statistics "
             "are computed from its images")
        return {}
    note(f"FID/sFID use the precomputed statistics of {ref.name} ({keys})")
    return dict(ref.stats)


def evaluate(ref: str | os.PathLike | np.ndarray | ImageSet, sample: str | os.PathLike | np.ndarray | ImageSet,
             extractor: FeatureExtractor, **kwargs) -> dict:
    """Inception Score, FID, sFID, precision and recall of `sample` against `ref`, as ADM defines them.

    The Inception Score is the sample's. A reference .npz with precomputed `mu`/`sigma` (`mu_s`/
    `sigma_s`) is compared through them when the extractor is ADM's Inception; precision and recall
    need the reference images and are skipped, with a note, without them. For a "real vs real"
    floor, evaluate the two halves of a real set (`split_halves`) against each other.

    Args:
        ref: the reference set: an .npz path, an image folder, a uint8 (N, H, W, C) array or an ImageSet.
        sample: the sample set, likewise (images required).
        extractor: the feature extractor (`load_extractor`, `load_inception`, a SmallClassifier...).
        **kwargs: the options of `evaluate_many`.
    Returns:
        {"feature_space", "reference", "sample", "num_reference_images", "num_sample_images",
         "reference_statistics": {"pool", "spatial": "precomputed", "computed" or None}, "metrics":
         {name: value, None when skipped}, "notes": [str]}.
    """
    return evaluate_many(ref, [sample], extractor, **kwargs)[0]


def evaluate_many(ref: str | os.PathLike | np.ndarray | ImageSet,
                  samples: Sequence[str | os.PathLike | np.ndarray | ImageSet], extractor: FeatureExtractor, *,
                  batch_size: int = 64, device: str | torch.device = "cpu", use_ref_stats: bool = True,
                  fid_method: str = "sqrtm", split_size: int = IS_SPLIT_SIZE, k: int = PR_NEIGHBOURHOOD,
                  pr_batch_size: int = PR_BATCH_SIZE, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> list[dict]:
    """`evaluate` of several sample sets against one reference, whose features are computed once.

    Args:
        ref, samples, extractor: as for `evaluate`, with a list of sample sets.
        batch_size: images per forward pass.
        device: where the features and distances are computed.
        use_ref_stats: use the precomputed statistics of the reference when they fit the extractor.
        fid_method: "sqrtm" (ADM's) or "eigvals" (the same value, faster): see `frechet_distance`.
        split_size: predictions per split of the Inception Score.
        k: neighbourhood size of precision and recall.
        pr_batch_size: rows and columns of one block of distances for precision and recall.
        progress: show progress bars.
        log: called with each note (e.g. print), as well as recording it in the results.
    Returns:
        one result dict (see `evaluate`) per sample set, in order.
    """
    if fid_method not in FID_METHODS:
        raise UserError(f"fid_method must be one of {', '.join(FID_METHODS)}, got {fid_method!r}")
    ref_set = open_images(ref, "reference")
    sample_sets = [open_images(sample, "sample") for sample in samples]
    for sample_set in sample_sets:
        if sample_set.num_images == 0:
            raise UserError(f"{sample_set.name} holds no images (arr_0): the sample set needs them")
    ref_notes: list[str] = []

    def ref_note(message: str) -> None:
        ref_notes.append(message)
        if log is not None:
            log(message)

    ref_stats = _reference_statistics(ref_set, extractor, use_ref_stats, ref_note)
    if ref_set.num_images == 0 and not ref_stats:
        raise UserError(f"{ref_set.name} holds no images (arr_0), and its precomputed statistics cannot be used "
                         f"with {extractor.name} features (see the note above): give a reference with images")
    ref_features = (embed_images(ref_set, extractor, batch_size=batch_size, device=device, progress=progress)
                    if ref_set.num_images else None)
    references: dict[str, tuple[FIDStatistics, str]] = {}
    for kind in ("pool", "spatial"):
        if kind in ref_stats:
            references[kind] = (ref_stats[kind], "precomputed")
        elif ref_features is not None:
            references[kind] = (fid_statistics(ref_features[kind]), "computed")

    results = []
    for sample_set in sample_sets:
        notes = list(ref_notes)

        def note(message: str) -> None:
            notes.append(message)
            if log is not None:
                log(message)

        sample_features = embed_images(sample_set, extractor, batch_size=batch_size, device=device,
                                           progress=progress)
        metrics = {"inception_score": inception_score(softmax(sample_features["logits"]), split_size)}
        statistics = {}
        for metric, kind in (("fid", "pool"), ("sfid", "spatial")):
            if kind not in references:
                note(f"{METRICS[metric]} skipped: {ref_set.name} has neither images nor precomputed statistics of "
                     f"the {kind} features")
                metrics[metric], statistics[kind] = None, None
                continue
            reference, statistics[kind] = references[kind]
            if reference.dim != sample_features[kind].shape[1]:
                raise UserError(f"the {statistics[kind]} {kind} statistics of {ref_set.name} have {reference.dim} "
                                 f"dimensions, but the {extractor.name} {kind} features have "
                                 f"{sample_features[kind].shape[1]}")
            metrics[metric] = reference.frechet_distance(fid_statistics(sample_features[kind]), method=fid_method)
        smallest = min(ref_set.num_images, sample_set.num_images)
        if ref_features is None:
            note(f"Precision and Recall skipped: they need the reference images, and {ref_set.name} has "
                 "none (arr_0), only precomputed statistics")
            metrics["precision"] = metrics["recall"] = None
        elif smallest <= k:
            note(f"Precision and Recall skipped: their k={k} nearest-neighbour balls need at least {k + 1} "
                 f"images per set, and a set has {smallest}")
            metrics["precision"] = metrics["recall"] = None
        else:
            metrics["precision"], metrics["recall"] = precision_recall(
                ref_features["pool"], sample_features["pool"], k=k, batch_size=pr_batch_size, device=device)
        results.append({
            "feature_space": extractor.name,
            "reference": ref_set.name, "sample": sample_set.name,
            "num_reference_images": ref_set.num_images, "num_sample_images": sample_set.num_images,
            "reference_statistics": statistics,
            "metrics": metrics,
            "notes": notes,
        })
    return results


def metric_label(metric: str, feature_space: str) -> str:
    """The table label of a metric: ADM's name, with the feature space when it is not ADM's Inception."""
    label = METRICS[metric]
    return label if feature_space == InceptionV3Features.name else f"{label} (feature space: {feature_space})"


def format_results(results: dict) -> str:
    """The results of `evaluate` as a table."""
    statistics = ", ".join(f"{kind} {how}" for kind, how in results["reference_statistics"].items() if how)
    lines = [f"reference: {results['reference']} ({results['num_reference_images']} images; statistics: "
             f"{statistics})",
             f"sample:    {results['sample']} ({results['num_sample_images']} images)",
             f"features:  {results['feature_space']}"]
    labels = {m: metric_label(m, results["feature_space"]) for m in METRICS}
    width = max(len(label) for label in labels.values())
    lines.append(f"{'metric':<{width}}  {'value':>10}")
    for metric, label in labels.items():
        value = results["metrics"][metric]
        lines.append(f"{label:<{width}}  {'skipped' if value is None else f'{value:.4f}':>10}")
    return "\n".join(lines)


def write_results(path: str | os.PathLike, results: dict | Sequence[dict]) -> None:
    """Writes the results of `evaluate` (a dict) or `evaluate_many` (a list of them, written as
    {"results": [...]}) as JSON, atomically; a non-finite value is written as a string."""
    def clean(result: dict) -> dict:
        return dict(result, metrics={m: v if v is None or math.isfinite(v) else str(v)
                                     for m, v in result["metrics"].items()})

    atomic_write_json(path, clean(results) if isinstance(results, dict) else {"results": [clean(r) for r in results]})


__all__ = ["METRICS", "evaluate", "evaluate_many", "format_results", "load_extractor", "metric_label", "resolve_device",
           "write_results"]
