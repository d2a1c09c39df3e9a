"""VQModel: encoder -> vector quantizer -> decoder, with a versioned config and save/load as config.json +
model.safetensors (the diffusers convention).

Public contract (DESIGN.md): ``tokenize`` takes float [B,C,H,W] in [0,1] and returns int64 [B,h,w]; ``detokenize``
returns float [B,C,H,W] in [0,1]. Images whose size is not a multiple of the downsampling factor are padded inside and
cropped back. Internally images are in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quantizers import QuantizerOutput, VectorQuantizer
from .autoencoder import Decoder, Encoder
from .pretrained import CONFIG_NAME, WEIGHTS_NAME, PretrainedMixin, config_from_dict  # noqa: F401 (re-exported)

CONFIG_VERSION = 1


@dataclass
class VQModelConfig:
    """Everything needed to rebuild a VQModel. Saved as config.json; ``config_version`` guards future changes."""

    in_channels: int = 1
    out_channels: int | None = None  # defaults to in_channels
    image_size: int = 28  # training resolution; detokenize crops a grid of that size back to it
    base_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    attn_levels: list[int] = field(default_factory=list)
    mid_attention: bool = True
    z_channels: int = 64
    embed_dim: int = 64
    dropout: float = 0.0
    norm_groups: int = 32
    # quantizer
    codebook_size: int = 512
    codebook_dim: int | None = None  # < embed_dim: factorised low-dimensional codes
    beta: float = 0.25
    use_ema: bool = True
    ema_decay: float = 0.99
    kmeans_init: bool = True
    dead_code_window: int = 200
    cosine: bool = False
    config_version: int = CONFIG_VERSION

    def __post_init__(self):
        if self.out_channels is None:
            self.out_channels = self.in_channels
        self.channel_mult = list(self.channel_mult)
        self.attn_levels = list(self.attn_levels)
        if not self.channel_mult:
            raise ValueError("channel_mult must have at least one level")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def token_grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Token grid (h, w) for an image of the given size (default: image_size square)."""
        height = height or self.image_size
        width = width or self.image_size
        f = self.downsample_factor
        return math.ceil(height / f), math.ceil(width / f)

    def bits_per_image(self, height: int | None = None, width: int | None = None) -> float:
        h, w = self.token_grid(height, width)
        return h * w * math.log2(self.codebook_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "VQModelConfig":
        return config_from_dict(cls, d, source, CONFIG_VERSION)


@dataclass
class VQOutput:
    reconstruction: torch.Tensor  # [-1, 1] space, same size as the input
    indices: torch.Tensor  # [B, h, w]
    quantizer_loss: torch.Tensor
    stats: dict


class VQModel(PretrainedMixin, nn.Module):
    MODEL_TYPE = "vqkit.VQModel"

    def __init__(self, config: VQModelConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = VQModelConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        self.config = config
        c = config
        arch = dict(ch=c.base_channels, ch_mult=c.channel_mult, num_res_blocks=c.num_res_blocks,
                    z_channels=c.z_channels, attn_levels=c.attn_levels, mid_attention=c.mid_attention,
                    dropout=c.dropout, groups=c.norm_groups)
        self.encoder = Encoder(c.in_channels, **arch)
        self.decoder = Decoder(c.out_channels, **arch)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        self.quantize = VectorQuantizer(
            c.embed_dim, c.codebook_size, codebook_dim=c.codebook_dim, beta=c.beta, use_ema=c.use_ema,
            ema_decay=c.ema_decay, kmeans_init=c.kmeans_init, dead_code_window=c.dead_code_window, cosine=c.cosine)
        # token grid (h, w) -> image size (H, W) of the last images tokenized with that grid, so that detokenize
        # can crop the padding back off images whose size is not a multiple of the downsampling factor
        self._tokenized_sizes: dict[tuple[int, int], tuple[int, int]] = {}

    # ---------------------------------------------------------------------------------------------------- internals
    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        f = self.downsample_factor
        ph, pw = (-x.shape[-2]) % f, (-x.shape[-1]) % f
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x

    def _check_images(self, x: torch.Tensor) -> None:
        if not torch.is_tensor(x) or x.dim() != 4:
            raise ValueError(f"expected images as a float tensor [B, C, H, W], got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"this tokenizer takes {self.config.in_channels}-channel images, got {x.shape[1]} channels")
        if not x.is_floating_point():
            raise ValueError(f"images must be floating point in [0, 1], got {x.dtype}")

    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        """x in [-1, 1], any size -> quantizer output on the padded grid."""
        h = self.quant_conv(self.encoder(self._pad(x)))
        return self.quantize(h)

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized features [B, D, h, w] -> images in [-1, 1] of size (h*f, w*f)."""
        return self.decoder(self.post_quant_conv(quantized))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x: torch.Tensor) -> VQOutput:
        q = self.encode(x)
        rec = self.decode(q.quantized)[..., : x.shape[-2], : x.shape[-1]]
        return VQOutput(rec, q.indices, q.loss, q.stats)

    # ---------------------------------------------------------------------------------------------- public contract
    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Images float [B,C,H,W] in [0,1] -> token grid int64 [B,h,w]. Never updates the codebook."""
        self._check_images(x)
        with self._eval_mode():
            x = x.to(self.quant_conv.weight.device, torch.float32)
            indices = self.encode(x.clamp(0, 1) * 2 - 1).indices
        self._tokenized_sizes[tuple(indices.shape[-2:])] = tuple(x.shape[-2:])
        return indices

    @torch.no_grad()
    def detokenize(self, indices: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Token grid int [B,h,w] -> images float [B,C,H,W] in [0,1].

        ``size`` crops to (H, W). Without it the padding that ``tokenize`` added is cropped off: the size of the last
        images tokenized into a grid of this shape, else ``config.image_size`` when the grid matches it, else the
        full (h*f, w*f).
        """
        if not torch.is_tensor(indices) or indices.dim() != 3:
            raise ValueError(f"expected a token grid [B, h, w], got "
                             f"{tuple(indices.shape) if torch.is_tensor(indices) else type(indices).__name__}")
        with self._eval_mode():
            y = self.decode_indices(indices.to(self.quant_conv.weight.device))
        grid = tuple(indices.shape[-2:])
        if size is None:
            size = self._tokenized_sizes.get(grid)
        if size is None and grid == self.config.token_grid():
            size = (self.config.image_size, self.config.image_size)
        if size is not None:
            y = y[..., : size[0], : size[1]]
        return ((y.float() + 1) / 2).clamp(0, 1)


VQModel.CONFIG_CLASS = VQModelConfig
