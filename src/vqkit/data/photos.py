"""Real colour photos shipped inside scikit-image, as random crops: a small natural-image set that works offline."""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from .images import to_channels
from .sources import NAMED_SOURCES, SPLITS, ImageSource, SourceError

# skimage.data functions whose files ship inside the scikit-image package (no download needed). Left out: the
# grayscale images, synthetic ones (colorwheel, logo), "cat" (the same photo as "chelsea") and the right view of
# stereo_motorcycle (nearly the left one).
TRAIN_PHOTOS = ("astronaut", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle")
TEST_PHOTOS = ("coffee", "rocket")
# Larger photos are shrunk to this shorter side first, so that a crop covers a comparable share of every photo.
MAX_SHORT_SIDE = 512
# TEST photos are downscaled until they hold at most this many non-overlapping crops.
MAX_TEST_CROPS_PER_PHOTO = 16


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """The named skimage.data photo as uint8 [H, W, 3], its shorter side at most MAX_SHORT_SIDE."""
    import skimage.data

    try:
        photo = getattr(skimage.data, name)()
    except Exception as err:  # noqa: BLE001 - skimage raises fetch errors of several kinds
        raise SourceError(f"photos: cannot load skimage.data.{name} ({type(err).__name__}: {err})") from None
    if isinstance(photo, tuple):  # stereo_motorcycle: (left, right, disparity)
        photo = photo[0]
    photo = np.asarray(photo)[..., :3]
    scale = MAX_SHORT_SIDE / min(photo.shape[:2])
    return _resize_uint8(photo, round(photo.shape[0] * scale), round(photo.shape[1] * scale)) if scale < 1 else photo


def _resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    shrinking = height * width < image.shape[0] * image.shape[1]
    method = Image.LANCZOS if shrinking else Image.BICUBIC
    return np.asarray(Image.fromarray(image).resize((width, height), method))


class PhotoSource(ImageSource):
    """Crops of real photos from ``skimage.data`` (RGB, unlabelled).

    TRAIN: the photos TRAIN_PHOTOS (astronaut, chelsea, hubble_deep_field, immunohistochemistry, retina,
    stereo_motorcycle). Item i is a crop of photo ``i % 6``: a random square of side ``crop_size / s`` with
    ``s ~ U(min_scale, 1)``, resized to ``crop_size``, so that crops see the photos at several scales. ``get(i, rng)``
    draws it from ``rng``; ``source[i]`` draws it from a generator seeded by ``i`` (a fixed, varied view). The
    length is photos x ``crops_per_photo``.

    TEST: the held-out photos TEST_PHOTOS (coffee, rocket), downscaled until each holds at most 16
    non-overlapping ``crop_size`` tiles, cut into all those tiles: a fixed set, the same for every call.

    Options: ``crop_size`` (``image_size`` is an alias), ``crops_per_photo``, ``min_scale`` (1: no rescaling),
    ``channels`` (3; 1 gives grayscale photos).
    """

    def __init__(self, split: str = "train", crop_size: int = 64, crops_per_photo: int = 64, min_scale: float = 0.5,
                 channels: int = 3, image_size: int | None = None):
        if split not in SPLITS:
            raise SourceError(f"unknown split {split!r}; use one of {SPLITS}")
        crop_size = int(image_size if image_size is not None else crop_size)
        if crop_size < 1 or crops_per_photo < 1 or not 0 < min_scale <= 1 or channels not in (1, 3):
            raise SourceError(f"photos: need crop_size >= 1, crops_per_photo >= 1, 0 < min_scale <= 1 and "
                              f"channels 1 or 3; got {crop_size}, {crops_per_photo}, {min_scale}, {channels}")
        self.name, self.split, self.channels = "photos", split, channels
        self.image_size = (crop_size, crop_size)
        self.crop_size, self.crops_per_photo, self.min_scale = crop_size, crops_per_photo, min_scale
        self.photo_names = TRAIN_PHOTOS if split == "train" else TEST_PHOTOS
        self.photos = [load_photo(name) for name in self.photo_names]
        self.test_tiles = np.concatenate([self._tiles(photo) for photo in self.photos]) if split == "test" else None

    def __len__(self) -> int:
        if self.test_tiles is not None:
            return len(self.test_tiles)
        return len(self.photos) * self.crops_per_photo

    def get(self, index: int, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} photo crops")
        if self.test_tiles is not None:
            crop = self.test_tiles[index]
        else:
            # Without rng, a generator seeded by the index: the same "random" view of item i every time.
            view_rng = rng if rng is not None else np.random.default_rng(index)
            crop = self._random_crop(self.photos[index % len(self.photos)], view_rng)
        image = to_channels(crop.astype(np.float32) / 255.0, self.channels)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).mul_(2.0).sub_(1.0), -1

    def _random_crop(self, photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # Cropping a crop_size/s square and shrinking it by s equals cropping a photo shrunk by s, at a fraction
        # of the cost. The square is capped by the photo, which upscales it when crop_size exceeds the photo.
        scale = rng.uniform(self.min_scale, 1.0)
        side = min(round(self.crop_size / scale), *photo.shape[:2])
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        return _resize_uint8(photo[top:top + side, left:left + side], self.crop_size, self.crop_size)

    def _tiles(self, photo: np.ndarray) -> np.ndarray:
        """The non-overlapping crop_size tiles of ``photo`` rescaled (see the class doc), centred on it."""
        size = self.crop_size
        height, width = photo.shape[:2]
        # Down to at most MAX_TEST_CROPS_PER_PHOTO tiles; up when the photo is smaller than one tile.
        scale = min(1.0, np.sqrt(MAX_TEST_CROPS_PER_PHOTO * size * size / (height * width)))
        scale = max(scale, size / min(height, width))
        scaled = _resize_uint8(photo, max(size, round(height * scale)), max(size, round(width * scale)))
        rows, cols = scaled.shape[0] // size, scaled.shape[1] // size
        top, left = (scaled.shape[0] - rows * size) // 2, (scaled.shape[1] - cols * size) // 2
        return np.stack([scaled[top + r * size:top + (r + 1) * size, left + c * size:left + (c + 1) * size]
                         for r in range(rows) for c in range(cols)])


NAMED_SOURCES["photos"] = PhotoSource
