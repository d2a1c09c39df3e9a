"""The standard FID's feature network: Inception-v3 as the 2015-12-05 TensorFlow graph of Heusel et al. (TTUR).

FID means a Frechet distance over *these* 2048 pool features, so this is the one score vqkit names ``fid_inception``;
every other FD carries the name of its own network (``fd_classifier``, ``fd_effnet_lite0``). The network is written
here in plain torch (no torchvision) and takes its weights from the file the PyTorch FID tools use,
``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid; torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
is the same file). vqkit never downloads it: ``find_inception_weights`` looks in the usual caches and says where
to put it when it is missing.

The graph differs from torchvision's ImageNet Inception-v3 in three places, all kept here: the average pools inside
the blocks ignore padding (``count_include_pad=False``), the last block pools with a max instead of an average, and the
classifier has 1008 outputs. Images are prepared as the reference does: quantised to 8 bits (as saved PNGs would be),
resized to 299x299 with TensorFlow 1's bilinear resize (no half-pixel offset), then scaled to [-1, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io import VQKitFileError

INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILES[0]
INPUT_SIZE = 299


class InceptionWeightsMissing(FileNotFoundError):
    """The FID Inception weights are not on this machine; the message says where vqkit looked and where to put them."""


# ------------------------------------------------------------------------------------------------------------ network


class ConvBN(nn.Sequential):
    """Convolution without bias, BatchNorm (TensorFlow's eps), ReLU: the graph's only layer type."""

    def __init__(self, in_channels: int, out_channels: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """The blocks' 3x3 average pool; the FID graph averages over the pixels inside the image only."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # "Mixed_5b/c/d": 35x35 grid
    def __init__(self, in_channels: int, pool_channels: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(pool_3x3(x))], 1)


