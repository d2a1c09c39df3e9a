"""The DCGAN baseline: model shapes and conditioning, sampling, save/load, and training runs with exact resume."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from vqkit.io import VQKitFileError
from vqkit.models.gan import DCGAN, DCGANConfig
from vqkit.training.checkpoint import load_checkpoint
from vqkit.training.config import ConfigError
from vqkit.training.gan import GANTrainConfig, add_train_gan_parser, resolve_gan_config, train_gan




def tiny(**kwargs) -> DCGAN:
    torch.manual_seed(0)
    return DCGAN(DCGANConfig(**{"g_channels": 8, "d_channels": 8, "latent_dim": 16, **kwargs}))


# ------------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("channels,size,canvas", [(1, 28, 32), (3, 32, 32), (3, 64, 64), (1, 8, 8)])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_shapes(channels, size, canvas, num_classes):
    model = tiny(channels=channels, image_size=size, num_classes=num_classes)
    assert model.config.canvas_size == canvas
    labels = torch.arange(5) % 10 if num_classes else None
    images = model.sample(5, labels, seed=0, batch_size=2)
    assert images.shape == (5, channels, size, size) and images.device.type == "cpu"
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    logits = model.discriminator(images * 2 - 1, labels)
    assert logits.shape == (5,)
    z = torch.randn(3, 16)
    assert model.generator(z, None if labels is None else labels[:3]).shape == (3, channels, size, size)


def test_class_conditioning_changes_the_images():
    model = tiny(num_classes=10)
    zeros, ones = model.sample(4, 0, seed=3), model.sample(4, 1, seed=3)
    assert not torch.allclose(zeros, ones)
    assert torch.equal(model.sample(4, [0, 0, 0, 0], seed=3), zeros)  # one int or a list: the same
    # the discriminator's verdict depends on the class too (projection head)
    x = zeros * 2 - 1
    assert not torch.allclose(model.discriminator(x, torch.zeros(4, dtype=torch.long)),
                              model.discriminator(x, torch.ones(4, dtype=torch.long)))


def test_sample_is_deterministic_per_seed_and_keeps_the_mode():
    model = tiny(num_classes=3).train()
    a = model.sample(6, seed=11)
    assert model.training  # back in training mode afterwards
    assert torch.equal(a, model.sample(6, seed=11))
    assert not torch.equal(a, model.sample(6, seed=12))
    before = torch.get_rng_state()
    model.sample(2, seed=1)
    assert torch.equal(before, torch.get_rng_state())  # a seeded sample leaves the global generator alone


@pytest.mark.parametrize("labels,message", [([0, 1], "2 class labels for 3"), (5, r"in \[0, 3\)"),
                                            ([0.5, 1, 2], "ints")])
def test_bad_labels_are_refused(labels, message):
    with pytest.raises(ValueError, match=message):
        tiny(num_classes=3).sample(3, labels, seed=0)


def test_labels_for_an_unconditional_gan_are_refused():
    with pytest.raises(ValueError, match="unconditional"):
        tiny().sample(2, 1, seed=0)


def test_config_is_validated():
    with pytest.raises(ValueError, match="image_size"):
        DCGANConfig(image_size=4)
    with pytest.raises(ValueError, match="num_classes"):
        DCGANConfig(num_classes=0)


# -------------------------------------------------------------------------------------------------- save/load
def test_save_load_round_trip(tmp_path):
    model = tiny(channels=3, image_size=32, num_classes=4)
    model.train()
    model.sample(2, seed=0)
    model.generator(torch.randn(8, 16), torch.arange(8) % 4)  # train mode: moves the BatchNorm running statistics
    model.save_pretrained(tmp_path / "gan")
    assert json.loads((tmp_path / "gan" / "config.json").read_text())["model_type"] == "vqkit.DCGAN"
    loaded = DCGAN.from_pretrained(tmp_path / "gan")
    assert loaded.config == model.config and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert torch.equal(loaded.sample(5, seed=2), model.sample(5, seed=2))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(VQKitFileError, match="not a directory"):
        DCGAN.from_pretrained(tmp_path / "missing")
    tiny().save_pretrained(tmp_path / "gan")
    weights = tmp_path / "gan" / "model.safetensors"
    weights.write_bytes(b"not safetensors")
    with pytest.raises(VQKitFileError, match="model.safetensors"):
        DCGAN.from_pretrained(tmp_path / "gan")
    config = tmp_path / "gan" / "config.json"
    config.write_text(json.dumps({"model_type": "vqkit.VQModel"}))
    with pytest.raises(VQKitFileError, match="config.json.*not a vqkit.DCGAN"):
        DCGAN.from_pretrained(tmp_path / "gan")
    tiny().save_pretrained(tmp_path / "mixed")  # weights for latent_dim 16, then the config of latent_dim 8
    tiny(latent_dim=8).save_pretrained(tmp_path / "other")
    (tmp_path / "mixed" / "config.json").write_text((tmp_path / "other" / "config.json").read_text())
    with pytest.raises(VQKitFileError, match="do not match"):
        DCGAN.from_pretrained(tmp_path / "mixed")


# --------------------------------------------------------------------------------------------------- config
def test_config_builds_from_presets_and_overrides():
    cfg = resolve_gan_config("mnist5k", overrides=["optim.lr=0.001", "model.latent_dim=32"])
    assert isinstance(cfg, GANTrainConfig) and cfg.preset == "mnist-gan"
    assert cfg.model.g_channels == 32 and cfg.model.latent_dim == 32
    # setting one optim key keeps the GAN's other optimizer defaults (not OptimConfig's)
    assert cfg.optim.lr == 0.001 and cfg.optim.betas == [0.5, 0.999] and cfg.optim.grad_clip == 0.0
    assert cfg.optim.warmup_steps == 0 and cfg.optim.schedule == "constant"
    assert resolve_gan_config("digits").preset is None
    with pytest.raises(ConfigError, match="loss"):
        resolve_gan_config("mnist5k", overrides=["loss=wasserstein"])
    with pytest.raises(ConfigError, match="g_chanels"):
        resolve_gan_config("mnist5k", overrides=["model.g_chanels=3"])


# ------------------------------------------------------------------------------------------------- training
TINY = ["model.g_channels=8", "model.d_channels=8", "model.latent_dim=8", "batch_size=8", "steps=4", "log_every=1",
        "image_every=2", "ckpt_every=2", "keep_checkpoints=0", "eval_batch_size=64"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """50 labelled 12x12 grayscale images (3 classes) in an .npz file: 40 TRAIN, 10 TEST."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    np.savez(path, images=rng.integers(0, 256, (50, 12, 12), dtype=np.uint8), labels=np.arange(50) % 3)
    return str(path)


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_training_writes_the_model_and_resumes_exactly(tmp_path, data_file):
    straight, resumed = tmp_path / "A", tmp_path / "B"
    result = train_gan(resolve_gan_config(data_file, overrides=TINY), straight, progress=False)
    for name in ("config.json", "model.safetensors", "eval.json", "samples.png", "images/samples_00000004.png"):
        assert (straight / name).is_file(), name
    saved = json.loads((straight / "eval.json").read_text())
    assert saved == result and result["steps"] == 4 and result["train_seconds"] >= 0
    model = DCGAN.from_pretrained(straight)
    assert result["parameters"] == model.num_parameters() > result["generator_parameters"]
    assert model.config.num_classes == 3 and model.config.image_size == 12  # taken from the data

    assert train_gan(resolve_gan_config(data_file, overrides=TINY), resumed, stop_at=2, progress=False) is None
    assert not (resumed / "model.safetensors").exists()
    train_gan(None, resumed, resume=True, progress=False)
    a = load_checkpoint(straight / "checkpoints" / "step_00000004.safetensors")["task"]
    b = load_checkpoint(resumed / "checkpoints" / "step_00000004.safetensors")["task"]
    for part in ("model", "g_optimizer", "d_optimizer"):
        flat_a, flat_b = _flatten(a[part]), _flatten(b[part])
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            assert torch.equal(flat_a[key], flat_b[key]), f"{part} {key} differs after resume"
    assert metrics(straight) == metrics(resumed)
    # the resume test is not vacuous: training changed the weights between step 2 and step 4
    mid = load_checkpoint(resumed / "checkpoints" / "step_00000002.safetensors")["task"]["model"]
    assert any(not torch.equal(mid[k], a["model"][k]) for k in mid)


