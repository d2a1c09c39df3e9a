"""PatchDiscriminator and the adversarial losses / regularisers of vqkit.losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from vqkit.losses import (
    LeCamRegularizer,
    adaptive_generator_weight,
    discriminator_loss,
    generator_loss,
    hinge_d_loss,
    r1_penalty,
    vanilla_d_loss,
)
from vqkit.models.discriminator import PatchDiscriminator




# ------------------------------------------------------------------------------------------------ discriminator
@pytest.mark.parametrize("size, num_layers, logits", [(28, 3, 1), (28, 2, 5), (32, 3, 2), (64, 3, 6), (256, 3, 30)])
def test_discriminator_gives_one_logit_per_patch(size, num_layers, logits):
    d = PatchDiscriminator(in_channels=3, base_channels=8, num_layers=num_layers)
    out = d(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1, logits, logits)
    assert d.output_size(size, size) == (logits, logits)


@pytest.mark.parametrize("norm", ["batch", "group", "none", "spectral"])
def test_every_norm_runs_on_mnist_sized_images(norm):
    d = PatchDiscriminator(in_channels=1, base_channels=8, num_layers=2, norm=norm)
    out = d(torch.randn(4, 1, 28, 28))
    out.mean().backward()
    assert out.shape == (4, 1, 5, 5) and torch.isfinite(out).all()
    assert all(p.grad is not None for p in d.parameters() if p.requires_grad)


def test_too_small_images_are_refused_with_advice():
    d = PatchDiscriminator(in_channels=1, num_layers=3)
    assert d.min_input_size == 24
    with pytest.raises(ValueError, match=r"20x20 .* at least 24 pixels .*num_layers=2 or fewer"):
        d(torch.randn(1, 1, 20, 20))
    with pytest.raises(ValueError, match="no num_layers works"):
        d(torch.randn(1, 1, 5, 5))
    with pytest.raises(ValueError, match="norm must be one of"):
        PatchDiscriminator(in_channels=1, norm="layer")


def test_weights_start_as_in_taming():
    torch.manual_seed(0)
    d = PatchDiscriminator(in_channels=3, base_channels=64, num_layers=3, norm="batch")
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    big = max(convs, key=lambda m: m.weight.numel())
    assert big.weight.mean().abs() < 1e-3 and abs(big.weight.std().item() - 0.02) < 1e-3
    assert all(m.bias is None or not m.bias.any() for m in convs)
    norms = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(abs(m.weight.mean().item() - 1.0) < 0.01 and not m.bias.any() for m in norms)


# --------------------------------------------------------------------------------------------------- GAN losses
def test_hinge_d_loss_is_zero_only_when_both_margins_are_met():
    ones = torch.ones(2, 1, 3, 3)
    assert hinge_d_loss(ones, -ones).item() == 0.0
    assert hinge_d_loss(3 * ones, -5 * ones).item() == 0.0
    assert hinge_d_loss(0 * ones, 0 * ones).item() == pytest.approx(1.0)
    assert hinge_d_loss(0.5 * ones, -ones).item() == pytest.approx(0.25)  # only the real margin is short, by 0.5
    assert hinge_d_loss(ones, -0.5 * ones).item() == pytest.approx(0.25)


def test_vanilla_d_loss_is_cross_entropy_and_decreases_towards_zero():
    zeros = torch.zeros(4)
    assert vanilla_d_loss(zeros, zeros).item() == pytest.approx(math.log(2))
    values = [vanilla_d_loss(zeros + t, zeros - t).item() for t in (0.0, 1.0, 5.0, 20.0)]
    assert values == sorted(values, reverse=True) and values[-1] < 1e-8
    assert vanilla_d_loss(zeros - 3, zeros + 3).item() > math.log(2)  # wrong way round costs more


def test_generator_losses_reward_fakes_that_fool_the_discriminator():
    logits = torch.tensor([-2.0, 0.0, 4.0])
    assert generator_loss(logits, "hinge").item() == pytest.approx(-2.0 / 3)
    expected = sum(math.log1p(math.exp(-v)) for v in (-2.0, 0.0, 4.0)) / 3
    assert generator_loss(logits, "non-saturating").item() == pytest.approx(expected)
    for kind in ("hinge", "non-saturating"):
        assert generator_loss(logits + 1, kind) < generator_loss(logits, kind)
    with pytest.raises(ValueError, match="GAN loss kind"):
        generator_loss(logits, "wasserstein")


def test_discriminator_loss_pairs_with_the_generator_kind():
    real, fake = torch.randn(8), torch.randn(8)
    assert torch.equal(discriminator_loss(real, fake, "hinge"), hinge_d_loss(real, fake))
    assert torch.equal(discriminator_loss(real, fake, "non-saturating"), vanilla_d_loss(real, fake))


# ------------------------------------------------------------------------------------------- adaptive weight
def toy_losses(decoder_out: nn.Conv2d, discriminator: nn.Conv2d, h: torch.Tensor, target: torch.Tensor):
    rec = decoder_out(h)
    return (rec - target).abs().mean(), generator_loss(discriminator(rec))


def test_adaptive_weight_is_the_ratio_of_the_two_gradient_norms():
    torch.manual_seed(0)
    last, disc = nn.Conv2d(8, 3, 3, padding=1), nn.Conv2d(3, 1, 4)
    h, target = torch.randn(2, 8, 8, 8), torch.randn(2, 3, 8, 8)

    rec_loss, g_loss = toy_losses(last, disc, h, target)
    weight = adaptive_generator_weight(rec_loss, g_loss, last.weight)

    norms = []
    for pick in (0, 1):  # each gradient on its own, by plain backward passes
        last.zero_grad()
        toy_losses(last, disc, h, target)[pick].backward()
        norms.append(last.weight.grad.norm().item())
    assert weight.item() == pytest.approx(norms[0] / (norms[1] + 1e-4), rel=1e-5)
    assert not weight.requires_grad
    (rec_loss + weight * g_loss).backward()  # the graphs survive for the real backward pass


def test_adaptive_weight_is_clamped():
    last = nn.Conv2d(2, 1, 1)
    x = torch.randn(1, 2, 4, 4)
    rec_loss = 1e6 * last(x).pow(2).mean()
    g_loss = 1e-9 * last(x).mean()
    assert adaptive_generator_weight(rec_loss, g_loss, last.weight, max_weight=50.0).item() == 50.0


# ---------------------------------------------------------------------------------------------------- LeCam
def test_lecam_moving_averages_and_penalty_by_hand():
    reg = LeCamRegularizer(decay=0.9)
    # first step: the averages take the batch means (real 2, fake -2) outright
    penalty = reg(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -3.0]))
    assert (reg.ema_real.item(), reg.ema_fake.item()) == (2.0, -2.0)
    # E[(real - ema_fake)^2] + E[(fake - ema_real)^2] = (9 + 25) / 2 + (9 + 25) / 2
    assert penalty.item() == pytest.approx(34.0)
    # second step: ema = 0.9 * old + 0.1 * batch mean (0)
    penalty = reg(torch.zeros(2), torch.zeros(2))
    assert reg.ema_real.item() == pytest.approx(1.8) and reg.ema_fake.item() == pytest.approx(-1.8)
    assert penalty.item() == pytest.approx(2 * 1.8 ** 2)
    assert reg.num_updates.item() == 2


def test_lecam_state_checkpoints_and_eval_does_not_update():
    reg = LeCamRegularizer(decay=0.5)
    reg(torch.full((4,), 3.0), torch.full((4,), -1.0))
    restored = LeCamRegularizer(decay=0.5)
    restored.load_state_dict(reg.state_dict())
    assert (restored.ema_real.item(), restored.ema_fake.item(), restored.num_updates.item()) == (3.0, -1.0, 1)
    restored.eval()
    restored(torch.zeros(4), torch.zeros(4))
    assert restored.ema_real.item() == 3.0 and restored.num_updates.item() == 1


def test_lecam_penalty_backpropagates_into_the_logits_only():
    reg = LeCamRegularizer()
    real = torch.tensor([1.0, 2.0], requires_grad=True)
    reg(real, torch.tensor([0.0, -1.0])).backward()
    assert real.grad is not None and not reg.ema_real.requires_grad


# ------------------------------------------------------------------------------------------------------- R1
class ConstantD(nn.Module):
    """A discriminator that ignores its input."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return self.bias.expand(x.shape[0], 1, 2, 2)


def test_r1_is_zero_for_a_discriminator_that_ignores_its_input():
    images = torch.randn(3, 1, 8, 8).requires_grad_()
    assert r1_penalty(ConstantD()(images), images).item() == 0.0


def test_r1_of_a_linear_discriminator_is_its_squared_weight_norm():
    w = torch.randn(1, 2, 5, 5)
    images = torch.randn(4, 2, 5, 5).requires_grad_()
    logits = (images * w).sum(dim=(1, 2, 3))  # gradient w.r.t. each image is w
    assert r1_penalty(logits, images).item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)


def test_r1_on_a_patch_discriminator_is_positive_and_trains_it():
    torch.manual_seed(0)
    d = PatchDiscriminator(in_channels=1, base_channels=8, num_layers=2, norm="none")
    images = torch.randn(2, 1, 28, 28).requires_grad_()
    penalty = r1_penalty(d(images), images)
    assert penalty.item() > 0
    penalty.backward()  # second-order: the penalty's gradient reaches the discriminator's weights
    assert d.main[0].weight.grad is not None and d.main[0].weight.grad.abs().sum() > 0


def test_r1_needs_images_that_require_grad():
    images = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="requires_grad_"):
        r1_penalty(ConstantD()(images), images)
