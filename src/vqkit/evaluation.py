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


def reconstruction_fd(originals: torch.Tensor, reconstructions: torch.Tensor, dataset: str, progress: bool = False) -> dict:
    """FD between images and their reconstructions (both [-1, 1]) in the feature space of a network vqkit has
    offline, with the FD(TRAIN, TEST) floor where it is defined. Named for its feature network, never "FID"."""
    from .metrics.classifier import fd_between, fd_floor, get_classifier

    if dataset in ("mnist5k",):
        with torch.enable_grad():  # the first call trains the classifier (then it is cached)
            clf = get_classifier(dataset, progress=progress)
        return {"fd_classifier": fd_between(clf, originals, reconstructions),
                "fd_floor_train_test": fd_floor(dataset, clf), "fd_feature_network": clf.name}
    if originals.shape[1] == 3:
        from .losses.perceptual import PerceptualWeightsMissing
        from .metrics.classifier import EffNetPooledFeatures

        try:
            net = EffNetPooledFeatures()
        except PerceptualWeightsMissing as e:
            return {"fd_note": f"no offline feature network for {dataset}: {e}"}
        return {net.metric_name: fd_between(net, originals, reconstructions)}
    return {}


@torch.no_grad()
def evaluate_tokenizer(model: VQModel, source: ImageSource, batch_size: int = 250, progress: bool = False,
                       device: torch.device | str | None = None, feature_distance: bool = False) -> dict:
    """PSNR, SSIM (mean over images), codebook usage and perplexity over the source, bits per image; with
    ``feature_distance`` also the reconstruction FD (see reconstruction_fd)."""
    device = device or next(model.parameters()).device
    model.eval()
    psnrs, ssims = [], []
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long)
    grid = None
    originals, recons = [], []
    for images, _ in tqdm(iterate_source(source, batch_size), total=math.ceil(len(source) / batch_size),
                          desc="eval", disable=not progress, leave=False):
        x = ((images.float() + 1) / 2).to(device)
        idx = model.tokenize(x)
        y = model.detokenize(idx, size=tuple(x.shape[-2:]))
        grid = tuple(idx.shape[-2:])
        counts += code_histogram(idx, model.config.codebook_size)
        psnrs.append(psnr_per_image(x, y).cpu())
        ssims.append(ssim_per_image(x, y))
        if feature_distance:
            originals.append(x.cpu() * 2 - 1)
            recons.append(y.cpu() * 2 - 1)
    psnr = torch.cat(psnrs).numpy()
    ssim = np.concatenate(ssims)
    h, w = grid
    extra = reconstruction_fd(torch.cat(originals), torch.cat(recons), source.name, progress) if feature_distance else {}
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
        **extra,
    }
