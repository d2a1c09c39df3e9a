"""Images stored in a .npy or .npz file as an ArraySource."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from .images import RESIZE_POLICIES, resize_image, to_channels
from .sources import SPLITS, ArraySource, SourceError, index_split

IMAGE_KEYS = ("images", "x")
LABEL_KEYS = ("labels", "y")
_CHANNEL_COUNTS = (1, 3, 4)


def load_array_source(path: str | os.PathLike, split: str = "train", image_size: int | tuple[int, int] | None = None,
                      channels: int | None = None, strict: bool = False, resize: str = "resize",
                      **ignored) -> ArraySource:
    """Open a ``.npy`` file of images, or a ``.npz`` file of images and optional labels.

    Images: [N, H, W], [N, H, W, C] or [N, C, H, W] with C in 1, 3, 4 (channel-first when dim 1 is a channel count
    and the last dim is not; 4 channels are RGBA, composited on white). Values: uint8 0..255, uint16 0..65535, bool,
    other integers within 0..255, or floats within [0, 1] (floats in [-1, 1] are refused rather than guessed at).

    ``.npz`` keys: images under ``images`` or ``x`` (or the only array), labels under ``labels`` or ``y``; or
    ``x_train``/``x_test`` (+ ``y_train``/``y_test``), which give the split. Otherwise the split is ``index_split``.

    ``image_size`` and ``resize`` bring all images to one size (see ``resize_image``; centre crops), ``channels``
    converts 1 <-> 3. ``strict`` and other options of folder sources are accepted so that one set of options fits
    any source; an array file is checked as a whole, so there is nothing to skip and ``strict`` changes nothing.
    The file is read with ``allow_pickle=False``: object arrays are refused, never unpickled.
    """
    if split not in SPLITS:
        raise SourceError(f"unknown split {split!r}; use one of {SPLITS}")
    if resize not in RESIZE_POLICIES:
        raise SourceError(f"unknown resize policy {resize!r}; use one of {RESIZE_POLICIES}")
    if channels not in (None, 1, 3):
        raise SourceError(f"channels must be 1 or 3, got {channels!r}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    images, labels, explicit_split = _read_arrays(path, split)
    images = _as_nhwc(images, path)
    if labels is not None:
        labels = _as_labels(labels, len(images), path)
    # Counted on all rows, so that TRAIN and TEST agree even when a class is missing from one of them.
    num_classes = int(labels.max()) + 1 if labels is not None and len(labels) else None
    if not explicit_split:
        rows = index_split(len(images), split)
        images = images[rows]
        labels = labels[rows] if labels is not None else None
    images = _to_unit_range(images, path)
    images = _convert(images, image_size, channels, resize)
    return ArraySource(images, labels, path.name, split, num_classes=num_classes)


def _read_arrays(path: Path, split: str) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(images, labels or None, whether the file itself gave the split)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None, False
        with loaded:
            return _pick_npz_arrays(loaded, path, split)
    except SourceError:  # already clear; SourceError is a ValueError, so it must pass before the clause below
        raise
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise SourceError(f"{path}: holds Python objects (an object array), which are not loaded because "
                              f"unpickling can run code; save plain numeric arrays instead") from None
        raise SourceError(f"{path}: cannot read ({err})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise SourceError(f"{path}: cannot read ({type(err).__name__}: {err})") from None


def _pick_npz_arrays(npz: np.lib.npyio.NpzFile, path: Path, split: str) -> tuple[np.ndarray, np.ndarray | None, bool]:
    keys = list(npz.keys())
    if "x_train" in keys or "x_test" in keys:
        if f"x_{split}" not in keys:
            raise SourceError(f"{path}: has {'x_train' if split == 'test' else 'x_test'} but no x_{split}")
        labels = npz[f"y_{split}"] if f"y_{split}" in keys else None
        return npz[f"x_{split}"], labels, True
    image_key = next((k for k in IMAGE_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
    if image_key is None:
        raise SourceError(f"{path}: no images found; expected a key among {IMAGE_KEYS} or x_train/x_test, "
                          f"found {keys}")
    label_key = next((k for k in LABEL_KEYS if k in keys), None)
    return npz[image_key], (npz[label_key] if label_key else None), False


def _as_nhwc(images: np.ndarray, path: Path) -> np.ndarray:
    if images.dtype == object:  # cannot come from allow_pickle=False, but a clear message costs nothing
        raise SourceError(f"{path}: holds an object array; save a numeric array")
    if images.ndim == 3:
        return images[..., None]
    if images.ndim != 4:
        raise SourceError(f"{path}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {images.shape}")
    if images.shape[1] in _CHANNEL_COUNTS and images.shape[3] not in _CHANNEL_COUNTS:
        return images.transpose(0, 2, 3, 1)
    if images.shape[3] in _CHANNEL_COUNTS:
        return images
    raise SourceError(f"{path}: cannot find the channel axis of shape {images.shape}; "
                      f"expected {_CHANNEL_COUNTS} channels first or last")


def _as_labels(labels: np.ndarray, count: int, path: Path) -> np.ndarray:
    if labels.ndim == 2 and 1 in labels.shape:  # a column or row vector [N, 1] / [1, N]
        labels = labels.reshape(-1)
    if labels.ndim != 1 or len(labels) != count:
        raise SourceError(f"{path}: labels of shape {labels.shape} do not match {count} images")
    if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)  # whole-number floats are common (e.g. saved from MATLAB)
    if labels.dtype.kind not in "iub":
        raise SourceError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    if len(labels) and labels.min() < 0:
        raise SourceError(f"{path}: labels must be >= 0, found {labels.min()}")
    return labels.astype(np.int64)


def _to_unit_range(images: np.ndarray, path: Path) -> np.ndarray:
    """uint8 stays uint8 (ArraySource scales it, and it is 4x smaller); everything else becomes float32 [0, 1]."""
    kind = images.dtype.kind
    if images.dtype == np.uint8:
        return images
    if images.dtype == np.uint16:
        return images.astype(np.float32) / 65535.0
    if kind == "b":
        return images.astype(np.float32)
    if kind in "iu":
        low, high = (int(images.min()), int(images.max())) if images.size else (0, 0)
        if low < 0 or high > 255:
            raise SourceError(f"{path}: {images.dtype} images with values in [{low}, {high}]; expected 0..255 "
                              f"(or save them as uint16 for 0..65535)")
        return images.astype(np.uint8)
    if kind == "f":
        low, high = (float(np.min(images)), float(np.max(images))) if images.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high)):
            raise SourceError(f"{path}: float images hold NaN or infinite values")
        if low < 0.0 or high > 1.0:
            raise SourceError(f"{path}: float images with values in [{low:g}, {high:g}]; expected [0, 1] "
                              f"(scale them to [0, 1], e.g. (x + 1) / 2 for [-1, 1])")
        return images.astype(np.float32)
    raise SourceError(f"{path}: unsupported image dtype {images.dtype}")


def _convert(images: np.ndarray, image_size, channels: int | None, policy: str) -> np.ndarray:
    """Composite RGBA on white, convert channels and resize; untouched (and uint8 kept) when nothing is asked."""
    if images.shape[-1] == 4:
        rgba = _as_float(images)
        images = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])
    if channels is not None and channels != images.shape[-1]:
        images = to_channels(_as_float(images), channels)
    if image_size is not None:
        images = np.stack([resize_image(image, image_size, policy) for image in _as_float(images)])
    return images


def _as_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images
