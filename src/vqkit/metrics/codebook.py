"""Codebook statistics over a set of token grids: usage (fraction of codes seen) and perplexity."""

from __future__ import annotations

import torch

from ..quantizers import histogram_stats


def code_histogram(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    return torch.bincount(indices.reshape(-1).long().cpu(), minlength=codebook_size)


def codebook_stats(counts: torch.Tensor) -> dict:
    """Usage and perplexity from a histogram of code counts (exp of the histogram's entropy)."""
    perplexity, usage = histogram_stats(counts)
    return {"codebook_usage": usage, "perplexity": perplexity, "codes_used": int((counts > 0).sum())}
