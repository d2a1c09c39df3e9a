"""Distances between two sets of feature vectors: Frechet distance (Gaussian fits) and kernel distance (KID-style MMD).

Which network made the features is the caller's business, and so is the name of the number: a Frechet distance over
Inception-v3 pool features is "FID"; over anything else it must be named after that network (e.g. ``fd_effnet_lite0``).
"""

from __future__ import annotations

import warnings
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


def _sqrtm_unless_singular(matrix: np.ndarray) -> np.ndarray | None:
    """scipy's sqrtm; None if the root is not finite or scipy warns that the matrix is singular (inaccurate root)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", linalg.LinAlgWarning)
        try:
            root = linalg.sqrtm(matrix)
        except linalg.LinAlgWarning:
            return None
    return root if np.isfinite(root).all() else None


def frechet_distance_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray,
                                eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + tr(sigma_a + sigma_b - 2 (sigma_a sigma_b)^(1/2)) between two Gaussians."""
    mu_a, mu_b = np.atleast_1d(mu_a).astype(np.float64), np.atleast_1d(mu_b).astype(np.float64)
    sigma_a, sigma_b = np.atleast_2d(sigma_a).astype(np.float64), np.atleast_2d(sigma_b).astype(np.float64)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape} vs {mu_b.shape}")
    covmean = _sqrtm_unless_singular(sigma_a @ sigma_b)
    if covmean is None:
        # Singular covariances (fewer samples than dimensions, dead ReLU features): widen both Gaussians by eps in
        # every direction. The traces below use the widened covariances too, so that the result stays the distance
        # between two actual Gaussians (>= 0) even when the features' own variances are as small as eps.
        sigma_a, sigma_b = sigma_a + np.eye(len(sigma_a)) * eps, sigma_b + np.eye(len(sigma_b)) * eps
        covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if np.iscomplexobj(covmean):
        # sqrtm of a product of PSD matrices is real in exact arithmetic; round-off leaves tiny imaginary parts.
        largest = np.abs(covmean.imag).max()
        if largest > MAX_IMAGINARY:
            raise ValueError(f"matrix square root has an imaginary component of {largest:.3g}: covariances are "
                             f"not positive semi-definite (too few samples or non-finite features?)")
        covmean = covmean.real
    diff = mu_a - mu_b
    distance = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean)
    # The exact value is >= 0; round-off can leave it a hair below for (nearly) identical sets.
    return max(float(distance), 0.0)


def frechet_distance(feats_a, feats_b, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussian fits of two feature sets [N_a, D] and [N_b, D]."""
    return frechet_distance_from_stats(*gaussian_fit(feats_a), *gaussian_fit(feats_b), eps=eps)


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
