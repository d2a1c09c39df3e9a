"""Convolutional encoder and decoder (the VQGAN / latent-diffusion layout, written top to bottom).

Encoder: conv_in -> per level: residual blocks (+ attention at chosen levels), then a stride-2 downsample except at the
last level -> mid (block, attention, block) -> norm, SiLU, conv_out to z_channels.  The decoder mirrors it.
The downsampling factor is 2 ** (len(channel_mult) - 1).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm


class Encoder(nn.Module):
    def __init__(self, in_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 attn_levels: Sequence[int] = (), mid_attention: bool = True, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.num_levels = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.num_levels):
            block_in, block_out = ch * in_mult[level], ch * ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, dropout, groups))
                block_in = block_out
                if level in attn_levels:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != self.num_levels - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, groups)
        self.mid.attn_1 = AttnBlock(block_in, groups) if mid_attention else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, groups)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != self.num_levels - 1:
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, out_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 attn_levels: Sequence[int] = (), mid_attention: bool = True, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.num_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, groups)
        self.mid.attn_1 = AttnBlock(block_in, groups) if mid_attention else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, groups)
        up = []
        for level in reversed(range(self.num_levels)):
            block_out = ch * ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, dropout, groups))
                block_in = block_out
                if level in attn_levels:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != 0:
                stage.upsample = Upsample(block_in)
            up.insert(0, stage)  # self.up[level] is the stage at that level, as in taming
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final convolution (the VQGAN adaptive loss weight takes gradients here)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_levels)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
