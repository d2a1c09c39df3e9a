"""Reading, resizing and writing single images as float arrays [H, W, C] in [0, 1].

``read_image`` turns any image file PIL can decode into float32 [H, W, 1] (grayscale) or [H, W, 3] (colour):

* 1-bit, L and palette images scale 0..255 (or 0/1) to [0, 1]; palettes with only grey entries stay grayscale.
* 16-bit images ("I;16", "I;16B", "I;16L", and "I", the mode older Pillow gives 16-bit PNGs) scale by 65535, so that
  65535 is white and 40000 is 0.61 (not clipped at 255). "I" images with values above 65535 are taken as 32-bit.
* Float ("F") images must already lie in [0, 1].
* Images with transparency (RGBA, LA, PA, palettes with a transparent entry) are composited on WHITE: a transparent
  background becomes white, which is what a viewer shows and what a tokenizer can reproduce (alpha is dropped).
* CMYK, YCbCr, LAB, HSV are converted to RGB. EXIF orientation is applied, so camera photos come out upright.
* Multi-frame files (TIFF stacks, animations) give their first frame.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..io import atomic_write
from .sources import SourceError

RESIZE_POLICIES = ("resize", "crop", "stretch", "pad")

_GRAY_MODES = {"1", "L", "I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# ITU-R 601 luma weights, the ones PIL uses for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as float32 [H, W, C] in [0, 1], C = 1 (grayscale) or 3 (colour); see the module doc."""
    try:
        with Image.open(path) as img:
            # load() inside the try: PIL opens lazily, so truncated or corrupt pixel data only fails here.
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_float_array(img)
    except SourceError as err:
        raise SourceError(f"{path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise many types (OSError, SyntaxError, struct.error...)
        raise SourceError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None


def _to_float_array(img: Image.Image) -> np.ndarray:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB" and _is_gray_rgb(img):
            img = img.convert("L")
    if img.mode in _ALPHA_MODES:
        return _composite_on_white(img)
    if img.mode in _GRAY_MODES:
        return _gray_to_float(img)[..., None]
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _is_gray_rgb(img: Image.Image) -> bool:
    pixels = np.asarray(img)
    return bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())


def _gray_to_float(img: Image.Image) -> np.ndarray:
    """A single-channel image [H, W] in [0, 1], scaled by the range of its mode."""
    if img.mode == "1":
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if img.mode == "L":
        return np.asarray(img, dtype=np.float32) / 255.0
    if img.mode == "F":
        pixels = np.asarray(img, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0.0 and high <= 1.0):
            raise SourceError(f"float image with values in [{low:g}, {high:g}]; expected [0, 1]")
        return pixels.copy()
    # 16-bit modes, and "I" (32-bit signed), which is how Pillow < 10 and some TIFFs hold 16-bit data.
    pixels = np.asarray(img).astype(np.float64)
    full_scale = 65535.0 if pixels.max() <= 65535 else float(2**31 - 1)
    return (np.clip(pixels, 0.0, None) / full_scale).astype(np.float32)


def _composite_on_white(img: Image.Image) -> np.ndarray:
    rgba = np.asarray(img.convert("LA" if img.mode in ("LA", "La") else "RGBA"), dtype=np.float32) / 255.0
    colour, alpha = rgba[..., :-1], rgba[..., -1:]
    return colour * alpha + (1.0 - alpha)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Convert [..., C] between 1 (grayscale, ITU-R 601 luma) and 3 (RGB, grey repeated) channels."""
    have = image.shape[-1]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if have == 3 and channels == 1:
        return (image.astype(np.float32) @ _LUMA)[..., None]
    raise ValueError(f"cannot convert {have} channels to {channels}; supported: 1 <-> 3")


def _as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def resample(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize float [H, W, C] to [height, width, C]: LANCZOS when shrinking (sharp, no aliasing), else BICUBIC."""
    if image.shape[:2] == (height, width):
        return image
    shrinking = height * width < image.shape[0] * image.shape[1]
    method = Image.LANCZOS if shrinking else Image.BICUBIC
    # One 32-bit float PIL image per channel keeps 16-bit precision (an 8-bit round trip would not).
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
                         .resize((width, height), method)) for c in range(image.shape[2])]
    # Both filters overshoot slightly at sharp edges.
    return np.clip(np.stack(planes, axis=-1), 0.0, 1.0)


