"""DCGAN: a plain (optionally class-conditional) GAN, the baseline the tokenizer + prior pipeline is compared with.

Generator: z -> linear -> 4x4 feature map -> stride-2 4x4 transposed convolutions, each doubling the side and halving
the width (BatchNorm and ReLU after the linear layer and between the convolutions; the last one maps to the image
channels) -> tanh. It generates on a "canvas" whose side is the smallest 4 * 2**k that holds the image (28 -> 32,
32 -> 32, 64 -> 64) and centre-crops it to ``image_size``. The class enters through class embeddings projected to
every BatchNorm's per-channel scale and shift (conditional BatchNorm), not by concatenation to z: BatchNorm then
normalises features that only z drives, so z cannot be drowned by the class signal and ignored (concatenation gave
one image per class within a few hundred steps on MNIST).

Discriminator: k stride-2 4x4 convolutions, the width doubling from ``d_channels``, LeakyReLU(0.2) after each, sum
pooling to a feature vector h, and a projection head for the class (Miyato & Koyama, 2018):
logit = linear(h) + <embed(y), h>. Spectral norm on every layer by default (``spectral_norm``). Sum pooling makes it
indifferent to the input side, so it reads the data at its own size (28 -> 14 -> 7 -> 3; no padding to the canvas).

Neither network has a layer at full resolution other than the image itself: on a CPU those layers cost the most.

Images are [-1, 1] inside (the data sources' range); ``DCGAN.sample`` returns [0, 1] like the tokenizer's detokenize.
Saved as config.json + model.safetensors (both networks), like VQModel and TokenPrior.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm as add_spectral_norm

from .pretrained import PretrainedMixin, config_from_dict

CONFIG_VERSION = 1
MAX_WIDTH_MULT = 8  # widths grow by 2x per resolution level up to 8x the base (DCGAN's 64-512 at 64x64)


@dataclass
class DCGANConfig:
    """Everything needed to rebuild a DCGAN. Saved as config.json; ``config_version`` guards future changes."""

    channels: int = 1  # image channels (1 grayscale, 3 RGB)
    image_size: int = 28  # square images of this side (> 4)
    latent_dim: int = 64  # z ~ N(0, I) of this size
    num_classes: int | None = None  # class-conditional when set
    g_channels: int = 64  # generator width at half the canvas side (doubles per level towards 4x4)
    d_channels: int = 64  # discriminator width at half the image side (doubles per level)
    spectral_norm: bool = True  # spectral normalisation of every discriminator layer
    config_version: int = CONFIG_VERSION

    def __post_init__(self):
        problems = []
        if self.channels < 1:
            problems.append(f"channels must be >= 1, got {self.channels}")
        if self.image_size <= 4:
            problems.append(f"image_size must be > 4, got {self.image_size}")
        if self.latent_dim < 1 or self.g_channels < 1 or self.d_channels < 1:
            problems.append("latent_dim, g_channels and d_channels must be >= 1")
        if self.num_classes is not None and self.num_classes < 1:
            problems.append(f"num_classes must be >= 1 or None, got {self.num_classes}")
        if problems:
            raise ValueError("invalid DCGANConfig: " + "; ".join(problems))

    @property
    def levels(self) -> int:
        """k >= 1: the number of 2x resolution steps between 4x4 and the canvas."""
        return math.ceil(math.log2(self.image_size / 4))

    @property
    def canvas_size(self) -> int:
        """Side the generator draws at before the centre crop to ``image_size``."""
        return 4 * 2 ** self.levels

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "DCGANConfig":
        return config_from_dict(cls, d, source, CONFIG_VERSION)


def _init_weights(module: nn.Module) -> None:
    # DCGAN's initialisation: N(0, 0.02) weights, N(1, 0.02) BatchNorm scales
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d) and module.affine:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top = (x.shape[-2] - size) // 2
    left = (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


class ClassBatchNorm(nn.Module):
    """BatchNorm2d whose per-channel scale and shift are looked up by class (conditional BatchNorm); a plain
    BatchNorm2d when there are no classes."""

    def __init__(self, channels: int, num_classes: int | None):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=num_classes is None)
        self.scale = self.shift = None
        if num_classes:
            self.scale, self.shift = nn.Embedding(num_classes, channels), nn.Embedding(num_classes, channels)
            nn.init.ones_(self.scale.weight)
            # Random shifts: classes differ from the first step. Zero shifts (the identity) left the generator
            # nearly unconditional for hundreds of steps, since Adam moves them by about lr per step.
            nn.init.normal_(self.shift.weight, 0.0, 1.0)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = self.norm(x)
        if self.scale is None:
            return x
        return x * self.scale(labels)[:, :, None, None] + self.shift(labels)[:, :, None, None]


class Generator(nn.Module):
    """(z [B, latent_dim], labels [B] or None) -> images [B, C, image_size, image_size] in [-1, 1]."""

    def __init__(self, config: DCGANConfig):
        super().__init__()
        c = config
        self.config = c
        k = c.levels
        widths = [c.g_channels * min(2 ** (k - 1 - i), MAX_WIDTH_MULT) for i in range(k)]  # 4x4 ... canvas / 2
        # no biases before BatchNorm: its shift makes them redundant
        self.project = nn.Linear(c.latent_dim, widths[0] * 16, bias=False)
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False)
                                      for cin, cout in zip(widths, widths[1:]))
        self.norms = nn.ModuleList(ClassBatchNorm(w, c.num_classes) for w in widths)
        self.to_image = nn.ConvTranspose2d(widths[-1], c.channels, 4, stride=2, padding=1)
        self.apply(_init_weights)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.norms[0](self.project(z).view(len(z), -1, 4, 4), labels))
        for upsample, norm in zip(self.upsample, self.norms[1:]):
            h = F.relu(norm(upsample(h), labels))
        return centre_crop(torch.tanh(self.to_image(h)), self.config.image_size)


class Discriminator(nn.Module):
    """(images [B, C, H, W] in [-1, 1], labels [B] or None) -> logits [B] (projection head for the class)."""

    def __init__(self, config: DCGANConfig):
        super().__init__()
        c = config
        widths = [c.channels] + [c.d_channels * min(2 ** i, MAX_WIDTH_MULT) for i in range(c.levels)]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(widths[-1], 1)
        self.class_embedding = nn.Embedding(c.num_classes, widths[-1]) if c.num_classes else None
        self.apply(_init_weights)
        if c.spectral_norm:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    add_spectral_norm(m)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(images).sum(dim=(2, 3))
        logits = self.linear(h).squeeze(1)
        if self.class_embedding is not None:
            logits = logits + (self.class_embedding(labels) * h).sum(dim=1)
        return logits


class DCGAN(PretrainedMixin, nn.Module):
    """Generator and discriminator of one GAN, saved and loaded together (config.json + model.safetensors)."""

    MODEL_TYPE = "vqkit.DCGAN"
    CONFIG_CLASS = DCGANConfig

    def __init__(self, config: DCGANConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = DCGANConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)

    @property
    def device(self) -> torch.device:
        return self.generator.to_image.weight.device

    def _class_ids(self, labels, n: int, generator: torch.Generator | None) -> torch.Tensor | None:
        """Labels as int64 [n] on the model's device: given (an int or n ints), or drawn uniformly when None."""
        classes = self.config.num_classes
        if classes is None:
            if labels is not None:
                raise ValueError("class labels given to an unconditional GAN (num_classes is not set)")
            return None
        if labels is None:
            return torch.randint(classes, (n,), generator=generator, device=self.device)
        ids = torch.as_tensor(labels)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() > 1:
            raise ValueError(f"class labels must be an int or a 1-D sequence of ints, got {labels!r}")
        ids = ids.long().expand(n) if ids.dim() == 0 else ids.long()
        if len(ids) != n:
            raise ValueError(f"got {len(ids)} class labels for {n} samples")
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= classes):
            raise ValueError(f"class labels must be in [0, {classes}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return ids.to(self.device)

    @torch.no_grad()
    def sample(self, n: int, labels=None, *, seed: int | None = None, batch_size: int = 64) -> torch.Tensor:
        """``n`` images [n, C, H, W] in [0, 1], on the CPU (as ``apps.generate.decode_samples`` gives a prior's).

        ``labels``: for a class-conditional GAN, one int for all samples, n ints, or None to draw the classes
        uniformly. ``seed``: the same seed gives the same samples (on the same device); None draws from torch's
        global generator. All noise is drawn before the batches are generated.
        """
        if n < 1 or batch_size < 1:
            raise ValueError(f"n and batch_size must be >= 1, got {n}, {batch_size}")
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=self.device)
        class_ids = self._class_ids(labels, n, generator)
        images = []
        with self._eval_mode():
            for rows in torch.arange(n, device=self.device).split(batch_size):
                batch = self.generator(z[rows], None if class_ids is None else class_ids[rows])
                images.append(((batch.float() + 1) / 2).clamp(0, 1).cpu())
        return torch.cat(images)

    def num_parameters(self, part: str | None = None) -> int:
        """Parameters of both networks, or of ``part`` ("generator" or "discriminator")."""
        if part not in (None, "generator", "discriminator"):
            raise ValueError(f"part must be None, 'generator' or 'discriminator', got {part!r}")
        module = self if part is None else getattr(self, part)
        return sum(p.numel() for p in module.parameters())
