"""A folder of image files as an ImageSource."""

from __future__ import annotations

import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import RESIZE_POLICIES, crop_to_size, read_image, scale_for_policy, to_channels
from .sources import SPLITS, ImageSource, SourceError

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
# Above this many files in a split, files are verified when first used instead of all at construction.
LAZY_VERIFY_ABOVE = 2000
# Decoded images are kept in memory (uint8) until they take this much.
CACHE_LIMIT_BYTES = 1 << 30
_EXIF_ORIENTATION = 274
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # rotated by 90 degrees: width and height trade places
_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


class FolderSource(ImageSource):
    """The images under ``root`` (recursively; extensions in IMAGE_EXTENSIONS, any case; files and folders whose
    name starts with "." are skipped), sorted by relative path.

    Split: if ``root`` has subfolders ``train`` and ``test`` (or ``val``), they are the splits. Otherwise a file is
    TEST when ``zlib.crc32(relative_path) % 10 == 0`` (its path relative to ``root``, "/"-separated), so the split
    of a file never changes when others are added or removed. When that leaves TEST empty although there are two or
    more files, the last file (in sorted order) is TEST, so that both splits exist.

    Labels: with ``labels=True`` and every image inside a first-level subfolder (below train/test when present), the
    sorted subfolder names are the classes (``class_names``), as in torchvision's ImageFolder.

    Options: ``image_size`` (int or (height, width); None: the size all images share, an error if they differ),
    ``channels`` (1 or 3; None: 3 if any image is colour, else 1), ``resize`` (the policy of
    ``vqkit.data.images.resize_image`` that brings images to ``image_size``), ``strict`` (an unreadable file is an
    error instead of a warning and a skip).

    Unreadable files are found at construction by decoding every file, except for splits of more than
    LAZY_VERIFY_ABOVE files: those are checked when first used, and a bad file is then replaced by the next readable
    one (index + 1, + 2, ... wrapping around), so ``len()`` still counts it.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int | tuple[int, int] | None = None,
                 channels: int | None = None, resize: str = "resize", strict: bool = False, labels: bool = True):
        if split not in SPLITS:
            raise SourceError(f"unknown split {split!r}; use one of {SPLITS}")
        if resize not in RESIZE_POLICIES:
            raise SourceError(f"unknown resize policy {resize!r}; use one of {RESIZE_POLICIES}")
        if channels not in (None, 1, 3):
            raise SourceError(f"channels must be 1 or 3, got {channels!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: not a folder")
        self.name, self.split, self.policy, self.strict = self.root.name or str(self.root), split, resize, strict

        files_by_split = _split_files(self.root)
        all_files = files_by_split["train"] + files_by_split["test"]
        self.class_names = _class_names(all_files) if labels else None
        self.num_classes = len(self.class_names) if self.class_names else None
        self.image_size, self.channels = self._choose_size_and_channels(all_files, image_size, channels)

        split_files = files_by_split[split]
        if not split_files:
            raise SourceError(f"{self.root}: no images in the {split} split ({len(all_files)} in all)")
        self.files = [path for path, _ in split_files]
        self.labels = None
        if self.class_names:
            self.labels = [self.class_names.index(rel.split("/")[0]) for _, rel in split_files]
        self._cache: dict[int, np.ndarray] = {}
        self._cache_bytes = 0
        self._bad: set[int] = set()
        if len(self.files) <= LAZY_VERIFY_ABOVE:
            self._load_all_dropping_bad()
        self.captions = self._read_captions()

    def _choose_size_and_channels(self, files: list[tuple[Path, str]], image_size, channels
                                  ) -> tuple[tuple[int, int], int]:
        if isinstance(image_size, (int, np.integer)):
            image_size = (int(image_size), int(image_size))
        if image_size is not None and channels is not None:
            return tuple(image_size), channels
        # Headers only (no decoding): cheap, and both splits must agree on size and channels.
        probes = {path: probe for path, _ in files if (probe := _probe(path)) is not None}
        if not probes:
            raise SourceError(f"{self.root}: no readable images (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})")
        if image_size is None:
            image_size = self._common_size(probes)
        if channels is None:
            channels = 3 if any(colour for _, colour in probes.values()) else 1
        return tuple(image_size), channels

    def _common_size(self, probes: dict[Path, tuple[tuple[int, int], bool]]) -> tuple[int, int]:
        (first, (first_size, _)), *others = probes.items()
        for path, (size, _) in others:
            if size != first_size:
                raise SourceError(
                    f"{self.root}: images have different sizes ({first.name} is {first_size[0]}x{first_size[1]}, "
                    f"{path.name} is {size[0]}x{size[1]}); pass image_size=N to bring them all to NxN "
                    f"(resize policy {self.policy!r})")
        return first_size

    def _read_captions(self) -> list[str] | None:
        """Captions of this split's images from a captions.jsonl / captions.csv in the folder (paths relative to
        it), or None when there is no such file. Images without a caption get "" (unconditional), with a warning."""
        from .shapes import read_captions

        if not any((self.root / name).is_file() for name in ("captions.jsonl", "captions.csv")):
            return None
        table = read_captions(self.root)
        relative = [path.relative_to(self.root).as_posix() for path in self.files]
        missing = [r for r in relative if r not in table]
        if missing:
            warnings.warn(f"{self.root}: {len(missing)} of {len(relative)} {self.split} images have no caption "
                          f"(e.g. {missing[0]}); they train as unconditional")
        return [table.get(r, "") for r in relative]

    def _load_all_dropping_bad(self) -> None:
        """Decode every file once: drops (or with strict, reports) unreadable ones, and fills the cache."""
        kept_files, kept_labels = [], []
        for k, path in enumerate(self.files):
            try:
                image = self._load(path)
            except SourceError as err:
                self._reject(err)
                continue
            self._remember(len(kept_files), image)
            kept_files.append(path)
            if self.labels is not None:
                kept_labels.append(self.labels[k])
        if not kept_files:
            unreadable = ", ".join(path.name for path in self.files[:3]) + (", ..." if len(self.files) > 3 else "")
            hint = ("; with no train/ and test/ subfolders about one file in ten is TEST, chosen by its path"
                    if self.split == "test" else "")
            raise SourceError(f"{self.root}: no readable images in the {self.split} split: its {len(self.files)} "
                              f"file(s) ({unreadable}) could not be read{hint}")
        self.files = kept_files
        self.labels = kept_labels if self.labels is not None else None

    def _load(self, path: Path) -> np.ndarray:
        """The file as uint8 [h, w, C], scaled by the resize policy but not yet cropped (so that ``get`` can draw
        a random crop from it)."""
        image = to_channels(read_image(path), self.channels)
        scaled = scale_for_policy(image, self.image_size, self.policy)
        return np.round(scaled * 255.0).astype(np.uint8)

    def _reject(self, err: SourceError) -> None:
        if self.strict:
            raise err
        warnings.warn(f"skipping unreadable image {err}", stacklevel=3)

    def _remember(self, index: int, image: np.ndarray) -> None:
        if self._cache_bytes + image.nbytes <= CACHE_LIMIT_BYTES:
            self._cache[index] = image
            self._cache_bytes += image.nbytes

    def _image_at(self, index: int) -> tuple[np.ndarray, int]:
        """Image ``index``, or the next readable one when it cannot be read (see the class doc)."""
        n = len(self.files)
        for k in ((index + step) % n for step in range(n)):
            if k in self._bad:
                continue
            image = self._cache.get(k)
            if image is None:
                try:
                    image = self._load(self.files[k])
                except SourceError as err:
                    self._reject(err)
                    self._bad.add(k)
                    continue
                self._remember(k, image)
            return image, (self.labels[k] if self.labels is not None else -1)
        raise SourceError(f"{self.root}: no readable images in the {self.split} split")

    def __len__(self) -> int:
        return len(self.files)

    def get(self, index: int, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Image ``index`` in [-1, 1]; with ``rng`` and policy resize/crop a random crop, else the centre crop."""
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for {len(self.files)} images")
        image, label = self._image_at(index)
        crop_rng = rng if self.policy in ("resize", "crop") else None
        patch = crop_to_size(image, self.image_size, crop_rng)
        tensor = torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)
        return tensor, label