def _flatten(tree, prefix=""):
    if torch.is_tensor(tree):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _flatten(sub, f"{prefix}/{i}").items()}
    return {prefix: torch.tensor(float(tree))} if isinstance(tree, (int, float)) else {}


def test_a_run_is_never_overwritten(tmp_path, data_file):
    run = tmp_path / "run"
    train_gan(resolve_gan_config(data_file, overrides=TINY + ["steps=1"]), run, progress=False)
    with pytest.raises(ConfigError, match="already holds a training run"):
        train_gan(resolve_gan_config(data_file, overrides=TINY), run, progress=False)
    with pytest.raises(ConfigError, match="no run to resume"):
        train_gan(None, tmp_path / "empty", resume=True, progress=False)


def test_unconditional_when_asked(tmp_path, data_file):
    train_gan(resolve_gan_config(data_file, overrides=TINY + ["steps=1", "conditioning=none"]), tmp_path / "u",
              progress=False)
    assert DCGAN.from_pretrained(tmp_path / "u").config.num_classes is None


def test_cli_command(tmp_path, data_file, capsys):
    parser = argparse.ArgumentParser()
    add_train_gan_parser(parser.add_subparsers())
    out = tmp_path / "cli"
    args = parser.parse_args(["gan", "--data", data_file, "--out", str(out), "--steps", "2", "--stop-at", "1",
                              *TINY])
    assert args.func(args) == 0 and "--resume" in capsys.readouterr().out
    args = parser.parse_args(["gan", "--out", str(out), "--resume"])
    assert args.func(args) == 0 and (out / "eval.json").is_file()
    args = parser.parse_args(["gan", "--out", str(out), "--resume", "steps=3"])
    with pytest.raises(ConfigError, match="only --steps"):
        args.func(args)