def scale_for_policy(image: np.ndarray, size: int | tuple[int, int], policy: str) -> np.ndarray:
    """The resizing part of ``policy``: the result is ``size`` for stretch/pad, and covers ``size`` for resize/crop
    (``crop_to_size`` then takes the crop). Split from the crop so that sources can cache this result and draw a
    fresh random crop from it each time."""
    height, width = _as_hw(size)
    h, w = image.shape[:2]
    if policy == "stretch":
        return resample(image, height, width)
    if policy == "resize":
        scale = max(height / h, width / w)
        return resample(image, max(height, round(h * scale)), max(width, round(w * scale)))
    if policy == "crop":
        scale = max(height / h, width / w, 1.0)  # only images smaller than the crop are (up)scaled
        return resample(image, max(height, round(h * scale)), max(width, round(w * scale)))
    if policy == "pad":
        scale = min(height / h, width / w)
        fitted = resample(image, max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale))))
        return _pad_edges(fitted, height, width)
    raise ValueError(f"unknown resize policy {policy!r}; use one of {RESIZE_POLICIES}")


def _pad_edges(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre ``image`` in [height, width], filling by replicating its edge pixels (no artificial border colour)."""
    pad_h, pad_w = height - image.shape[0], width - image.shape[1]
    return np.pad(image, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)), mode="edge")


def crop_to_size(image: np.ndarray, size: int | tuple[int, int], rng: np.random.Generator | None = None) -> np.ndarray:
    """A ``size`` crop of an image at least that large: random when ``rng`` is given, else centred."""
    height, width = _as_hw(size)
    spare_h, spare_w = image.shape[0] - height, image.shape[1] - width
    if spare_h < 0 or spare_w < 0:
        raise ValueError(f"image {image.shape[:2]} is smaller than the crop {(height, width)}")
    if rng is None:
        top, left = spare_h // 2, spare_w // 2
    else:
        top, left = int(rng.integers(0, spare_h + 1)), int(rng.integers(0, spare_w + 1))
    return image[top:top + height, left:left + width]


def resize_image(image: np.ndarray, size: int | tuple[int, int], policy: str = "resize",
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Bring float [H, W, C] to ``size`` (an int for a square, or (height, width)) with ``policy``:

    * "resize": scale the shorter side to the size, then crop the longer one (centred; random with ``rng``);
    * "crop": crop without scaling (centred; random with ``rng``); images smaller than the size are upscaled first;
    * "stretch": scale both sides to the size, ignoring the aspect ratio;
    * "pad": scale the longer side to the size, then pad the shorter one by replicating the edge pixels.
    """
    return crop_to_size(scale_for_policy(image, size, policy), size, rng)


def _to_hwc_numpy(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """[H, W], [H, W, C] or [C, H, W] -> [H, W, C]. Tensors are read channel-first (torch's convention) when
    their first dim is 1, 3 or 4; arrays channel-last when their last dim is."""
    is_tensor = isinstance(image, torch.Tensor)
    array = image.detach().cpu().float().numpy() if is_tensor else np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        return array[..., None]
    if array.ndim != 3:
        raise ValueError(f"expected an image [H, W, C] or [C, H, W], got shape {array.shape}")
    channel_first = array.shape[0] in (1, 3, 4) and (is_tensor or array.shape[-1] not in (1, 3, 4))
    return array.transpose(1, 2, 0) if channel_first else array


def save_image(path: str | os.PathLike, image: np.ndarray | torch.Tensor) -> None:
    """Write a PNG from float values in [0, 1] ([H, W, C], [C, H, W] or [H, W]; numpy or torch). One channel gives
    a grayscale (mode L) PNG. Written to a temporary file then renamed, so that readers never see a partial file."""
    array = _to_hwc_numpy(image)
    pixels = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    channels = pixels.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"cannot save an image with {channels} channels; use 1, 3 or 4")
    picture = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def make_grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, padding: int = 2,
              pad_value: float = 1.0) -> np.ndarray:
    """Tile images [N, C, H, W] in [0, 1] into one float32 array [H', W', C], ``nrow`` images per row (default:
    a near-square grid), with ``padding`` pixels of ``pad_value`` around and between them."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    batch = np.asarray(images, dtype=np.float32)
    if batch.ndim != 4 or len(batch) == 0:
        raise ValueError(f"expected a non-empty batch [N, C, H, W], got shape {batch.shape}")
    n, c, h, w = batch.shape
    columns = min(nrow or int(np.ceil(np.sqrt(n))), n)
    rows = int(np.ceil(n / columns))
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), pad_value, np.float32)
    for k in range(n):
        top = padding + (k // columns) * (h + padding)
        left = padding + (k % columns) * (w + padding)
        grid[top:top + h, left:left + w] = batch[k].transpose(1, 2, 0)
    return grid
