"""Adversarial losses for VQGAN training.

- discriminator losses: hinge and vanilla (binary cross-entropy on logits), each averaged over real and fake;
- generator losses: hinge (-D(G(z))) and non-saturating (softplus(-D(G(z))));
- the adaptive generator weight of VQGAN, which balances the adversarial gradient against the reconstruction gradient
  at the decoder's last layer;
- two discriminator regularisers: LeCam (Tseng et al., 2021) and R1 (Mescheder et al., 2018).

All losses take raw logits (any shape; patch logits are averaged) and return scalars.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D

GAN_LOSS_KINDS = ("hinge", "non-saturating")


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSS_KINDS:
        raise ValueError(f"GAN loss kind must be one of {GAN_LOSS_KINDS}, got {kind!r}")


# ---------------------------------------------------------------------------------------------- discriminator
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(real))] + E[relu(1 + D(fake))]); zero once real logits are >= 1 and fake logits <= -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[softplus(-D(real))] + E[softplus(D(fake))]): cross-entropy with real labelled 1 and fake 0."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The discriminator loss that goes with ``generator_loss(kind)``: hinge, or vanilla for non-saturating."""
    _check_kind(kind)
    return hinge_d_loss(logits_real, logits_fake) if kind == "hinge" else vanilla_d_loss(logits_real, logits_fake)


# -------------------------------------------------------------------------------------------------- generator
def generator_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """hinge: -E[D(fake)]; non-saturating: E[softplus(-D(fake))] (= -log sigmoid(D(fake)))."""
    _check_kind(kind)
    return -logits_fake.mean() if kind == "hinge" else F.softplus(-logits_fake).mean()


def adaptive_generator_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                              max_weight: float = 1e4) -> torch.Tensor:
    """||d rec_loss / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), clamped to [0, max_weight], detached.

    Scaling g_loss by this makes its gradient at the decoder's last layer as large as the reconstruction loss's, so
    the adversarial term neither drowns the reconstruction nor vanishes (VQGAN, Esser et al., 2021). Both graphs are
    kept for the backward pass that follows.
    """
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# ------------------------------------------------------------------------------------------------ regularisers
def lecam_penalty(logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: torch.Tensor,
                  ema_fake: torch.Tensor) -> torch.Tensor:
    """E[(D(real) - ema_fake)^2] + E[(D(fake) - ema_real)^2]."""
    return (logits_real.float() - ema_fake).pow(2).mean() + (logits_fake.float() - ema_real).pow(2).mean()


class LeCamRegularizer(nn.Module):
    """LeCam regularisation: pulls D's outputs on real images towards the running mean of its outputs on fakes and
    vice versa, which keeps the discriminator from growing overconfident on small data sets.

    The running means are buffers, so they are saved and restored with the model. Calling the module in training mode
    first folds the batch means into them (the first call sets them outright) and then returns ``lecam_penalty``; in
    eval mode it only returns the penalty. Under torch.distributed every rank must call it at each step: the batch
    means are averaged over ranks so the buffers stay identical everywhere.
    """

    def __init__(self, decay: float = 0.99):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        means = torch.stack([logits_real.float().mean(), logits_fake.float().mean()])
        means = D.all_reduce_sum(means) / D.world_size()
        decay = self.decay if int(self.num_updates) > 0 else 0.0
        self.ema_real.mul_(decay).add_((1.0 - decay) * means[0])
        self.ema_fake.mul_(decay).add_((1.0 - decay) * means[1])
        self.num_updates += 1

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(logits_real, logits_fake)
        return lecam_penalty(logits_real, logits_fake, self.ema_real, self.ema_fake)

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


def r1_penalty(d_real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """E over images of ||d sum(D(x)) / dx||^2 on real images; the caller scales it (usually by gamma / 2).

    ``real_images`` must have had ``requires_grad_()`` called before the discriminator saw them. The graph is kept
    (create_graph) so the penalty itself can be backpropagated into the discriminator.
    """
    if not real_images.requires_grad:
        raise ValueError("r1_penalty needs the gradient with respect to the real images: call "
                         "real_images.requires_grad_() before passing them through the discriminator")
    grad, = torch.autograd.grad(d_real_logits.sum(), real_images, create_graph=True, allow_unused=True)
    if grad is None:  # the logits do not depend on the images at all
        return d_real_logits.new_zeros((), dtype=torch.float32)
    return grad.float().pow(2).flatten(1).sum(1).mean()


# --------------------------------------------------------------------------------------- differentiable augmentation
DISC_AUGMENTS = ("translation", "cutout")


def parse_disc_augment(policy: str) -> tuple[str, ...]:
    """``"translation,cutout"`` -> ("translation", "cutout"); ``""`` -> (); unknown names are refused."""
    names = tuple(p.strip() for p in str(policy or "").split(",") if p.strip())
    unknown = [n for n in names if n not in DISC_AUGMENTS]
    if unknown:
        raise ValueError(f"gan.augment: unknown augmentation {unknown[0]!r}; use a comma-separated subset of "
                         f"{', '.join(DISC_AUGMENTS)}")
    return names


def disc_augment(x: torch.Tensor, policy: tuple[str, ...], generator: torch.Generator,
                 translation: float = 0.125, cutout: float = 0.5) -> torch.Tensor:
    """DiffAugment (Zhao et al., 2020): random changes to what the discriminator sees, differentiable in ``x``, so
    that the generator's gradient passes through them. With few training images a discriminator otherwise learns the
    exact pixels (and the generator learns tiny perturbations that fool it) instead of what real images look like.

    ``translation``: each image moves by up to that fraction of its size, edges repeated (a digit's background stays
    background). ``cutout``: a square of that fraction of the size, at a random place, is set to 0 (mid-grey).
    Each image gets its own draw from ``generator`` (a CPU generator; the draws are moved to ``x``'s device)."""
    if not policy:
        return x
    b, _, h, w = x.shape
    if "translation" in policy:
        sy, sx = max(1, int(h * translation + 0.5)), max(1, int(w * translation + 0.5))
        dy = torch.randint(-sy, sy + 1, (b, 1), generator=generator).to(x.device)
        dx = torch.randint(-sx, sx + 1, (b, 1), generator=generator).to(x.device)
        padded = F.pad(x, (sx, sx, sy, sy), mode="replicate")
        rows = torch.arange(h, device=x.device)[None] + sy + dy  # [B, H]
        cols = torch.arange(w, device=x.device)[None] + sx + dx  # [B, W]
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]
    if "cutout" in policy:
        ch, cw = max(1, int(h * cutout + 0.5)), max(1, int(w * cutout + 0.5))
        cy = torch.randint(0, h + 1 - ch % 2, (b, 1, 1), generator=generator).to(x.device)
        cx = torch.randint(0, w + 1 - cw % 2, (b, 1, 1), generator=generator).to(x.device)
        ys = torch.arange(h, device=x.device)[None, :, None]
        xs = torch.arange(w, device=x.device)[None, None, :]
        top, left = cy - ch // 2, cx - cw // 2  # the square may reach past an edge, as in DiffAugment
        inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
        x = x * (~inside).unsqueeze(1).to(x.dtype)
    return x
