"""Image quality metrics as DESIGN.md defines them: per image on [0, 1] at the original resolution, then the mean."""

from __future__ import annotations

import numpy as np
import torch


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image pair; x, y float [B, C, H, W] in [0, 1]. Identical images give 100 dB (capped)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """skimage's structural_similarity with data_range=1 (channel_axis for colour), one value per image."""
    from skimage.metrics import structural_similarity

    a = x.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    b = y.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    side = min(a.shape[1], a.shape[2])
    win = 7 if side >= 7 else (side if side % 2 else side - 1)  # skimage needs an odd window no larger than the image
    out = np.empty(len(a))
    for i in range(len(a)):
        if a.shape[-1] == 1:
            out[i] = structural_similarity(a[i, ..., 0], b[i, ..., 0], data_range=1.0, win_size=win)
        else:
            out[i] = structural_similarity(a[i], b[i], data_range=1.0, channel_axis=-1, win_size=win)
    return out
