"""The ADM metrics on sets whose answers are known: FID, Inception Score, precision and recall."""

import numpy as np
import pytest
import scipy.linalg

from tinyfusion.evaluation.metrics import (
    FIDStatistics,
    fid_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
    softmax,
)

METHODS = ["sqrtm", "eigvals"]


def random_covariance(rng, dim, samples=None):
    x = rng.normal(size=(samples or 3 * dim, dim)) @ rng.normal(size=(dim, dim))
    return np.cov(x, rowvar=False)


#################################################################################
#                                Frechet distance                               #
#################################################################################

def test_fid_statistics_are_mean_and_float64_covariance():
    features = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    stats = fid_statistics(features)
    assert stats.mu.dtype == stats.sigma.dtype == np.float64
    np.testing.assert_allclose(stats.mu, features.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_of_a_set_with_itself_is_zero(method):
    stats = fid_statistics(np.random.default_rng(1).normal(size=(200, 16)))
    assert abs(stats.frechet_distance(stats, method=method)) < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form(method):
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_of_gaussians_sharing_eigenvectors_is_the_closed_form(method):
    # sigma_i = Q diag(s_i) Q^T commute, so (sigma1 sigma2)^(1/2) = Q diag(sqrt(s1 s2)) Q^T.
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    s1, s2 = rng.uniform(0.5, 2, size=6), rng.uniform(0.5, 2, size=6)
    mu1, mu2 = np.zeros(6), np.full(6, 0.5)
    expected = 6 * 0.25 + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    value = frechet_distance(mu1, q @ np.diag(s1) @ q.T, mu2, q @ np.diag(s2) @ q.T, method=method)
    assert value == pytest.approx(expected, rel=1e-9)


def test_the_two_methods_agree_on_general_covariances():
    rng = np.random.default_rng(4)
    a, b = random_covariance(rng, 32), random_covariance(rng, 32)
    mu = rng.normal(size=32)
    sqrtm = frechet_distance(mu, a, -mu, b, method="sqrtm")
    assert frechet_distance(mu, a, -mu, b, method="eigvals") == pytest.approx(sqrtm, rel=1e-9)


def test_a_non_finite_square_root_is_retried_with_the_eps_offset(monkeypatch):
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 0.0])
    value = frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-2)
    # The retry takes the root of (s1 + eps I)(s2 + eps I), as ADM does.
    expected = 14 - 2 * (np.sqrt(1.01 * 9.01) + np.sqrt(4.01 * 0.01))
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], np.diag([1.01 * 9.01, 4.01 * 0.01]))
    assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_a_significant_imaginary_component_is_an_error(method):
    # A "covariance" with a negative eigenvalue: the root of the product has imaginary part 1.
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]), method=method)


def test_frechet_distance_rejects_statistics_of_different_dimensions():
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma of shape"):
        FIDStatistics(np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="method must be one of"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


#################################################################################
#                                 Inception Score                               #
#################################################################################

def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(np.full((30, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("num_classes", [1, 2, 7, 10])
def test_inception_score_of_one_hot_predictions_spread_evenly_is_the_class_count(num_classes):
    probs = np.eye(num_classes)[np.arange(5 * num_classes) % num_classes]
    assert inception_score(probs) == pytest.approx(num_classes, rel=1e-12)


def test_inception_score_averages_over_splits_of_split_size():
    # First split: one-hot over 5 classes (score 5); second: uniform (score 1).
    probs = np.concatenate([np.eye(5), np.full((5, 5), 0.2)])
    assert inception_score(probs, split_size=5) == pytest.approx(3.0, rel=1e-12)
    assert inception_score(probs, split_size=10) < 3.0


def test_inception_score_matches_the_kl_formula_on_softmax_predictions():
    logits = np.random.default_rng(5).normal(size=(12, 4)) * 3
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    marginal = p.mean(axis=0)
    expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1)))
    np.testing.assert_allclose(softmax(logits), p, rtol=1e-12)
    assert inception_score(softmax(logits)) == pytest.approx(expected, rel=1e-12)


#################################################################################
#                               Precision and recall                            #
#################################################################################

def square(corner, side=1.0):
    """The 4 corners of an axis-aligned square: the squared distance to the 3rd neighbour is 2 side^2."""
    x, y = corner
    return np.array([[x, y], [x + side, y], [x, y + side], [x + side, y + side]], dtype=np.float32)


def brute_force_precision_recall(ref, sample, k=3):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    d = ((ref[:, None] - sample[None]) ** 2).sum(-1)  # (n_ref, n_sample)
    precision = (d <= radii(ref)[:, None]).any(axis=0).mean()
    recall = (d <= radii(sample)[None, :]).any(axis=1).mean()
    return precision, recall


def test_manifold_radius_is_the_distance_to_the_third_neighbour_counting_the_point_itself():
    points = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # Sorted squared distances of 0: [0, 1, 9, 36, 100] -> index 3 is 36.
    np.testing.assert_array_equal(manifold_radii(points).numpy(), [36, 25, 9, 25, 81])
    with pytest.raises(ValueError, match="at least 4 images"):
        manifold_radii(points[:3])


@pytest.mark.parametrize("batch_size", [10000, 3])
def test_precision_and_recall_of_planted_clusters(batch_size):
    # Reference: three far-apart unit squares; samples: the first one shifted by 0.5 (inside its
    # balls, radius^2 = 2) and a square far from all of them. 4 of 8 samples are covered, and 4 of
    # 12 reference points.
    ref = np.concatenate([square((0, 0)), square((100, 0)), square((0, -100))])
    sample = np.concatenate([square((0.5, 0)), square((-100, 100))])
    precision, recall = precision_recall(ref, sample, batch_size=batch_size)
    assert (precision, recall) == (0.5, 1 / 3)
    assert precision_recall(ref, ref, batch_size=batch_size) == (1.0, 1.0)


def test_a_point_on_the_boundary_of_a_ball_is_inside():
    # Sample square with corner (-1, -1): only (-1, -1) is within sqrt(2) of a reference point,
    # exactly on the boundary of (0, 0)'s ball; and only (0, 0) is in a sample ball.
    assert precision_recall(square((0, 0)), square((-2, -2))) == (0.25, 0.25)


def test_precision_and_recall_match_a_brute_force_computation():
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(60, 5)).astype(np.float32)
    sample = (rng.normal(size=(45, 5)) * 1.5 + 0.5).astype(np.float32)
    expected = brute_force_precision_recall(ref.astype(np.float64), sample.astype(np.float64))
    assert precision_recall(ref, sample, batch_size=16) == pytest.approx(expected, abs=1e-12)
