"""Nearest-code search without the full N x K distance matrix.

Peers build the whole N x K matrix of distances (and, in training, a one-hot of the same size): at N=65536 vectors and
K=16384 codes that is 4 GiB per copy in fp32. Here the rows are processed in chunks whose distance block stays under a
fixed element budget, so peak memory is O(chunk x K) whatever N is.
"""

from __future__ import annotations

import torch

# Elements of one distance block (chunk_rows x K). 2**24 fp32 = 64 MiB.
DEFAULT_BLOCK_ELEMENTS = 1 << 24


@torch.no_grad()
def nearest_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    codebook_sq_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and squared distance of the nearest codebook row for each row of ``x``.

    x: [N, d], codebook: [K, d], both float. Returns (indices int64 [N], squared distances [N]).
    Computed in fp32 whatever the input dtype (bf16 distances pick wrong codes and gave peers NaNs).
    """
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_code expects x [N,d] and codebook [K,d]; got {tuple(x.shape)} and {tuple(codebook.shape)}")
    x = x.float()
    codebook = codebook.float()
    n, k = x.shape[0], codebook.shape[0]
    e_sq = codebook.pow(2).sum(1) if codebook_sq_norm is None else codebook_sq_norm.float()
    rows = max(1, block_elements // max(k, 1))
    indices = torch.empty(n, dtype=torch.long, device=x.device)
    dists = torch.empty(n, dtype=torch.float32, device=x.device)
    for start in range(0, n, rows):
        xb = x[start:start + rows]
        # ||x||^2 is constant per row and does not change the argmin; add it back only for the returned distance.
        d = torch.addmm(e_sq.unsqueeze(0), xb, codebook.t(), beta=1.0, alpha=-2.0)
        best, idx = d.min(dim=1)
        indices[start:start + rows] = idx
        dists[start:start + rows] = (best + xb.pow(2).sum(1)).clamp_min_(0.0)
    return indices, dists


def brute_force_nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Reference: argmin over the full distance matrix (for tests and small inputs only)."""
    return torch.cdist(x.double(), codebook.double()).argmin(dim=1)
