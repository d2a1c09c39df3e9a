"""taming-transformers / latent-diffusion checkpoint conversion: exact parity with taming's own modules.

taming-transformers is a test-only dependency (pip install taming-transformers --no-deps); the parity tests skip
without it. Its two modules used here import only torch and numpy.
"""

from __future__ import annotations

import argparse
import sys
import types

import pytest
import torch
import torch.nn as nn
import yaml

from vqkit.interop.taming import add_convert_parser, convert_taming_checkpoint
from vqkit.io import VQKitFileError
from vqkit.models import VQModel
from vqkit.models.blocks import AttnBlock

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

CH, Z_CHANNELS, EMBED_DIM, N_EMBED = 32, 16, 8, 64


class TamingVQGAN(nn.Module):
    """The generator half of taming's VQModel, with its attribute names, so state_dict() has taming's keys."""

    def __init__(self, ch_mult, attn_resolutions, resolution):
        super().__init__()
        dd = dict(ch=CH, out_ch=3, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn_resolutions,
                  dropout=0.0, in_channels=3, resolution=resolution, z_channels=Z_CHANNELS, double_z=False)
        self.encoder = taming_model.Encoder(**dd)
        self.decoder = taming_model.Decoder(**dd)
        self.quantize = taming_quantize.VectorQuantizer(N_EMBED, EMBED_DIM, beta=0.25)
        self.quant_conv = nn.Conv2d(Z_CHANNELS, EMBED_DIM, 1)
        self.post_quant_conv = nn.Conv2d(EMBED_DIM, Z_CHANNELS, 1)

    def tokens_and_reconstruction(self, x):
        """x in [-1, 1] -> (indices [B, h, w], reconstruction in [-1, 1]), taming's own computation."""
        h = self.quant_conv(self.encoder(x))
        quantized, _, (_, _, indices) = self.quantize(h)
        b, _, gh, gw = h.shape
        return indices.view(b, gh, gw), self.decoder(self.post_quant_conv(quantized))


def random_taming_vqgan(ch_mult, attn_resolutions, resolution, seed=0) -> TamingVQGAN:
    torch.manual_seed(seed)
    model = TamingVQGAN(ch_mult, attn_resolutions, resolution).eval()
    with torch.no_grad():
        # non-trivial norm affines, so a mis-mapped norm cannot hide behind weight=1, bias=0
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
        # codes drawn from actual encoder outputs, so the images use many different tokens
        x = torch.rand(4, 3, resolution, resolution) * 2 - 1
        z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        pick = torch.randint(z.shape[0], (N_EMBED,))
        model.quantize.embedding.weight.copy_(z[pick] + 0.05 * z.std() * torch.randn(N_EMBED, EMBED_DIM))
    return model


def discriminator_weights() -> dict[str, torch.Tensor]:
    return {"loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
            "loss.discriminator.main.0.bias": torch.randn(8),
            "loss.perceptual_loss.net.slice1.0.weight": torch.randn(8, 3, 3, 3)}


def assert_parity(taming: TamingVQGAN, model: VQModel, size: int) -> None:
    torch.manual_seed(1)
    images = torch.rand(2, 3, size, size)  # vqkit's contract: [0, 1]
    with torch.no_grad():
        taming_tokens, taming_rec = taming.tokens_and_reconstruction(images * 2 - 1)
        tokens = model.tokenize(images)
        rec = model.decode_indices(tokens)
    assert taming_tokens.unique().numel() > 4, "test images should use many codes"
    assert torch.equal(tokens, taming_tokens)
    assert (rec - taming_rec).abs().max().item() <= 1e-4
    detok = model.detokenize(tokens)
    assert (detok - ((taming_rec + 1) / 2).clamp(0, 1)).abs().max().item() <= 1e-4




@pytest.fixture(scope="module")
def f16(tmp_path_factory):
    """A small f16 taming VQGAN (ch_mult 1,1,2,2,4; attention at the 4x4 level of 64x64 inputs) in a Lightning .ckpt."""
    taming = random_taming_vqgan((1, 1, 2, 2, 4), attn_resolutions=[4], resolution=64)
    ckpt = tmp_path_factory.mktemp("taming") / "last.ckpt"
    torch.save({"state_dict": {**taming.state_dict(), **discriminator_weights()}, "global_step": 7, "epoch": 1}, ckpt)
    return taming, ckpt


# -------------------------------------------------------------------------------------------------------- parity
def test_f16_checkpoint_converts_with_identical_tokens_and_reconstructions(f16, tmp_path):
    taming, ckpt = f16
    model = convert_taming_checkpoint(ckpt, tmp_path / "out")
    c = model.config
    assert (c.base_channels, c.channel_mult, c.num_res_blocks, c.attn_levels, c.mid_attention) == (
        CH, [1, 1, 2, 2, 4], 1, [4], True)
    assert (c.z_channels, c.embed_dim, c.codebook_size, c.image_size) == (Z_CHANNELS, EMBED_DIM, N_EMBED, 256)
    assert (c.use_ema, c.kmeans_init, c.dead_code_window, c.cosine, c.beta) == (False, False, 0, False, 0.25)
    assert not any(k.startswith("loss.") for k in model.state_dict())
    assert_parity(taming, model, 64)
    assert_parity(taming, VQModel.from_pretrained(tmp_path / "out"), 64)


