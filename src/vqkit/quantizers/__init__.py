"""Vector quantizers: encoder features [B, D, h, w] in; quantized features, token indices, loss and stats out."""

from .nearest import brute_force_nearest, nearest_code
from .vq import QuantizerOutput, VectorQuantizer, histogram_stats, kmeans

__all__ = ["VectorQuantizer", "QuantizerOutput", "nearest_code", "brute_force_nearest", "kmeans", "histogram_stats"]
