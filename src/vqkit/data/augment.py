"""Random changes to tokenizer training batches: left-right mirroring and colour-channel permutation.

Drawn from a generator seeded by (seed, step, rank), so a resumed run sees exactly the images it would have seen.
TEST images are never augmented.
"""

from __future__ import annotations

import itertools

import torch

CHANNEL_ORDERS = torch.tensor(list(itertools.permutations(range(3))))  # the 6 orders of R, G, B


def augment_images(images: torch.Tensor, *, hflip: bool, channel_permute: bool, seed: int, step: int,
                   rank: int = 0) -> torch.Tensor:
    """``images`` [B, C, H, W]; each image is mirrored with probability 1/2 (``hflip``) and, for RGB, given one of
    the 6 channel orders at random (``channel_permute``: a few photos hold few hues, and a tokenizer that saw red
    skies learns blue ones too)."""
    if not (hflip or channel_permute):
        return images
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) * 1_009 + int(rank))
    batch = len(images)
    if hflip:
        flip = torch.rand(batch, generator=generator) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
    if channel_permute and images.shape[1] == 3:
        orders = CHANNEL_ORDERS[torch.randint(len(CHANNEL_ORDERS), (batch,), generator=generator)]
        images = images.gather(1, orders.view(batch, 3, 1, 1).to(images.device).expand_as(images))
    return images
