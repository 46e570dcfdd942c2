"""Evaluation of generated images, in PyTorch: the metrics of the ADM suite (Inception Score, FID,
sFID, precision and recall) over the FID InceptionV3 or a feature extractor of one's own.

    from tinyfusion.evaluation import evaluate, load_extractor, format_results
    results = evaluate("VIRTUAL_imagenet256_labeled.npz", "samples.npz", load_extractor())
    print(format_results(results))
"""

from .classifier import (
    FEATURE_EXTRACTORS,
    SmallClassifier,
    classifier_accuracy,
    load_feature_extractor,
    save_feature_extractor,
    train_classifier,
)
from .extractors import FEATURE_KINDS, FeatureExtractor, embed_images, match_channels
from .images import ArrayImages, FolderImages, ImageSet, NpzImages, open_images, split_halves
from .inception import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    InceptionV3Features,
    default_inception_path,
    load_inception,
    resolve_inception_weights,
)
from .metrics import FIDStatistics, fid_statistics, frechet_distance, inception_score, precision_recall, softmax
from .pipeline import (
    METRICS,
    evaluate,
    evaluate_many,
    format_results,
    load_extractor,
    metric_label,
    resolve_device,
    write_results,
)

__all__ = [
    "FEATURE_EXTRACTORS", "FEATURE_KINDS", "INCEPTION_FILENAME", "INCEPTION_URL", "METRICS", "ArrayImages",
    "FIDStatistics", "FeatureExtractor", "FolderImages", "ImageSet", "InceptionV3Features", "NpzImages",
    "SmallClassifier", "classifier_accuracy", "default_inception_path", "evaluate", "evaluate_many", "embed_images",
    "fid_statistics", "format_results", "frechet_distance", "inception_score", "load_extractor",
    "load_feature_extractor", "load_inception", "match_channels", "metric_label", "open_images",
    "precision_recall", "resolve_device", "resolve_inception_weights", "save_feature_extractor", "softmax",
    "split_halves", "train_classifier", "write_results",
]
