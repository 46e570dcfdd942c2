"""The metrics of the ADM evaluation suite (Dhariwal & Nichol 2021, openai/guided-diffusion
`evaluations/evaluator.py`), on feature arrays: FID, sFID, Inception Score, precision and recall.

They do not care which network made the features (see `tinyfusion.evaluation.extractors`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from scipy import linalg
from scipy.special import rel_entr

from ..errors import UserError

# ADM's defaults: Inception Score over splits of 5000 predictions (as improved-gan's inception_score
# did), precision/recall with the 3rd nearest neighbour (Kynkaanniemi et al. 2019, k = 3) and
# distances computed in blocks of 10000 x 10000 rows.
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURHOOD = 3
PR_BATCH_SIZE = 10000
# ADM's Frechet distance: the offset added to both covariances when sqrtm of their product is not
# finite, and the tolerance on the imaginary part of its diagonal.
FID_EPS = 1e-6
FID_IMAG_ATOL = 1e-3


#################################################################################
#                          Frechet distance (FID, sFID)                         #
#################################################################################

# How the trace of (sigma1 sigma2)^(1/2) is computed (see `frechet_distance`).
FID_METHODS = ("sqrtm", "eigvals")


@dataclasses.dataclass
class FIDStatistics:
    """The Gaussian that FID fits to a feature set: mean (D,) and covariance (D, D), float64."""

    mu: np.ndarray
    sigma: np.ndarray

    def __post_init__(self):
        self.mu = np.atleast_1d(np.asarray(self.mu, dtype=np.float64))
        self.sigma = np.atleast_2d(np.asarray(self.sigma, dtype=np.float64))
        dim = self.mu.shape[0]
        if self.mu.ndim != 1 or self.sigma.shape != (dim, dim):
            raise UserError(f"FID statistics need mu of shape (D,) and sigma of shape (D, D); got mu "
                             f"{self.mu.shape} and sigma {self.sigma.shape}")

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    def frechet_distance(self, other: FIDStatistics, eps: float = FID_EPS, method: str = "sqrtm") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps, method=method)


def fid_statistics(features: np.ndarray) -> FIDStatistics:
    """Mean and covariance of a feature set, as ADM computes them (np.cov with rowvar=False), in float64.

    Args:
        features: (N, D) array, N >= 2.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise UserError(f"FID statistics need an (N, D) feature array with N >= 2, got shape {features.shape}")
    return FIDStatistics(features.mean(axis=0), np.cov(features, rowvar=False))


def _sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str) -> np.ndarray:
    """(sigma1 sigma2)^(1/2) ("sqrtm"), or the square roots of its eigenvalues ("eigvals")."""
    if method == "sqrtm":
        return linalg.sqrtm(sigma1.dot(sigma2))
    return np.sqrt(linalg.eigvals(sigma1.dot(sigma2)).astype(np.complex128))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS, method: str = "sqrtm") -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) (Heusel et al. 2017, eq. 6).

    method "sqrtm" is ADM's computation: scipy.linalg.sqrtm of the product; when it is not finite
    (a singular product), eps * I is added to both covariances and it is computed again; an
    imaginary part on its diagonal above 1e-3 is an error (a covariance that is not positive
    semi-definite), a smaller one numerical noise, dropped. method "eigvals" takes the same trace as
    the sum of the square roots of the eigenvalues of the product (the eigenvalues of a square root
    are the square roots of the eigenvalues), with the same retry and check on those roots: equal
    up to rounding, and several times faster at D = 2048, where scipy >= 1.16's sqrtm takes 20-40 s
    on one CPU core.

    Args:
        mu1, sigma1: mean (D,) and covariance (D, D) of the first set.
        mu2, sigma2: those of the second set.
        eps: the offset of the retry.
        method: "sqrtm" (ADM) or "eigvals".
    Raises:
        UserError: shapes that differ, or a significant imaginary component.
    """
    if method not in FID_METHODS:
        raise UserError(f"method must be one of {', '.join(FID_METHODS)}, got {method!r}")
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise UserError(f"the two sets of statistics have different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}; were they made by the same feature extractor?")
    diff = mu1 - mu2
    covmean = _sqrt_product(sigma1, sigma2, method)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrt_product(sigma1 + offset, sigma2 + offset, method)
    if np.iscomplexobj(covmean):
        diagonal = np.diagonal(covmean) if covmean.ndim == 2 else covmean
        imag = np.abs(diagonal.imag).max()
        if imag > FID_IMAG_ATOL:
            raise UserError(f"the Frechet distance has an imaginary component of {imag:.3g} (tolerance "
                             f"{FID_IMAG_ATOL}): a covariance is not positive semi-definite")
        covmean = covmean.real
    trace = np.trace(covmean) if covmean.ndim == 2 else covmean.sum()
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace)


#################################################################################
#                                 Inception Score                               #
#################################################################################

def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """exp(E_x KL(p(y|x) || p(y))) per split of `split_size` rows, averaged over the splits (Salimans
    et al. 2016; ADM's splits: consecutive runs of 5000 rows, the last one possibly shorter).

    Terms with p(y|x) = 0 count as 0 (the limit of p log p), where ADM's formula would give NaN.

    Args:
        probs: (N, K) class probabilities, each row summing to 1.
        split_size: rows per split.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise UserError(f"the Inception Score needs an (N, K) array of class probabilities, got shape {probs.shape}")
    if split_size < 1:
        raise UserError(f"split_size must be positive, got {split_size}")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)  # p(y) over the split, (1, K)
        kl = rel_entr(part, marginal).sum(axis=1)  # KL(p(y|x) || p(y)) per row, (n,)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


