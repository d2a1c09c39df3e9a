"""Evaluation of a tokenizer on a held-out split, with the metrics as DESIGN.md defines them."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.sources import ImageSource
from .metrics import code_histogram, codebook_stats, psnr_per_image, ssim_per_image
from .models.tokenizer import VQModel


def iterate_source(source: ImageSource, batch_size: int):
    """Deterministic batches of (images in [-1, 1], labels) over a whole source."""
    tensors = getattr(source, "tensors", None)
    if tensors is not None:
        data, labels = tensors()
        for s in range(0, len(source), batch_size):
            yield data[s:s + batch_size], (labels[s:s + batch_size] if labels is not None else None)
        return
    for s in range(0, len(source), batch_size):
        items = [source[i] for i in range(s, min(len(source), s + batch_size))]
        yield torch.stack([im for im, _ in items]), torch.tensor([lab for _, lab in items])


@torch.no_grad()
def evaluate_tokenizer(model: VQModel, source: ImageSource, batch_size: int = 250, progress: bool = False,
                       device: torch.device | str | None = None) -> dict:
    """PSNR, SSIM (mean over images), codebook usage and perplexity over the source, bits per image."""
    device = device or next(model.parameters()).device
    model.eval()
    psnrs, ssims = [], []
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long)
    grid = None
    for images, _ in tqdm(iterate_source(source, batch_size), total=math.ceil(len(source) / batch_size),
                          desc="eval", disable=not progress, leave=False):
        x = ((images.float() + 1) / 2).to(device)
        idx = model.tokenize(x)
        y = model.detokenize(idx, size=tuple(x.shape[-2:]))
        grid = tuple(idx.shape[-2:])
        counts += code_histogram(idx, model.config.codebook_size)
        psnrs.append(psnr_per_image(x, y).cpu())
        ssims.append(ssim_per_image(x, y))
    psnr = torch.cat(psnrs).numpy()
    ssim = np.concatenate(ssims)
    h, w = grid
    return {
        "data": source.name,
        "split": source.split,
        "num_images": int(len(psnr)),
        "psnr": float(psnr.mean()),
        "ssim": float(ssim.mean()),
        **codebook_stats(counts),
        "codebook_size": model.config.codebook_size,
        "tokens_per_image": h * w,
        "token_grid": [h, w],
        "bits_per_image": h * w * math.log2(model.config.codebook_size),
    }
