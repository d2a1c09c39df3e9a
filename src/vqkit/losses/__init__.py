"""Training losses beyond the quantizer's own: adversarial (VQGAN) losses and discriminator regularisers."""

from .adversarial import (
    GAN_LOSS_KINDS,
    LeCamRegularizer,
    adaptive_generator_weight,
    discriminator_loss,
    generator_loss,
    hinge_d_loss,
    lecam_penalty,
    r1_penalty,
    vanilla_d_loss,
)

__all__ = [
    "GAN_LOSS_KINDS",
    "LeCamRegularizer",
    "adaptive_generator_weight",
    "discriminator_loss",
    "generator_loss",
    "hinge_d_loss",
    "lecam_penalty",
    "r1_penalty",
    "vanilla_d_loss",
]