@pytest.mark.parametrize("attn_type", ["vanilla", "none"])
def test_ldm_f4_layout_from_a_full_diffusion_checkpoint_with_config(attn_type, tmp_path):
    # latent-diffusion VQ-f4: no attention outside the mid blocks (none at all with attn_type "none"), and inside a
    # full latent-diffusion checkpoint the autoencoder sits under first_stage_model.*
    taming = random_taming_vqgan((1, 2, 4), attn_resolutions=[], resolution=32, seed=3)
    if attn_type == "none":  # what latent-diffusion builds for attn_type "none"
        taming.encoder.mid.attn_1 = taming.decoder.mid.attn_1 = nn.Identity()
    state = {f"first_stage_model.{k}": v for k, v in taming.state_dict().items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(4, 3, 3, 3)
    torch.save(state, tmp_path / "model.ckpt")  # a bare state dict
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {"first_stage_config": {
        "target": "ldm.models.autoencoder.VQModelInterface",
        "params": {"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": {
            "double_z": False, "z_channels": Z_CHANNELS, "resolution": 32, "in_channels": 3, "out_ch": 3,
            "ch": CH, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
            "attn_type": attn_type}}}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    model = convert_taming_checkpoint(tmp_path / "model.ckpt", tmp_path / "out", tmp_path / "config.yaml")
    c = model.config
    assert (c.channel_mult, c.attn_levels, c.mid_attention, c.image_size) == ([1, 2, 4], [], attn_type != "none", 32)
    assert_parity(taming, model, 32)


def test_attention_block_matches_taming():
    torch.manual_seed(0)
    theirs = taming_model.AttnBlock(64).eval()
    ours = AttnBlock(64).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.3)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------- config cross-check
def test_config_that_does_not_match_the_weights_is_refused(f16, tmp_path):
    _, ckpt = f16
    config = {"model": {"params": {"embed_dim": EMBED_DIM, "n_embed": 1024, "ddconfig": {
        "double_z": False, "z_channels": Z_CHANNELS, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": CH,
        "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}}}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(VQKitFileError, match="codebook_size: weights say 64, config says 1024") as err:
        convert_taming_checkpoint(ckpt, tmp_path / "out", tmp_path / "model.yaml")
    assert "attn_levels: weights say [4], config says [3]" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_an_autoencoder_is_refused(tmp_path):
    torch.save({"state_dict": discriminator_weights()}, tmp_path / "disc.ckpt")
    with pytest.raises(VQKitFileError, match="not a taming"):
        convert_taming_checkpoint(tmp_path / "disc.ckpt", tmp_path / "out")


# ------------------------------------------------------------------------------------------------------- safety
def leave_marker(path: str) -> None:
    open(path, "w").close()


class PicklesACall:
    """Unpickling this calls leave_marker: stands for any code a malicious .ckpt could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return leave_marker, (self.marker,)


def test_checkpoint_that_needs_unpickling_is_refused_without_running_anything(f16, tmp_path):
    taming, _ = f16
    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": taming.state_dict(), "hyper_parameters": PicklesACall(str(marker))}, ckpt)
    with pytest.raises(VQKitFileError, match="will not unpickle") as err:
        convert_taming_checkpoint(ckpt, tmp_path / "out")
    assert str(ckpt) in str(err.value) and "leave_marker" in str(err.value)
    assert not marker.exists()
    torch.load(ckpt, weights_only=False)  # the payload is live: a plain unpickle does run it
    assert marker.exists()


def test_allowed_globals_are_read_as_inert_placeholders(f16, tmp_path, capsys):
    taming, _ = f16
    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": taming.state_dict(), "hyper_parameters": PicklesACall(str(marker))}, ckpt)
    with pytest.raises(VQKitFileError, match="--allow-global"):
        convert_taming_checkpoint(ckpt, tmp_path / "refused")
    name = f"{leave_marker.__module__}.{leave_marker.__qualname__}"
    parser = argparse.ArgumentParser(prog="vqkit")
    add_convert_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "taming", str(ckpt), str(tmp_path / "out"), "--allow-global", name])
    assert args.func(args) == 0
    assert not marker.exists()  # the named function was never called
    assert VQModel.from_pretrained(tmp_path / "out").config.codebook_size == N_EMBED


def test_lightning_modelcheckpoint_reference_loads_without_lightning(f16, tmp_path, monkeypatch):
    # Lightning 1.x checkpoints key their callback state by the callback class itself.
    taming, _ = f16
    fake = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    fake.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": fake.__name__})
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    ckpt = tmp_path / "last.ckpt"
    callbacks = {fake.ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}}
    torch.save({"state_dict": taming.state_dict(), "callbacks": callbacks}, ckpt)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", fake.__name__):
        monkeypatch.delitem(sys.modules, name)
    model = convert_taming_checkpoint(ckpt, tmp_path / "out")
    assert model.config.codebook_size == N_EMBED
    assert "pytorch_lightning" not in sys.modules


# ---------------------------------------------------------------------------------------------------------- CLI
def test_convert_command(f16, tmp_path, capsys):
    _, ckpt = f16
    parser = argparse.ArgumentParser(prog="vqkit")
    add_convert_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "taming", str(ckpt), str(tmp_path / "out")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "64 x 8" in out and "VQModel.from_pretrained" in out
    assert VQModel.from_pretrained(tmp_path / "out").config.channel_mult == [1, 1, 2, 2, 4]