#################################################################################
#                          Precision and recall (k-NN manifolds)                #
#################################################################################

def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) squared euclidean distances, ||a||^2 - 2 a.b + ||b||^2 clamped at 0 (as ADM)."""
    norm_a = (a * a).sum(dim=1, keepdim=True)  # (n, 1)
    norm_b = (b * b).sum(dim=1).unsqueeze(0)  # (1, m)
    return (norm_a - 2 * a @ b.T + norm_b).clamp_min_(0)


def manifold_radii(features: np.ndarray | torch.Tensor, k: int = PR_NEIGHBOURHOOD, batch_size: int = PR_BATCH_SIZE,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """The squared distance of every feature to its k-th nearest neighbour in the set: index k of its
    sorted row of squared distances, where index 0 is the point itself (ADM's ManifoldEstimator).

    Args:
        features: (N, D), N > k.
        k: the neighbourhood size.
        batch_size: rows and columns of one block of the distance matrix.
        device: where the distances are computed.
    Returns:
        (N,) float32 radii, on `device`.
    """
    features = torch.as_tensor(features, dtype=torch.float32, device=device)
    if features.ndim != 2 or features.shape[0] <= k:
        raise UserError(f"the k-NN radii with k={k} need an (N, D) feature array with N > {k}, got shape "
                         f"{tuple(features.shape)}; precision and recall need at least {k + 1} images per set")
    radii = []
    for start in range(0, len(features), batch_size):
        rows = features[start:start + batch_size]
        block = torch.cat([_squared_distances(rows, features[col:col + batch_size])
                           for col in range(0, len(features), batch_size)], dim=1)  # (rows, N)
        radii.append(block.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(ref_features: np.ndarray | torch.Tensor, sample_features: np.ndarray | torch.Tensor,
                     k: int = PR_NEIGHBOURHOOD, batch_size: int = PR_BATCH_SIZE,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM computes them.

    Each feature carries a ball whose squared radius is the distance to its k-th nearest neighbour
    in its own set. Precision is the fraction of sample features inside (<=) at least one reference
    ball; recall is the fraction of reference features inside at least one sample ball.
    ADM computes the distances in float16 (float32 when they overflow); we use float32.

    Args:
        ref_features: (N_ref, D).
        sample_features: (N_sample, D).
        k: the neighbourhood size.
        batch_size: rows and columns of one block of the distance matrix.
        device: where the distances are computed.
    Returns:
        (precision, recall).
    """
    ref = torch.as_tensor(ref_features, dtype=torch.float32, device=device)
    sample = torch.as_tensor(sample_features, dtype=torch.float32, device=device)
    if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
        raise UserError(f"precision and recall need two (N, D) feature arrays of the same D, got shapes "
                         f"{tuple(ref.shape)} and {tuple(sample.shape)}")
    ref_radii = manifold_radii(ref, k, batch_size, device)
    sample_radii = manifold_radii(sample, k, batch_size, device)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sample_covered = torch.zeros(len(sample), dtype=torch.bool, device=device)
    for r in range(0, len(ref), batch_size):
        for s in range(0, len(sample), batch_size):
            dist = _squared_distances(ref[r:r + batch_size], sample[s:s + batch_size])  # (n_ref, n_sample)
            sample_covered[s:s + batch_size] |= (dist <= ref_radii[r:r + batch_size, None]).any(dim=0)
            ref_covered[r:r + batch_size] |= (dist <= sample_radii[None, s:s + batch_size]).any(dim=1)
    return sample_covered.double().mean().item(), ref_covered.double().mean().item()


__all__ = [
    "FIDStatistics", "FID_METHODS", "IS_SPLIT_SIZE", "PR_BATCH_SIZE", "PR_NEIGHBOURHOOD", "fid_statistics",
    "frechet_distance", "inception_score", "manifold_radii", "precision_recall", "softmax",
]
