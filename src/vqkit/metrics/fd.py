"""Distances between two sets of feature vectors: Frechet distance (Gaussian fits) and kernel distance (KID-style MMD).

Which network made the features is the caller's business, and so is the name of the number: a Frechet distance over
Inception-v3 pool features is "FID"; over anything else it must be named after that network (e.g. ``fd_effnet_lite0``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy import linalg

# Imaginary parts of sqrtm(sigma_a @ sigma_b) larger than this mean the product was far from PSD: a real error.
MAX_IMAGINARY = 1e-3


def _as_matrix(feats) -> np.ndarray:
    """Features [N, D] as float64 numpy (accepts torch tensors and array-likes)."""
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().double().numpy()
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"features must be a 2-D array [N, D], got shape {feats.shape}")
    return feats


def gaussian_fit(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and (unbiased) covariance [D, D] of features [N, D], in float64."""
    feats = _as_matrix(feats)
    if len(feats) < 2:
        raise ValueError(f"need at least 2 feature vectors to fit a covariance, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _sum_sqrt_eigenvalues(symmetric: np.ndarray) -> float:
    """Sum of the square roots of a PSD matrix's eigenvalues (round-off negatives count as 0)."""
    return float(np.sqrt(np.clip(linalg.eigvalsh(symmetric), 0.0, None)).sum())


def trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """tr((sigma_a sigma_b)^(1/2)) for PSD covariances, exactly, singular ones included.

    sigma_a sigma_b has the eigenvalues of the symmetric PSD S^(1/2) sigma_b S^(1/2) (S = sigma_a), so two symmetric
    eigendecompositions give the trace: no general matrix square root (scipy's sqrtm, which the reference FID code
    uses, is slower, returns complex round-off, and needs an eps added to singular covariances, which biases the
    result)."""
    values, vectors = linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    return _sum_sqrt_eigenvalues(root_a @ sigma_b @ root_a)


def frechet_distance_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(sigma_a + sigma_b - 2 (sigma_a sigma_b)^(1/2)) between two Gaussians."""
    mu_a, mu_b = np.atleast_1d(mu_a).astype(np.float64), np.atleast_1d(mu_b).astype(np.float64)
    sigma_a, sigma_b = np.atleast_2d(sigma_a).astype(np.float64), np.atleast_2d(sigma_b).astype(np.float64)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape} vs {mu_b.shape}")
    diff = mu_a - mu_b
    distance = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt_product(sigma_a, sigma_b)
    # The exact value is >= 0; round-off can leave it a hair below for (nearly) identical sets.
    return max(float(distance), 0.0)


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussian fits (mean, unbiased covariance) of feature sets [N_a, D] and [N_b, D].

    With fewer images than feature dimensions (e.g. 1000 images of 2048 Inception features) the covariances are
    singular and the work is done in sample space instead: with centred features A and B, the non-zero eigenvalues
    of sigma_a sigma_b are those of (A B^T)(A B^T)^T / ((N_a - 1)(N_b - 1)), a matrix of side min(N_a, N_b), so the
    trace term needs no D x D matrix at all. Both routes give the same number."""
    a, b = _as_matrix(feats_a), _as_matrix(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"need at least 2 feature vectors to fit a covariance, got {min(len(a), len(b))}")
    if min(len(a), len(b)) >= a.shape[1]:
        return frechet_distance_from_stats(*gaussian_fit(a), *gaussian_fit(b))
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    a, b = a - mu_a, b - mu_b
    scale = (len(a) - 1) * (len(b) - 1)
    cross = a @ b.T
    gram = cross @ cross.T if len(a) <= len(b) else cross.T @ cross
    diff = mu_a - mu_b
    distance = (diff @ diff + (a * a).sum() / (len(a) - 1) + (b * b).sum() / (len(b) - 1)
                - 2.0 * _sum_sqrt_eigenvalues(gram / scale))
    return max(float(distance), 0.0)


class KernelDistance(NamedTuple):
    """Unbiased MMD^2 (cubic polynomial kernel) averaged over random subsets, and its spread over those subsets."""

    mean: float
    std: float


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    m = len(x)
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    # Dropping the diagonals (each point against itself) is what makes the estimate unbiased.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kernel_distance(feats_a, feats_b, subsets: int = 100, subset_size: int | None = None,
                    seed: int = 0) -> KernelDistance:
    """KID: unbiased MMD^2 with the kernel (x.y / d + 1)^3 over ``subsets`` random subsets of each set.

    Each subset draws ``min(subset_size, N_a, N_b)`` vectors without replacement from each set; ``seed`` fixes the
    draws, so the same features always give the same number. ``subset_size`` None: 1000 (the usual KID subset), but
    at most half the smaller set, since subsets as large as a whole set would all be that set and their spread 0.
    """
    feats_a, feats_b = _as_matrix(feats_a), _as_matrix(feats_b)
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature sizes differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    if subset_size is None:
        subset_size = max(2, min(1000, len(feats_a) // 2, len(feats_b) // 2))
    size = min(subset_size, len(feats_a), len(feats_b))
    if size < 2 or subsets < 1:
        raise ValueError(f"need subsets >= 1 and at least 2 vectors per set, got {subsets} and {size}")
    rng = np.random.default_rng(seed)
    values = [_unbiased_mmd2(feats_a[rng.choice(len(feats_a), size, replace=False)],
                             feats_b[rng.choice(len(feats_b), size, replace=False)]) for _ in range(subsets)]
    return KernelDistance(float(np.mean(values)), float(np.std(values)))


def nearest_neighbour_ratio(generated, reference, held_out, chunk: int = 1024) -> float:
    """How close generated images sit to the training set, relative to fresh images: the mean Euclidean distance
    from each ``generated`` vector to its nearest ``reference`` (TRAIN) vector, divided by the same mean for the
    ``held_out`` (TEST) vectors.

    About 1: the samples are as far from TRAIN as new real images are. Well below 1: they copy TRAIN. A low FD with a
    low ratio is memorisation, not generalisation; FD alone cannot tell the two apart.
    """
    reference = torch.as_tensor(_as_matrix(reference))

    def mean_nearest(feats) -> float:
        feats = torch.as_tensor(_as_matrix(feats))
        if feats.shape[1] != reference.shape[1]:
            raise ValueError(f"feature sizes differ: {feats.shape[1]} vs {reference.shape[1]}")
        return float(torch.cat([torch.cdist(feats[s:s + chunk], reference).min(dim=1).values
                                for s in range(0, len(feats), chunk)]).mean())

    fresh = mean_nearest(held_out)
    if fresh == 0.0:
        raise ValueError("every held-out vector equals a reference vector: the ratio is undefined")
    return mean_nearest(generated) / fresh
