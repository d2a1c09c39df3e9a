"""PatchGAN discriminator (pix2pix, as used by VQGAN): one real/fake logit per overlapping image patch.

Layout: a 4x4 stride-2 convolution and LeakyReLU(0.2), then ``num_layers - 1`` more stride-2 convolutions that double
the width (capped at 8x base), one 4x4 stride-1 convolution, and a final 4x4 stride-1 convolution to a single channel.
Every 4x4 convolution uses padding 1, so a stride-2 layer maps a side of n pixels to floor(n / 2) and a stride-1 layer
to n - 1: a side of n pixels gives floor(n / 2**num_layers) - 2 logits, so the image needs at least
3 * 2**num_layers pixels per side.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

NORMS = ("batch", "group", "none", "spectral")
MAX_WIDTH_MULT = 8


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(channels, 32), channels)
    return nn.Identity()  # "none"; "spectral" normalises the convolution weights instead


def _init_weights(module: nn.Module) -> None:
    # N(0, 0.02) convolutions and N(1, 0.02) norm scales, as in pix2pix / taming
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int, base_channels: int = 64, num_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        # a norm layer right after a convolution makes its bias redundant
        conv_bias = norm not in ("batch", "group")

        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        width = base_channels
        for n in range(1, num_layers + 1):
            stride = 2 if n < num_layers else 1  # the last hidden layer keeps the resolution
            out = base_channels * min(2 ** n, MAX_WIDTH_MULT)
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=conv_bias), _norm_layer(norm, out),
                       nn.LeakyReLU(0.2, inplace=True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)
        if norm == "spectral":
            for m in self.main:
                if isinstance(m, nn.Conv2d):
                    spectral_norm(m)

    @property
    def min_input_size(self) -> int:
        """Smallest image side that yields at least one patch logit."""
        return 3 * 2 ** self.num_layers

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Logit grid (h, w) for an image of this size."""
        return tuple(side // 2 ** self.num_layers - 2 for side in (height, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> patch logits [B, 1, h, w]."""
        side = min(x.shape[-2:])
        if side < self.min_input_size:
            fits = int(math.log2(side / 3)) if side >= 6 else 0  # the most layers whose 3 * 2**n fits in side
            advice = f"use num_layers={fits} or fewer" if fits >= 1 else "no num_layers works below 6 pixels"
            raise ValueError(f"images of {x.shape[-2]}x{x.shape[-1]} are too small for a PatchDiscriminator with "
                             f"num_layers={self.num_layers}: it needs at least {self.min_input_size} pixels per "
                             f"side ({advice})")
        return self.main(x)
