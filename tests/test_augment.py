"""Training-batch augmentation: what it changes, that it is reproducible per step, and that it reaches training."""

from __future__ import annotations

import torch

from vqkit.data.augment import CHANNEL_ORDERS, augment_images


def batch(n=64, channels=3):
    return torch.rand(n, channels, 5, 7, generator=torch.Generator().manual_seed(0))


def test_off_is_identity_and_draws_repeat_per_step():
    x = batch()
    assert augment_images(x, hflip=False, channel_permute=False, seed=0, step=3) is x
    a = augment_images(x, hflip=True, channel_permute=True, seed=0, step=3)
    assert torch.equal(a, augment_images(x, hflip=True, channel_permute=True, seed=0, step=3))
    assert not torch.equal(a, augment_images(x, hflip=True, channel_permute=True, seed=0, step=4))
    assert not torch.equal(a, augment_images(x, hflip=True, channel_permute=True, seed=0, step=3, rank=1))


def test_each_image_is_itself_or_its_mirror_with_permuted_channels():
    x = batch()
    flipped = augment_images(x, hflip=True, channel_permute=False, seed=1, step=0)
    mirrored = [torch.equal(f, i.flip(-1)) for f, i in zip(flipped, x)]
    same = [torch.equal(f, i) for f, i in zip(flipped, x)]
    assert all(m or s for m, s in zip(mirrored, same)) and 10 < sum(mirrored) < 54
    permuted = augment_images(x, hflip=False, channel_permute=True, seed=1, step=0)
    used = set()
    for p, i in zip(permuted, x):
        match = [k for k, order in enumerate(CHANNEL_ORDERS) if torch.equal(p, i[order])]
        assert len(match) == 1
        used.add(match[0])
    assert len(used) == 6  # all six orders occur in 64 draws
    gray = batch(channels=1)  # grayscale: nothing to permute
    assert torch.equal(augment_images(gray, hflip=False, channel_permute=True, seed=1, step=0), gray)


def test_training_with_augmentation_resumes_exactly(tmp_path):
    from vqkit.training import resolve_config, train_tokenizer
    from vqkit.training.checkpoint import load_checkpoint

    tiny = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.z_channels=8", "model.embed_dim=8",
            "model.mid_attention=false", "model.codebook_size=32", "batch_size=4", "optim.warmup_steps=1",
            "image_every=0", "steps=4", "ckpt_every=2", "keep_checkpoints=0", "data.image_size=16",
            "augment.hflip=true", "augment.channel_permute=true"]
    train_tokenizer(resolve_config("photos", overrides=tiny), tmp_path / "a", progress=False)
    assert train_tokenizer(resolve_config("photos", overrides=tiny), tmp_path / "b", stop_at=2, progress=False) is None
    train_tokenizer(None, tmp_path / "b", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000004.safetensors")["task"]["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000004.safetensors")["task"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = [o for o in tiny if not o.startswith("augment.")]
    train_tokenizer(resolve_config("photos", overrides=plain), tmp_path / "c", progress=False)
    c = load_checkpoint(tmp_path / "c" / "checkpoints" / "step_00000004.safetensors")["task"]["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the augmentation did reach the training batches
