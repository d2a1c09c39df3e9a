"""VQModel: architecture shapes, the tokenize/detokenize contract, save_pretrained/from_pretrained."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vqkit import VQModel, VQModelConfig
from vqkit.io import VQKitFileError
from vqkit.models.tokenizer import CONFIG_NAME, CONFIG_VERSION, WEIGHTS_NAME




def tiny_config(levels: int = 2, **kw) -> VQModelConfig:
    base = dict(in_channels=1, image_size=16, base_channels=8, channel_mult=[1] + [2] * (levels - 1),
                num_res_blocks=1, z_channels=8, embed_dim=8, codebook_size=16, dead_code_window=0)
    base.update(kw)
    return VQModelConfig(**base)


def images(b=2, c=1, h=16, w=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g)


def trained_a_little(cfg: VQModelConfig, steps: int = 2) -> VQModel:
    """A model whose codebook/EMA buffers have left their initial values (k-means init + EMA updates)."""
    torch.manual_seed(0)
    model = VQModel(cfg)
    model.train()
    for s in range(steps):
        model(images(4, cfg.in_channels, cfg.image_size, cfg.image_size, seed=100 + s) * 2 - 1)
    return model


# --------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("levels,factor", [(3, 4), (4, 8), (5, 16)])
def test_shapes_for_downsampling_factors(levels, factor):
    torch.manual_seed(0)
    cfg = tiny_config(levels, image_size=32, channel_mult=[1, 1, 2, 2, 2][:levels], attn_levels=[levels - 1],
                      mid_attention=True)
    model = VQModel(cfg)
    assert model.downsample_factor == factor == cfg.downsample_factor
    assert len(model.encoder.down[levels - 1].attn) == cfg.num_res_blocks  # attention really built at that level
    x = images(2, 1, 32, 32) * 2 - 1
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.indices.shape == (2, 32 // factor, 32 // factor)
    assert out.indices.dtype == torch.int64
    assert torch.isfinite(out.reconstruction).all() and torch.isfinite(out.quantizer_loss)
    assert cfg.token_grid() == (32 // factor, 32 // factor)
    assert cfg.bits_per_image() == pytest.approx((32 // factor) ** 2 * math.log2(cfg.codebook_size))
    # gradients reach the first encoder layer through the quantizer
    (out.reconstruction.pow(2).mean() + out.quantizer_loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("channels", [1, 3])
def test_tokenize_detokenize_contract(channels):
    cfg = tiny_config(3, in_channels=channels, attn_levels=[2])
    model = trained_a_little(cfg).eval()
    x = images(3, channels, 16, 16, seed=1)
    tokens = model.tokenize(x)
    assert tokens.dtype == torch.int64
    assert tokens.shape == (3, 4, 4)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < cfg.codebook_size
    y = model.detokenize(tokens)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # the same as the forward pass (inputs mapped to [-1, 1], outputs back to [0, 1])
    ref = ((model(x * 2 - 1).reconstruction + 1) / 2).clamp(0, 1)
    assert torch.allclose(y, ref, atol=1e-5)
    # deterministic
    assert torch.equal(model.tokenize(x), tokens)


@pytest.mark.parametrize("size", [(30, 29), (17, 16), (13, 21)])
def test_sizes_that_are_not_multiples_of_the_factor(size):
    cfg = tiny_config(3)  # factor 4
    model = trained_a_little(cfg).eval()
    h, w = size
    x = images(2, 1, h, w, seed=2)
    tokens = model.tokenize(x)
    assert tokens.shape == (2, math.ceil(h / 4), math.ceil(w / 4))
    assert cfg.token_grid(h, w) == tuple(tokens.shape[-2:])
    y = model.detokenize(tokens)
    assert y.shape == x.shape
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    # an explicit size gives the same crop
    assert torch.equal(model.detokenize(tokens, size=(h, w)), y)
    # the forward pass pads and crops the same way
    ref = ((model(x * 2 - 1).reconstruction + 1) / 2).clamp(0, 1)
    assert ref.shape == x.shape
    assert torch.allclose(y, ref, atol=1e-5)
    # without any hint a fresh model gives the whole padded grid
    fresh = VQModel(cfg).eval()
    fresh.load_state_dict(model.state_dict())
    full = fresh.detokenize(tokens)
    assert full.shape[-2:] == (tokens.shape[1] * 4, tokens.shape[2] * 4)
    assert torch.allclose(full[..., :h, :w], y, atol=1e-6)


def test_tokenize_does_not_touch_buffers_and_keeps_the_mode():
    cfg = tiny_config(2, dead_code_window=1)
    model = trained_a_little(cfg)
    for training in (True, False):
        model.train(training)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for s in range(3):
            tokens = model.tokenize(images(4, 1, 16, 16, seed=50 + s))
            model.detokenize(tokens)
        assert model.training is training
        assert all(m.training is training for m in model.modules())
        after = model.state_dict()
        for k, v in before.items():
            assert torch.equal(after[k], v), f"tokenize changed {k}"
    # also before k-means initialisation: tokenize must not initialise the codebook
    torch.manual_seed(0)
    fresh = VQModel(tiny_config(2)).train()
    assert int(fresh.quantize.initialized) == 0
    fresh.tokenize(images(2, 1, 16, 16))
    assert int(fresh.quantize.initialized) == 0 and fresh.training
    # whereas a training forward does update them (so the check above can fail)
    fresh(images(2, 1, 16, 16) * 2 - 1)
    assert int(fresh.quantize.initialized) == 1


def test_input_validation():
    model = VQModel(tiny_config(2)).eval()
    with pytest.raises(ValueError, match="1-channel"):
        model.tokenize(images(1, 3, 16, 16))
    with pytest.raises(ValueError):
        model.tokenize(torch.zeros(1, 16, 16))
    with pytest.raises(ValueError):
        model.tokenize(torch.zeros(1, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError):
        model.detokenize(torch.zeros(8, 8, dtype=torch.long))
    with pytest.raises(ValueError):  # token ids outside [0, K-1]
        model.detokenize(torch.full((1, 2, 2), model.config.codebook_size, dtype=torch.long))
    with pytest.raises(TypeError):
        VQModel(tiny_config(2), base_channels=4)
    with pytest.raises(ValueError):
        VQModelConfig(channel_mult=[])
    with pytest.raises(ValueError):
        VQModelConfig(codebook_size=1)


# ----------------------------------------------------------------------------------------------- persistence


@pytest.fixture
def saved(tmp_path):
    cfg = tiny_config(3, in_channels=3, attn_levels=[2], codebook_dim=4)
    model = trained_a_little(cfg).eval()
    path = tmp_path / "tok"
    model.save_pretrained(path)
    return model, path


def test_save_and_load_round_trip(saved):
    model, path = saved
    assert (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temp files left
    raw = json.loads((path / CONFIG_NAME).read_text())
    assert raw["config_version"] == CONFIG_VERSION and raw["model_type"] == "vqkit.VQModel"
    loaded = VQModel.from_pretrained(path)
    assert not loaded.training
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(loaded.quantize.initialized) == 1  # the k-means init flag survives (no re-init on fine-tuning)
    x = images(2, 3, 20, 18, seed=9)
    tokens = model.tokenize(x)
    assert torch.equal(loaded.tokenize(x), tokens)
    assert torch.equal(loaded.detokenize(tokens), model.detokenize(tokens))
    # overwrite in place works and stays loadable
    loaded.save_pretrained(path)
    assert VQModel.from_pretrained(path).config == model.config


def test_load_errors_name_the_file(saved, tmp_path):
    _, path = saved
    missing = tmp_path / "nope"
    with pytest.raises(VQKitFileError, match=str(missing)):
        VQModel.from_pretrained(missing)

    # a file instead of a directory
    with pytest.raises(VQKitFileError, match=str(path / WEIGHTS_NAME)):
        VQModel.from_pretrained(path / WEIGHTS_NAME)

    config_text = (path / CONFIG_NAME).read_text()
    weights = (path / WEIGHTS_NAME).read_bytes()

    def restore():
        (path / CONFIG_NAME).write_text(config_text)
        (path / WEIGHTS_NAME).write_bytes(weights)

    (path / WEIGHTS_NAME).unlink()
    with pytest.raises(VQKitFileError, match=str(path / WEIGHTS_NAME)):
        VQModel.from_pretrained(path)
    restore()

    (path / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])  # truncated
    with pytest.raises(VQKitFileError, match=str(path / WEIGHTS_NAME)):
        VQModel.from_pretrained(path)
    restore()

    (path / CONFIG_NAME).write_text(config_text[:-20])  # corrupt JSON
    with pytest.raises(VQKitFileError, match=str(path / CONFIG_NAME)):
        VQModel.from_pretrained(path)
    (path / CONFIG_NAME).unlink()
    with pytest.raises(VQKitFileError, match=str(path / CONFIG_NAME)):
        VQModel.from_pretrained(path)
    restore()

    newer = json.loads(config_text)
    newer["config_version"] = CONFIG_VERSION + 1
    (path / CONFIG_NAME).write_text(json.dumps(newer))
    with pytest.raises(VQKitFileError, match="config_version") as e:
        VQModel.from_pretrained(path)
    assert str(path / CONFIG_NAME) in str(e.value)
    restore()

    other = json.loads(config_text)
    other["model_type"] = "vqkit.SomethingElse"
    (path / CONFIG_NAME).write_text(json.dumps(other))
    with pytest.raises(VQKitFileError, match=str(path / CONFIG_NAME)):
        VQModel.from_pretrained(path)
    restore()

    # weights that do not match the config: other shapes, and other/missing parameter names
    for change in ({"codebook_size": 32}, {"base_channels": 16}, {"num_res_blocks": 2}, {"codebook_dim": None},
                   {"use_ema": False}):
        cfg = json.loads(config_text)
        cfg.update(change)
        (path / CONFIG_NAME).write_text(json.dumps(cfg))
        with pytest.raises(VQKitFileError, match=str(path / WEIGHTS_NAME)):
            VQModel.from_pretrained(path)
    restore()
    assert VQModel.from_pretrained(path) is not None  # restore() really restored a loadable model


def test_unknown_config_keys_warn_but_load(saved):
    model, path = saved
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg["from_the_future"] = 1
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="from_the_future"):
        loaded = VQModel.from_pretrained(path)
    assert loaded.config == model.config
