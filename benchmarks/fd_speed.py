"""Frechet distance: vqkit's eigendecomposition route against the reference formula with scipy's sqrtm.

The reference (as pytorch-fid and the TTUR code compute it) takes sqrtm(sigma_a @ sigma_b) of the two D x D
covariances and, when the product is singular, retries with eps = 1e-6 added to both diagonals. vqkit computes the
same trace from symmetric eigendecompositions, in sample space when there are fewer images than features. Both are
run on the same random non-negative features (ReLU-like) of the sizes FID sees; the table gives both values, their
difference, and the speed ratio measured in this run (median of 3 calls each).

    python benchmarks/fd_speed.py
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from _common import write_results
from scipy import linalg

from vqkit.metrics.fd import frechet_distance

SIZES = [(1000, 1000, 64), (1000, 4000, 2048), (4000, 1000, 2048), (5000, 5000, 2048), (1000, 1000, 1280)]


def reference_fd(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """The reference formula: means, covariances, scipy sqrtm of their product (eps on singular products)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma_a @ sigma_b)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma_a)) * eps
            covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def timed(fn, *args, repeats: int = 3) -> tuple[float, float]:
    """(value, median seconds over ``repeats`` calls)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn(*args)
        times.append(time.perf_counter() - t0)
    return value, sorted(times)[len(times) // 2]


def main() -> None:
    rng = np.random.default_rng(0)
    warm = np.abs(rng.normal(size=(50, 8)))
    frechet_distance(warm, warm + 1), reference_fd(warm, warm + 1)  # first calls load LAPACK paths: not timed
    rows = []
    print(f"{'N_a':>6} {'N_b':>6} {'D':>5} | {'vqkit FD':>12} {'reference FD':>12} {'rel. diff':>9} | "
          f"{'vqkit s':>8} {'ref. s':>8} {'speed-up':>8}")
    for n_a, n_b, dim in SIZES:
        mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
        a = np.maximum(rng.normal(size=(n_a, dim)) @ mixing, 0)
        b = np.maximum(rng.normal(size=(n_b, dim)) @ mixing + 0.05, 0)
        ours, t_ours = timed(frechet_distance, a, b)
        ref, t_ref = timed(reference_fd, a, b)
        row = {"n_a": n_a, "n_b": n_b, "dim": dim, "fd_vqkit": ours, "fd_reference": ref,
               "relative_difference": abs(ours - ref) / abs(ref), "seconds_vqkit": t_ours,
               "seconds_reference": t_ref, "speedup": t_ref / t_ours}
        rows.append(row)
        print(f"{n_a:>6} {n_b:>6} {dim:>5} | {ours:>12.6f} {ref:>12.6f} {row['relative_difference']:>9.1e} | "
              f"{t_ours:>8.2f} {t_ref:>8.2f} {row['speedup']:>7.1f}x", flush=True)
    write_results("fd_speed", rows)


if __name__ == "__main__":
    main()