def _list_images(folder: Path) -> list[tuple[Path, str]]:
    """(path, path relative to ``folder`` with "/" separators) of the image files below ``folder``, sorted."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        # Hidden entries are editor, OS or VCS leftovers (e.g. macOS "._x.png"), not images.
        hidden = any(part.startswith(".") for part in rel.split("/"))
        if path.suffix.lower() in IMAGE_EXTENSIONS and not hidden and path.is_file():
            found.append((path, rel))
    return sorted(found, key=lambda item: item[1])


def _split_files(root: Path) -> dict[str, list[tuple[Path, str]]]:
    train_dir, test_dir = root / "train", root / "test"
    if not test_dir.is_dir():
        test_dir = root / "val"
    if train_dir.is_dir() and test_dir.is_dir():
        by_split = {"train": _list_images(train_dir), "test": _list_images(test_dir)}
    else:
        by_split = _hash_split(_list_images(root))
    if not by_split["train"] and not by_split["test"]:
        raise SourceError(f"{root}: no images found (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return by_split


def _hash_split(files: list[tuple[Path, str]]) -> dict[str, list[tuple[Path, str]]]:
    is_test = [zlib.crc32(rel.encode("utf-8")) % 10 == 0 for _, rel in files]
    if not any(is_test) and len(files) >= 2:
        is_test[-1] = True
    return {"train": [f for f, test in zip(files, is_test) if not test],
            "test": [f for f, test in zip(files, is_test) if test]}


def _class_names(files: list[tuple[Path, str]]) -> list[str] | None:
    """The sorted first-level folder names when every file sits in one, else None (unlabelled)."""
    if not files or any("/" not in rel for _, rel in files):
        return None
    return sorted({rel.split("/")[0] for _, rel in files})


def _probe(path: Path) -> tuple[tuple[int, int], bool] | None:
    """((height, width), is_colour) from the file's header, or None when it cannot be opened."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION) in _SWAPPED_ORIENTATIONS:
                width, height = height, width
            return (height, width), _is_colour(img)
    except Exception:  # noqa: BLE001 - any failure means "unreadable"; it is reported when the file is loaded
        return None


def _is_colour(img: Image.Image) -> bool:
    if img.mode == "P":
        palette = np.asarray(img.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
        return bool((palette != palette[:, :1]).any())
    return img.mode not in _GRAY_MODES
