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


def lpips_if_available(device: torch.device | str = "cpu"):
    """(LPIPS module, None) when its weights are on this machine, else (None, why not): LPIPS is reported where its
    weights are present and never makes an evaluation fail."""
    from .losses.perceptual import LPIPS, PerceptualWeightsMissing

    try:
        return LPIPS().to(device), None
    except PerceptualWeightsMissing:
        return None, ("its weights are not on this machine (vgg16-397923af.pth and the lpips package's "
                      "weights/v0.1/vgg.pth, in ~/.cache/vqkit or torch hub's cache; see perceptual.kind: lpips)")
    except ValueError as e:  # a broken weight file (VQKitFileError) must not cost the rest of the evaluation
        return None, f"its weights could not be read: {e}"


@torch.no_grad()
def evaluate_tokenizer(model: VQModel, source: ImageSource, batch_size: int = 250, progress: bool = False,
                       device: torch.device | str | None = None, feature_distance: bool = False,
                       fid_network=None, fid_floor_images: torch.Tensor | None = None, lpips="auto") -> dict:
    """PSNR, SSIM (mean over images), codebook usage and perplexity over the source, bits per image; with
    ``feature_distance`` also the reconstruction FD (see reconstruction_fd). With ``fid_network`` (an
    ``InceptionFeatures``) also ``fid_inception`` between the images and their reconstructions, and with
    ``fid_floor_images`` (the other split, [-1, 1]) its floor FID(other split, these images). ``lpips``: an LPIPS
    module, None, or "auto" (LPIPS if its weights are on this machine): the mean LPIPS (VGG) between the images and
    their reconstructions, ``lpips_vgg``; "auto" without weights leaves it out and says why in ``lpips_note``."""
    device = device or next(model.parameters()).device
    model.eval()
    psnrs, ssims, lpips_values = [], [], []
    lpips_note = None
    if isinstance(lpips, str):
        if lpips != "auto":
            raise ValueError(f"lpips must be an LPIPS module, None or 'auto', got {lpips!r}")
        lpips, lpips_note = lpips_if_available(device)
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
        if lpips is not None:
            lpips_values.append(lpips(x * 2 - 1, y * 2 - 1).float().cpu())
        if feature_distance or fid_network is not None:
            originals.append(x.cpu() * 2 - 1)
            recons.append(y.cpu() * 2 - 1)
    psnr = torch.cat(psnrs).numpy()
    ssim = np.concatenate(ssims)
    h, w = grid
    extra = reconstruction_fd(torch.cat(originals), torch.cat(recons), source.name, progress) if feature_distance else {}
    if lpips is not None:
        extra["lpips_vgg"] = float(torch.cat(lpips_values).mean())
    elif lpips_note is not None:
        extra["lpips_note"] = lpips_note
    if fid_network is not None:
        from .metrics.inception import fid_scores

        extra.update(fid_scores(fid_network, torch.cat(recons), torch.cat(originals), fid_floor_images, progress))
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