class ReductionB(nn.Module):  # "Mixed_6a": 35x35 -> 17x17
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):  # "Mixed_6b/c/d/e": 17x17 grid, factorised 7x7 convolutions
    def __init__(self, in_channels: int, mid: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, mid, 1)
        self.branch7x7_2 = ConvBN(mid, mid, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(mid, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, mid, 1)
        self.branch7x7dbl_2 = ConvBN(mid, mid, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(mid, mid, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(mid, mid, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(mid, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = x
        for i in range(1, 6):
            double = getattr(self, f"branch7x7dbl_{i}")(double)
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          double,
                          self.branch_pool(pool_3x3(x))], 1)


class ReductionD(nn.Module):  # "Mixed_7a": 17x17 -> 8x8
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):  # "Mixed_7b/c": 8x8 grid, split 1x3 / 3x1 branches
    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the graph's last block pools with a max (a quirk of the 2015 release)
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else pool_3x3(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(single), self.branch3x3_2b(single),
                          self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
                          self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID reference, up to its 2048 global-average-pooled features. Parameter names follow the
    weight file (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ..., ``fc.weight``), so it
    loads as it is; ``fc`` is kept only so that the whole file loads strictly (a wrong file fails loudly)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, 299, 299] in [-1, 1] -> pool features [B, 2048]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


# -------------------------------------------------------------------------------------------------- preprocessing


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1's ``resize_bilinear`` (align_corners=False) does it, which is what the FID
    reference fed its graph: output pixel i samples input position i * in/out, with no half-pixel offset (torch's
    ``interpolate`` centres pixels, a shift of up to half an input pixel)."""

    def weights(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, dtype=torch.float64) * (n_in / size)
        low = pos.floor().long().clamp(max=n_in - 1)
        return low, (low + 1).clamp(max=n_in - 1), (pos - low).to(x.dtype)

    h, w = x.shape[-2:]
    y0, y1, fy = weights(h)
    x0, x1, fx = weights(w)
    fy, fx = fy.to(x.device)[:, None], fx.to(x.device)
    rows = x[..., y0, :] * (1 - fy) + x[..., y1, :] * fy
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


# --------------------------------------------------------------------------------------------------------- weights


def inception_weight_candidates() -> list[Path]:
    """Where vqkit looks for the FID Inception weights: ``$VQKIT_INCEPTION_WEIGHTS``, vqkit's weight folders
    (``$VQKIT_HOME``, ``~/.cache/vqkit``) and torch hub's checkpoint folder (where pytorch-fid and torch-fidelity keep
    them), each under both file names."""
    from ..losses.perceptual import vqkit_weight_dirs

    torch_home = Path(os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                     / "torch")).expanduser()
    env = os.environ.get("VQKIT_INCEPTION_WEIGHTS")
    folders = [*vqkit_weight_dirs(), torch_home / "hub" / "checkpoints"]
    return ([Path(env).expanduser()] if env else []) + [folder / name for folder in folders for name in INCEPTION_FILES]


def find_inception_weights(weights: str | os.PathLike | None = None) -> Path:
    """The weight file: ``weights`` if given (it must exist), else the first of ``inception_weight_candidates``."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InceptionWeightsMissing(f"{path}: no such file (the FID Inception weights, {INCEPTION_FILES[0]})")
        return path
    from ..losses.perceptual import first_existing

    candidates = inception_weight_candidates()
    found = first_existing(candidates)
    if found is None:
        looked = "\n".join(f"    {path}" for path in candidates)
        raise InceptionWeightsMissing(
            f"the FID Inception weights ({INCEPTION_FILES[0]}, 91 MB) are not on this machine, and vqkit never "
            f"downloads them. Fetch them where there is internet:\n    {INCEPTION_URL}\nthen put the file in "
            f"~/.cache/vqkit/ (or pass its path with --inception-weights, or set VQKIT_INCEPTION_WEIGHTS). "
            f"Looked in:\n{looked}")
    return found


def load_fid_inception(weights: str | os.PathLike | None = None) -> FIDInceptionV3:
    """The network with the reference weights (read with ``weights_only=True``); a file that is not this network's
    weights is refused with its name and what is wrong."""
    from ..losses.perceptual import load_state_dict_file

    path = find_inception_weights(weights)
    network = FIDInceptionV3()
    state = load_state_dict_file(path)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        details = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                            for what, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", wrong)) if keys)
        raise VQKitFileError(f"{path}: not the FID Inception-v3 weights ({INCEPTION_FILES[0]}): {details}")
    network.load_state_dict(state)
    return network.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------- extractor


class InceptionFeatures:
    """FID's features [N, 2048] of images in [-1, 1] (1 or 3 channels; grayscale is repeated to RGB), for
    ``fd_between`` and the other feature-distance helpers. ``metric_name`` is ``fid_inception``."""

    metric_name = "fid_inception"

    def __init__(self, device: str | torch.device | None = None, weights: str | os.PathLike | None = None,
                 network: FIDInceptionV3 | None = None):
        # a GPU when there is one: 5000 images at 299x299 take minutes on a CPU
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.network = (network if network is not None else load_fid_inception(weights)).to(device)
        self.name = "inception_v3_fid"

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the network's input: 8-bit values (as a PNG stores them), TF1 bilinear to 299x299,
        then (v - 128) / 128 as in the reference graph."""
        from ..losses.perceptual import to_rgb

        values = ((x.float().clamp(-1, 1) + 1) * 127.5).round()
        return (resize_bilinear_tf1(to_rgb(values), INPUT_SIZE) - 128) / 128

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 50, progress: bool = False,
                 desc: str = "FID features") -> torch.Tensor:
        from tqdm.auto import tqdm

        chunks = tqdm(x.split(batch_size), desc=desc, disable=not progress, leave=False)
        return torch.cat([self.network(self.prepare(chunk.to(self.device))).cpu() for chunk in chunks])


def fid_scores(extractor: InceptionFeatures, images: torch.Tensor, test_images: torch.Tensor,
               train_images: torch.Tensor | None = None, progress: bool = False) -> dict:
    """``fid_inception`` of ``images`` against ``test_images`` (all [-1, 1]); with ``train_images`` also
    ``fid_inception_floor``: FID(TRAIN, TEST) with as many TRAIN images as ``images`` holds (FID's bias depends on the
    number of images, so the floor must be taken at the same size; mean over random subsets when fewer)."""
    from .classifier import fd_floor_of_features
    from .fd import frechet_distance

    feats = extractor.features(images, progress=progress, desc="FID features")
    test = extractor.features(test_images, progress=progress, desc="FID features (TEST)")
    result = {"fid_inception": frechet_distance(feats, test), "fid_feature_network": extractor.name}
    if train_images is not None:
        train = extractor.features(train_images, progress=progress, desc="FID features (TRAIN)")
        result["fid_inception_floor"] = fd_floor_of_features(train, test, n=len(images))
    return result
