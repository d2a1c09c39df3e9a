"""VQGAN training: the discriminator trains in the same loop with its own start step, its term enters the generator's
loss at gen_start, D's augmentation (DiffAugment) is differentiable and seeded, and resume covers all of it."""

from __future__ import annotations

import json

import pytest
import torch

from vqkit.losses.adversarial import disc_augment, parse_disc_augment
from vqkit.training import resolve_config, train_tokenizer
from vqkit.training.checkpoint import latest_checkpoint, load_checkpoint

TINY = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.z_channels=8", "model.embed_dim=8",
        "model.mid_attention=false", "model.codebook_size=64", "batch_size=16", "optim.warmup_steps=2",
        "image_every=0", "eval_batch_size=500", "steps=10", "ckpt_every=5", "log_every=1", "keep_checkpoints=0",
        "gan.enabled=true", "gan.disc_channels=8", "gan.disc_layers=2", "gan.disc_start=0", "gan.gen_start=4",
        "gan.augment=translation,cutout", "gan.lecam=0.1"]


# ------------------------------------------------------------------------------------------- DiffAugment itself


def test_policy_parsing_refuses_unknown_names():
    assert parse_disc_augment("") == ()
    assert parse_disc_augment(" translation , cutout") == ("translation", "cutout")
    with pytest.raises(ValueError, match="unknown augmentation 'color'"):
        parse_disc_augment("translation,color")


def test_translation_moves_each_image_by_whole_pixels_with_repeated_edges():
    x = torch.rand(16, 2, 12, 12)
    y = disc_augment(x, ("translation",), torch.Generator().manual_seed(0), translation=0.25)
    assert y.shape == x.shape
    moved = 0
    for a, b in zip(x, y):
        # find the shift: the content of b's interior is a's, displaced by (dy, dx) with |d| <= 3
        found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                 if torch.equal(b[:, 3:9, 3:9], a[:, 3 + dy:9 + dy, 3 + dx:9 + dx])]
        assert len(found) == 1
        dy, dx = found[0]
        moved += (dy, dx) != (0, 0)
        # an edge row comes from a's nearest edge: values are a's, never zeros
        assert torch.isin(b, a).all()
    assert moved >= 12  # images are moved independently, most by a non-zero shift


def test_cutout_sets_one_square_per_image_to_zero():
    x = torch.rand(32, 1, 16, 16) + 1.0  # no zeros before
    y = disc_augment(x, ("cutout",), torch.Generator().manual_seed(1), cutout=0.5)
    zeros = (y == 0).flatten(1).sum(1)
    assert (zeros <= 64).all() and (zeros > 0).all()  # an 8x8 square, sometimes cut by the border
    assert (zeros == 64).sum() > 0
    assert torch.equal(y[y != 0], x[y != 0])


def test_augmentation_is_differentiable_and_seeded():
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    policy = ("translation", "cutout")
    y1 = disc_augment(x, policy, torch.Generator().manual_seed(5))
    y2 = disc_augment(x, policy, torch.Generator().manual_seed(5))
    y3 = disc_augment(x, policy, torch.Generator().manual_seed(6))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    y1.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert disc_augment(x, (), torch.Generator()) is x


# ------------------------------------------------------------------------------------------- in the training loop


def run_metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def gan_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqgan")
    full, resumed = root / "full", root / "resumed"
    train_tokenizer(resolve_config("mnist5k", overrides=TINY), full, progress=False)
    assert train_tokenizer(resolve_config("mnist5k", overrides=TINY), resumed, stop_at=6, progress=False) is None
    # the step-6 checkpoint goes: the resumed run restarts from step 5, in the middle of the adversarial phase
    (resumed / "checkpoints" / "step_00000006.safetensors").unlink(missing_ok=True)
    assert latest_checkpoint(resumed / "checkpoints").name == "step_00000005.safetensors"
    train_tokenizer(None, resumed, resume=True, progress=False)
    return full, resumed


def test_discriminator_trains_from_its_own_start_and_the_generator_term_from_gen_start(gan_runs):
    rows = run_metrics(gan_runs[0])
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all("d_loss" in r and "logits_real" in r and "lecam" in r for r in rows)  # D trains from step 0
    assert all("g_loss" not in r and "d_weight" not in r for r in rows if r["step"] <= 4)
    assert all("g_loss" in r and r["d_weight"] >= 0 for r in rows if r["step"] > 4)
    start = load_checkpoint(gan_runs[0] / "checkpoints" / "step_00000005.safetensors")["task"]["gan"]["disc"]
    end = load_checkpoint(gan_runs[0] / "checkpoints" / "step_00000010.safetensors")["task"]["gan"]["disc"]
    assert any(not torch.equal(start[k], end[k]) for k in start)  # D keeps learning


def test_resume_restores_generator_discriminator_and_augmentation_draws_exactly(gan_runs):
    a = load_checkpoint(gan_runs[0] / "checkpoints" / "step_00000010.safetensors")["task"]
    b = load_checkpoint(gan_runs[1] / "checkpoints" / "step_00000010.safetensors")["task"]
    for part in ("model",):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part} {k} differs after resume"
    for k in a["gan"]["disc"]:
        assert torch.equal(a["gan"]["disc"][k], b["gan"]["disc"][k]), f"disc {k} differs after resume"
    ra, rb = run_metrics(gan_runs[0]), run_metrics(gan_runs[1])
    assert [r["d_loss"] for r in ra] == [r["d_loss"] for r in rb]


def test_an_unknown_augmentation_is_refused_before_training(tmp_path):
    cfg = resolve_config("mnist5k", overrides=[*TINY, "gan.augment=translation,colour"])
    with pytest.raises(ValueError, match="gan.augment: unknown augmentation 'colour'"):
        train_tokenizer(cfg, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "train_config.json").exists()
